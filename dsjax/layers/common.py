"""Parameter helpers, RMSNorm, the SwiGLU MLP and layer stacking."""

import math
from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from dsjax.config import Fp8Recipe
from dsjax.ops.fp8 import dequantize_blocks, fp8_matmul, fp8_weight, quantize_blocks
from dsjax.ops.moe import swiglu
from dsjax.ops.norm import rms_norm
from dsjax.sharding import active_platform, gathered_spec, weight_spec

M = TypeVar("M", bound=nnx.Module)


class RoutingBias(nnx.Variable):
    """V3's per-expert selection bias b_i. Not an ``nnx.Param``: it gets no gradient and no weight decay, and
    is updated by the balancing rule; it is still part of the model state, so checkpoints keep it."""


def param(rngs: nnx.Rngs, shape, axes: tuple[str, ...], dtype, std: float) -> nnx.Param:
    """A normal(0, std) weight with its logical axis names (``init_std`` lets ``create_model`` redraw it)."""
    value = (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)
    return nnx.Param(value, logical_axes=axes, init_std=std)


class Fp8Scale(nnx.Variable):
    """fp32 block scales of a weight stored in E4M3 (``weight_scale_inv`` in DeepSeek's FP8 checkpoints):
    weight = e4m3 value x scale, one scale per 128 x 128 block of the ``[in, out]`` matrix. Not trained."""


# DeepSeek's FP8 checkpoints: 128 x 128 weight blocks, fp32 scales, amax floored as in their kernels.
STORAGE_RECIPE = Fp8Recipe()


def projection(rngs, shape, axes, param_dtype, std, *, n_in: int, fp8_weights: bool, n_lead: int = 0):
    """A projection weight ``[lead..., in..., out...]`` (``n_in`` input axes after ``n_lead`` stacked ones).

    Returns ``(weight, scale)``: with ``fp8_weights`` the weight is stored in E4M3 and ``scale`` is its
    :class:`Fp8Scale` over 128x128 blocks of the flattened ``[in, out]`` matrix (HF's block layout
    transposed); otherwise a float ``nnx.Param`` and None.
    """
    p = param(rngs, shape, axes, param_dtype, std)
    if not fp8_weights:
        return p, None
    q, s = quantize_blocks(_as_matrix(p.get_value(), n_in, n_lead), STORAGE_RECIPE)
    return nnx.Param(q.reshape(shape), logical_axes=axes), Fp8Scale(s, logical_axes=(*axes[:n_lead], None, None))


def _as_matrix(w, n_in: int, n_lead: int = 0):
    """``[lead..., in..., out...]`` -> ``[lead..., prod(in), prod(out)]``, the layout block scales refer to."""
    return w.reshape(*w.shape[:n_lead], math.prod(w.shape[n_lead : n_lead + n_in]), -1)


def float_weight(w, scale, dtype, *, n_in: int, n_lead: int = 0):
    """The weight in ``dtype``, dequantised block by block when it is stored in fp8 (``scale`` not None)."""
    if scale is None:
        return w.astype(dtype)
    return dequantize_blocks(_as_matrix(w, n_in, n_lead), scale, STORAGE_RECIPE.block, dtype).reshape(w.shape)


def gathered_on_gpu(w, axes: tuple[str, ...] | None):
    """On GPU meshes, a float weight constrained to FSDP's gathered layout for its product (the declared rules'
    layout without the token axes, :func:`dsjax.sharding.gathered_spec`); elsewhere, or with no rules
    declared, ``w`` as it is.

    Left free, XLA:GPU all-gathered the activations instead for the weight gradients: bf16[64, 4096, 128, 192]
    (12 GiB) on the V3 layer step over 64 H200s (temporaries 15.83 -> 8.93 GiB with this), bf16[256, 4096,
    128, 256] (64 GiB) for MLA's ``wkv_b`` on the V3 train step over 256. XLA:TPU gathers the weights itself,
    and there the constraint moved the V3 train step on v5p-1024 from 85.78 to 92.77 GiB per chip."""
    spec = None if axes is None or active_platform() != "gpu" else weight_spec(axes, w.shape)
    return w if spec is None else jax.lax.with_sharding_constraint(w, gathered_spec(spec))


