"""Compile targets: TPU slices and NVIDIA GPU hosts as compile-only devices, with their chips' published figures.

XLA's TPU compiler ships in ``libtpu`` (``pip install "jax[tpu]"``) and runs on any host:
``jax.experimental.topologies.get_topology_desc`` returns the devices of a slice that need not exist, and a
program lowered with shardings on a mesh of them compiles exactly as on the pod (per-chip memory, HLO). GPUs work
the same way through the CUDA plugin (``pip install "jax[cuda12]"``, the ``gpu`` extra) and a target
description of the GPU model.
"""

from __future__ import annotations

import dataclasses
import os
import re

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Public spec-sheet figures of one accelerator chip (used for roofline estimates only)."""

    name: str
    platform: str  # "tpu" or "gpu"
    bf16_flops: float  # dense peak, FLOP/s
    hbm_bytes: float  # memory a program may use
    hbm_bandwidth: float  # bytes/s
    interconnect_bandwidth: float  # bytes/s per chip over ICI / NVLink (all links, one direction)
    fp8_flops: float | None = None  # dense peak where the chip has FP8 matrix units


# TPU figures from cloud.google.com/tpu/docs (v5p: 459 TFLOP/s, 95 GB HBM2e at 2,765 GB/s, ICI 4,800 Gbps;
# v6e: 918 TFLOP/s, 32 GB at 1,640 GB/s, ICI 3,584 Gbps; v5e: 197 TFLOP/s, 16 GB at 819 GB/s, ICI 1,600 Gbps;
# v4: 275 TFLOP/s, 32 GiB at 1,200 GB/s, ICI 2,400 Gbps). v5p's capacity is what XLA reports when a program
# does not fit ("exceeds available HBM (95.74G)"). GPU: NVIDIA H100 / H200 SXM data sheets (989 TFLOP/s dense
# bf16, 1,979 fp8; 80 GB at 3.35 TB/s and 141 GB at 4.8 TB/s; NVLink 900 GB/s, i.e. 450 GB/s each way).
CHIPS: dict[str, ChipSpec] = {
    "v5p": ChipSpec("TPU v5p", "tpu", 459e12, 95.74 * GIB, 2.765e12, 600e9),
    "v6e": ChipSpec("TPU v6e", "tpu", 918e12, 32e9, 1.64e12, 448e9),
    "v5e": ChipSpec("TPU v5e", "tpu", 197e12, 16e9, 0.819e12, 200e9),
    "v4": ChipSpec("TPU v4", "tpu", 275e12, 32 * GIB, 1.2e12, 300e9),
    "h100": ChipSpec("NVIDIA H100 SXM", "gpu", 989e12, 80e9, 3.35e12, 450e9, fp8_flops=1979e12),
    "h200": ChipSpec("NVIDIA H200 SXM", "gpu", 989e12, 141e9, 4.8e12, 450e9, fp8_flops=1979e12),
}

# Cloud TPU names ("v5p-1024": TensorCores for v4/v5p, 2 per chip; chips for v5e/v6e) -> topology strings.
_TPU_ALIASES = {
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8", "v5p-512": "v5p:4x8x8", "v5p-1024": "v5p:8x8x8",
    "v5p-2048": "v5p:8x8x16", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-64": "v6e:8x8",
    "v6e-256": "v6e:16x16", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-256": "v5e:16x16",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: its compile-only devices, chip figures and a readable name."""

    name: str
    devices: tuple
    chip: ChipSpec

    @property
    def num_chips(self) -> int:
        return len(self.devices)


