"""Test setup: 8 simulated CPU devices (for sharding tests), float32 matmuls, strict rank promotion.

XLA's backend optimisation level 0 halves compile times, which dominate this suite's tiny models; benchmarks
and real runs keep the default level. For the same reason the suite shares one persistent compilation cache:
many tests (and the training scripts they launch as subprocesses) compile identical programs, and a cached
executable is the very program XLA would build again. The controller creates the directory before pytest-xdist
starts its workers, so every worker and subprocess inherits it through the environment.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="dsjax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
# Cache every compile, however quick or small: tiny models' programs are what this suite compiles.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_collection_modifyitems(config, items):
    """Modules holding ``slow`` tests run first (each module's tests stay together, so its fixtures are built
    once per worker): with two xdist workers, a minutes-long test started last would leave the other worker
    idle at the end of the run."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)  # stable: order within groups kept