def project(x, w, scale, *, n_in: int, fp8: Fp8Recipe | None, axes: tuple[str, ...] | None = None):
    """``x [..., in...] . w [in..., out...] -> [..., out...]`` (contracting the last ``n_in`` axes of x).

    With ``fp8`` the product is DeepSeek's fine-grained FP8 GEMM (:func:`dsjax.ops.fp8.fp8_matmul`) over the
    flattened ``[in, out]`` matrix; otherwise a plain dot in ``x.dtype`` (fp8-stored weights dequantised first).
    Float weights are quantised from master precision ahead of the GEMM (:func:`dsjax.ops.fp8.fp8_weight`),
    on their shards where ``axes`` (their logical axes) and the declared rules place them.
    """
    if fp8 is None:
        return jnp.tensordot(x, gathered_on_gpu(float_weight(w, scale, x.dtype, n_in=n_in), axes), axes=n_in)
    lead = x.shape[: x.ndim - n_in]
    w2 = _as_matrix(w, n_in)
    if scale is None:
        spec = _matrix_spec(axes, w.shape, n_in)
        w2 = fp8_weight(w2, fp8, x.dtype, spec, gathered=None if spec is None else gathered_spec(spec))
    y = fp8_matmul(x.reshape(*lead, math.prod(w.shape[:n_in])), w2, fp8, scale)
    return y.reshape(*lead, *w.shape[n_in:])


def weight_axes(module: nnx.Module, name: str) -> tuple[str, ...]:
    """The logical axes of the weight ``module.<name>`` as the layer sees it (inside a scan over stacked layers,
    without the stacked axis)."""
    var = getattr(module, name)
    axes = tuple(var.get_metadata()["logical_axes"])
    return axes[len(axes) - var[...].ndim :]


def _matrix_spec(axes, shape, n_in: int) -> PartitionSpec | None:
    """The layout of the ``[in, out]`` matrix view of a weight placed by the declared rules
    (:func:`dsjax.sharding.weight_spec`), where the reshape keeps it: each group of axes split, if at all, on
    its leading one. None otherwise, or with no rules declared."""
    spec = None if axes is None else weight_spec(axes, shape)
    if spec is None:
        return None
    parts = tuple(spec) + (None,) * (len(shape) - len(spec))
    groups = (parts[:n_in], parts[n_in:])
    if any(p is not None for group in groups for p in group[1:]):
        return None
    return PartitionSpec(*(group[0] for group in groups))


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

    def __init__(
        self,
        dim: int,
        width: int,
        width_axis: str,
        *,
        rngs: nnx.Rngs,
        param_dtype,
        std: float,
        fp8: Fp8Recipe | None = None,
        fp8_weights: bool = False,
    ):
        self.fp8 = fp8
        make = dict(n_in=1, fp8_weights=fp8_weights)
        self.w_gate, self.w_gate_scale = projection(rngs, (dim, width), ("embed", width_axis), param_dtype, std, **make)
        self.w_up, self.w_up_scale = projection(rngs, (dim, width), ("embed", width_axis), param_dtype, std, **make)
        self.w_down, self.w_down_scale = projection(rngs, (width, dim), (width_axis, "embed"), param_dtype, std, **make)

    def __call__(self, x_btd):
        def proj(x, name):
            return project(x, *weight_and_scale(self, name), n_in=1, fp8=self.fp8, axes=weight_axes(self, name))

        return proj(swiglu(proj(x_btd, "w_gate"), proj(x_btd, "w_up")), "w_down")


def weight_and_scale(module: nnx.Module, name: str):
    """The projection ``module.<name>`` and its fp8 block scales ``module.<name>_scale`` (None if float)."""
    scale = getattr(module, name + "_scale")
    return getattr(module, name)[...], None if scale is None else scale[...]