def tpu_target(topology: str) -> Target:
    """Compile-only devices of a TPU slice, e.g. ``"v5p:8x8x8"`` (512 chips) or its Cloud name ``"v5p-1024"``."""
    topology = _TPU_ALIASES.get(topology, topology)
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", topology)
    if m is None or m.group(1) not in CHIPS:
        raise ValueError(
            f"unknown TPU topology {topology!r}: use <chip>:<AxB[xC]> with chip in "
            f"{sorted(k for k, c in CHIPS.items() if c.platform == 'tpu')} (e.g. v5p:8x8x8) or one of "
            f"{sorted(_TPU_ALIASES)}"
        )
    # libtpu takes a machine-wide lock by default (one process per TPU host); compiling needs no chip, so let
    # several processes (pytest workers, parallel compiles) load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(topology, "tpu")
    except Exception as e:  # libtpu missing, or a shape the chip does not come in
        raise RuntimeError(
            f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {e}); compiling for TPU needs libtpu: "
            'pip install "jax[tpu]"'
        ) from e
    return Target(topology, tuple(desc.devices), CHIPS[m.group(1)])


def _gpu_target_config(chip: ChipSpec) -> str:
    """A ``GpuTargetConfig`` text proto for a Hopper GPU (figures from the public spec; memory per model)."""
    memory = {"h100": 84929347584, "h200": 150754820096}[_chip_key(chip)]
    bandwidth = int(chip.hbm_bandwidth)
    return (
        "gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152 "
        "shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128 "
        "block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535 "
        f"memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98 "
        f"device_memory_size: {memory} shared_memory_per_block_optin: 232448 "
        "cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536 } "
        'platform_name: "CUDA" dnn_version_info { major: 9 minor: 8 } runtime_version { major: 12 minor: 8 } '
        f'device_description_str: "{chip.name}"'
    )


def _chip_key(chip: ChipSpec) -> str:
    return next(k for k, c in CHIPS.items() if c is chip)


def gpu_target(kind: str = "h200", count: int = 8, *, per_host: int = 8) -> Target:
    """Compile-only devices of ``count`` GPUs of ``kind`` (``h100`` or ``h200``) in hosts of ``per_host``.

    The CUDA plugin describes a GPU cluster as ``slices x hosts per slice x devices per host``, a slice being
    the devices joined by NVLink; an HGX H100/H200 host is one 8-GPU NVLink domain, so ``count`` GPUs are
    ``count / per_host`` slices of one host each (a host with fewer GPUs: one slice). Needs the CUDA plugin (the
    ``gpu`` extra: ``pip install -e ".[gpu]"``) but no GPU; run with ``JAX_PLATFORMS=cpu`` so JAX does not look
    for a driver."""
    if kind not in ("h100", "h200"):
        raise ValueError(f"unknown GPU kind {kind!r}; choose h100 or h200")
    if count < 1 or (count > per_host and count % per_host):
        raise ValueError(f"GPU count {count} not supported: use up to {per_host} or a multiple of {per_host}")
    shape = f"1x1x{count}" if count <= per_host else f"{count // per_host}x1x{per_host}"
    chip = CHIPS[kind]
    try:
        from jax.experimental import topologies

        # The shape goes in ``topology``; ``topology_name`` alone gives "Cannot create topology without an
        # explicit topology shape or without a client".
        desc = topologies.get_topology_desc(platform="cuda", topology=shape, target_config=_gpu_target_config(chip))
    except Exception as e:
        raise RuntimeError(
            f"cannot describe {count} x {chip.name} ({type(e).__name__}: {e}); compiling for GPU needs the CUDA "
            'plugin: pip install -e ".[gpu]"'
        ) from e
    if len(desc.devices) != count:
        raise RuntimeError(f"topology {shape} gave {len(desc.devices)} devices, expected {count}")
    return Target(f"{count}x{kind}", tuple(desc.devices), chip)


def target(name: str) -> Target:
    """``"v5p:8x8x8"`` / ``"v5p-1024"`` -> a TPU slice; ``"8xh200"`` / ``"h100"`` -> a GPU host (8 GPUs);
    ``"128xh200"`` -> 128 GPUs in 16 hosts of 8."""
    m = re.fullmatch(r"(?:(\d+)x)?(h100|h200)", name)
    if m:
        return gpu_target(m.group(2), int(m.group(1) or 8))
    return tpu_target(name)
