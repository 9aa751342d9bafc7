"""Test setup: 8 simulated CPU devices (for sharding tests), float32 matmuls, strict rank promotion.

XLA's backend optimisation level 0 halves compile times, which dominate this suite's tiny models; benchmarks
and real runs keep the default level.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_rank_promotion", "raise")