def stacked(n: int, make: Callable[[nnx.Rngs], M], rngs: nnx.Rngs, *, axis: str = "layers") -> M:
    """``n`` independently initialised copies of ``make(rngs)`` with every variable stacked on a leading axis
    of logical name ``axis`` (``layers``; ``pipeline_layers`` for the stack pipeline stages cut), for
    :func:`scan_stack`."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(params=0))))
    keys = jax.random.split(rngs.params(), n)
    state = jax.vmap(lambda key: nnx.split(make(nnx.Rngs(params=key)))[1])(keys)
    for _, var in nnx.to_flat_state(state):
        var.set_metadata(logical_axes=(axis, *var.get_metadata()["logical_axes"]))
    return nnx.merge(graphdef, state)


LAYER_INPUT = "layer_input"  # checkpoint name of each layer's input activation (see the ``offload`` policy)
ATTN_OUT = "attn_out"  # checkpoint name of the attention block's output, after its output projection
_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Recompute everything but keep each layer's input in host memory rather than HBM (MaxText's decoder-input
    # offload): a deep stack's saved inputs (layers x tokens x d) leave the chip, transferred while other
    # layers compute. Needs a backend with a pinned-host memory space (TPU, GPU).
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device",
        offload_dst="pinned_host",
    ),
    # As ``offload``, with the attention block's projected output in host memory too (MaxText's V3 recipe offloads
    # its `out_proj` the same way): the backward rebuilds the FFN's input from the two saved tensors and skips
    # the output projection's forward matmul (heads x v_head x d per token, 2/3 of MLA's non-attention
    # recompute on DeepSeek-V3), for a second tokens x d tensor per layer in host memory.
    "offload_attn": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[LAYER_INPUT, ATTN_OUT],
        offload_src="device",
        offload_dst="pinned_host",
    ),
}
REMAT_POLICIES = tuple(_REMAT_POLICIES)


LAYER_LOOPS = ("auto", "scan", "unroll")
UNROLL_MAX_LAYERS = 8  # ``auto`` unrolls stacks up to this depth


def scan_stack(stack: M, carry, body: Callable[..., tuple], *, xs=None, remat: str = "none", layers: str = "auto"):
    """Run ``body(layer, carry) -> (carry, out)`` over the stacked layers; ``out`` leaves come back stacked.
    With per-layer inputs ``xs`` (leading axis = layers) the call is ``body(layer, carry, x)``.

    ``layers="scan"`` uses ``jax.lax.scan``: one layer is traced once whatever the depth, so compile time does
    not grow with the layer count (the choice for deep models). ``"unroll"`` traces each layer in sequence: the
    backward pass then reads each layer's residuals directly instead of slicing them out of (and the forward
    writing them into) stacked buffers, 20-25% of a small model's train step on CPU (measured); compile time
    grows with depth. ``"auto"`` unrolls stacks of at most ``UNROLL_MAX_LAYERS`` layers.
    ``remat``: ``none``, ``full`` (recompute everything in the backward pass), ``dots`` (keep matmul outputs) or
    ``offload`` (recompute everything, with each layer's input saved to host memory) or ``offload_attn``
    (``offload`` plus the attention block's output, named ``ATTN_OUT`` by the layer).
    """
    if remat not in _REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; choose one of {sorted(_REMAT_POLICIES)}")
    if layers not in LAYER_LOOPS:
        raise ValueError(f"layers={layers!r}; choose one of {LAYER_LOOPS}")
    graphdef, state = nnx.split(stack)

    def step(carry, inputs):
        layer_state, x = inputs
        layer = nnx.merge(graphdef, layer_state)
        carry = jax.tree.map(lambda c: checkpoint_name(c, LAYER_INPUT), carry)
        return body(layer, carry) if xs is None else body(layer, carry, x)

    if remat != "none":
        step = jax.checkpoint(step, policy=_REMAT_POLICIES[remat], prevent_cse=False)
    depth = jax.tree.leaves(state)[0].shape[0]
    if layers == "scan" or (layers == "auto" and depth > UNROLL_MAX_LAYERS):
        return jax.lax.scan(step, carry, (state, xs))
    outs = []
    for i in range(depth):
        carry, out = step(carry, jax.tree.map(lambda v, i=i: v[i], (state, xs)))
        outs.append(out)
    return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
