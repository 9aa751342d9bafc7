"""Parameter helpers, RMSNorm, the SwiGLU MLP and layer stacking."""

from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.ops.moe import swiglu
from dsjax.ops.norm import rms_norm

M = TypeVar("M", bound=nnx.Module)


class RoutingBias(nnx.Variable):
    """V3's per-expert selection bias b_i. Not an ``nnx.Param``: it gets no gradient and no weight decay, and
    is updated by the balancing rule; it is still part of the model state, so checkpoints keep it."""


def param(rngs: nnx.Rngs, shape, axes: tuple[str, ...], dtype, std: float) -> nnx.Param:
    """A normal(0, std) weight with its logical axis names (``init_std`` lets ``create_model`` redraw it)."""
    value = (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)
    return nnx.Param(value, logical_axes=axes, init_std=std)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale (initialised to ones)."""

    def __init__(self, dim: int, axis_name: str, *, eps: float, weight_in_fp32: bool, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
        self.eps = eps
        self.weight_in_fp32 = weight_in_fp32

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps, weight_in_fp32=self.weight_in_fp32)


def config_norm(cfg, dim: int, axis_name: str, param_dtype) -> RMSNorm:
    """An RMSNorm with the model's epsilon and numerics profile."""
    return RMSNorm(
        dim, axis_name, eps=cfg.rms_norm_eps, weight_in_fp32=cfg.numerics == "official", param_dtype=param_dtype
    )


class MLP(nnx.Module):
    """SwiGLU FFN ``down(silu(x W_gate) * x W_up)``: the dense layers and the fused shared experts."""

    def __init__(self, dim: int, width: int, width_axis: str, *, rngs: nnx.Rngs, param_dtype, std: float):
        self.w_gate = param(rngs, (dim, width), ("embed", width_axis), param_dtype, std)
        self.w_up = param(rngs, (dim, width), ("embed", width_axis), param_dtype, std)
        self.w_down = param(rngs, (width, dim), (width_axis, "embed"), param_dtype, std)

    def __call__(self, x_btd):
        gate = x_btd @ self.w_gate[...].astype(x_btd.dtype)
        up = x_btd @ self.w_up[...].astype(x_btd.dtype)
        return swiglu(gate, up) @ self.w_down[...].astype(x_btd.dtype)


def stacked(n: int, make: Callable[[nnx.Rngs], M], rngs: nnx.Rngs) -> M:
    """``n`` independently initialised copies of ``make(rngs)`` with every variable stacked on a leading
    ``layers`` axis, for :func:`scan_stack`."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(params=0))))
    keys = jax.random.split(rngs.params(), n)
    state = jax.vmap(lambda key: nnx.split(make(nnx.Rngs(params=key)))[1])(keys)
    for _, var in nnx.to_flat_state(state):
        var.set_metadata(logical_axes=("layers", *var.get_metadata()["logical_axes"]))
    return nnx.merge(graphdef, state)


_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scan_stack(stack: M, carry, body: Callable[[M, object], tuple], *, remat: str = "none"):
    """Run ``body(layer, carry) -> (carry, out)`` over the stacked layers with ``jax.lax.scan``.

    One layer is traced once whatever the depth, so compile time does not grow with the layer count.
    ``remat``: ``none``, ``full`` (recompute everything in the backward pass) or ``dots`` (keep matmul outputs).
    """
    if remat not in _REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; choose one of {sorted(_REMAT_POLICIES)}")
    graphdef, state = nnx.split(stack)

    def step(carry, layer_state):
        return body(nnx.merge(graphdef, layer_state), carry)

    if remat != "none":
        step = jax.checkpoint(step, policy=_REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(step, carry, state)
