"""Ahead-of-time compilation for TPU slices and GPU hosts from a CPU machine: per-chip memory, flops and
collectives of dsjax's own steps at any model size (``scripts/aot.py``)."""

from dsjax.aot.flops import active_matmul_params, decode_flops, prefill_flops, train_flops
from dsjax.aot.hlo import analyse_hlo
from dsjax.aot.report import compile_report, format_report
from dsjax.aot.steps import STEPS, Program, decode_program, prefill_program, train_program
from dsjax.aot.targets import CHIPS, ChipSpec, Target, gpu_target, target, tpu_target

__all__ = [
    "CHIPS",
    "STEPS",
    "ChipSpec",
    "Program",
    "Target",
    "active_matmul_params",
    "analyse_hlo",
    "compile_report",
    "decode_flops",
    "decode_program",
    "format_report",
    "gpu_target",
    "prefill_flops",
    "prefill_program",
    "target",
    "tpu_target",
    "train_flops",
    "train_program",
]
