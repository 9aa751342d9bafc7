"""Pallas' Mosaic-GPU interpreter (JAX >= 0.10: GPU kernels run on CPU, shared memory and TMA simulated), for
the tests of :mod:`dsjax.ops.fp8_gpu`, with two gaps of JAX 0.10.2's interpreter filled:

- ``wgmma`` with a transposed operand (``plgpu.transpose_ref``: how a kernel hands ``wgmma`` an operand in
  another major order, e.g. 8-bit operands, which must have their contraction last): the interpreter reads the
  buffer but not the transpose (``'TransposeTransform' object has no attribute 'indices'``); here the
  transpose is applied to the matmul's operand;
- ``plgpu.layout_cast`` (a register-layout hint for the compiler's layout inference) has no CPU lowering; in the
  interpreter it is the identity.
"""

from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest
from jax._src.interpreters import mlir
from jax._src.pallas.mosaic_gpu import core as mosaic_gpu_core
from jax._src.state.types import TransposeTransform

try:  # JAX 0.10.2 has it; dsjax allows older JAX, which may not
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams, force_gpu_interpret_mode
except ImportError as e:  # pragma: no cover - depends on the installed JAX
    _MISSING = f"this JAX has no Mosaic-GPU interpreter ({e})"
else:
    _MISSING = None
    _wgmma = gpu_callbacks.wgmma
    mlir.register_lowering(mosaic_gpu_core.layout_cast_p, lambda ctx, x, **_: [x], platform="cpu")


def _untransposed(transforms):
    """``(transforms without a trailing 2-D transpose, whether there was one)``."""
    if transforms and isinstance(transforms[-1], TransposeTransform):
        assert transforms[-1].permutation == (1, 0), transforms
        transforms = transforms[:-1]
        flipped = True
    else:
        flipped = False
    assert not any(isinstance(t, TransposeTransform) for t in transforms), transforms
    return transforms, flipped


def _wgmma_transposed(*, a_transforms, b_transforms, **kwargs):
    (a_transforms, flip_a), (b_transforms, flip_b) = _untransposed(a_transforms), _untransposed(b_transforms)
    numpy = gpu_callbacks.np  # the callback computes `acc + np.matmul(a, b)`: the operands flipped for its duration

    def matmul(a, b, **kw):
        return np.matmul(a.T if flip_a else a, b.T if flip_b else b, **kw)

    gpu_callbacks.np = types.SimpleNamespace(**{**vars(np), "matmul": matmul})
    try:
        return _wgmma(a_transforms=a_transforms, b_transforms=b_transforms, **kwargs)
    finally:
        gpu_callbacks.np = numpy


@contextlib.contextmanager
def interpret():
    """Mosaic-GPU kernels called in this context run in the interpreter (on CPU); the test is skipped where the
    installed JAX has none."""
    if _MISSING:
        pytest.skip(_MISSING)
    gpu_callbacks.wgmma = _wgmma_transposed
    try:
        with force_gpu_interpret_mode(InterpretGPUParams()):
            yield
    finally:
        gpu_callbacks.wgmma = _wgmma
