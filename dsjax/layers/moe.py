"""DeepSeekMoE: shared experts plus fine-grained routed experts (V3 eqs 12-16)."""

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import Fp8Recipe, ModelConfig, Numerics
from dsjax.layers.common import MLP, RoutingBias, float_weight, param, projection, weight_and_scale
from dsjax.ops.ep import moe_expert_parallel
from dsjax.ops.fp8 import uses_gpu_kernels, uses_pallas
from dsjax.ops.fp8_grouped import blocked_matmul, fp8_experts, grouped_matmul
from dsjax.ops.gpu_gmm import gpu_gmm, gpu_gmm_supported
from dsjax.ops.moe import megablox_gmm, moe_blocked, moe_dense, moe_ragged
from dsjax.ops.routing import Routing, route
from dsjax.sharding import active_platform, shard, weight_spec

# ragged: sort + grouped matmul on each device; dense: every expert on every token (reference);
# blocked: block-padded batched matmul, the fast path on CPU; ep: expert parallelism, tokens exchanged by
# all-to-all over the `expert` mesh axis inside shard_map.
_UP_AXES, _DOWN_AXES = ("experts", "embed", "moe_mlp"), ("experts", "moe_mlp", "embed")
_COMBINE = {"ragged": moe_ragged, "dense": moe_dense, "blocked": moe_blocked, "ep": moe_expert_parallel}
DISPATCH_IMPLS = ("auto", *_COMBINE)


def routed_fp8(cfg) -> Fp8Recipe | None:
    """The FP8 recipe of the routed experts' GEMMs: ``cfg.fp8`` unless it keeps them out (``routed_experts``)."""
    return cfg.fp8 if cfg.fp8 is not None and cfg.fp8.routed_experts else None


def resolve_dispatch(dispatch: str, tokens: int | None = None, cfg: ModelConfig | None = None) -> str:
    """``auto`` picks ``ep`` on accelerators with an expert mesh axis (on GPU under any mesh, see
    ``_accelerator_dispatch``), else ``ragged``; the platform is the active mesh's
    (:func:`dsjax.sharding.active_platform`), so compiling for a TPU on a CPU host takes the TPU path. On CPU
    (where XLA's ragged_dot is slow) it picks ``blocked``,
    except for about as many tokens as experts (``k * tokens >= e`` and ``tokens <= 2e``, i.e. decoding a batch),
    where ``dense`` reads each expert's weights once instead of gathering copies and is faster (measured).
    With ``cfg.fp8`` the experts run as FP8 GEMMs (grouped for ``ragged``/``ep``, per block for ``blocked``);
    ``dense`` has no FP8 form, so ``auto`` then picks ``blocked`` on CPU."""
    if dispatch not in DISPATCH_IMPLS:
        raise ValueError(f"dispatch={dispatch!r}; choose one of {DISPATCH_IMPLS}")
    if cfg is not None and routed_fp8(cfg) is not None:
        if dispatch == "dense":
            raise ValueError("dispatch='dense' has no FP8 path; with fp8 use 'blocked', 'ragged', 'ep' or 'auto'")
        if dispatch == "auto":
            return "blocked" if active_platform() == "cpu" else _accelerator_dispatch()
        return dispatch
    if dispatch != "auto":
        return dispatch
    if active_platform() != "cpu":
        return _accelerator_dispatch()
    if tokens is not None and cfg is not None:
        e = cfg.n_routed_experts
        if tokens * cfg.num_experts_per_tok >= e and tokens <= 2 * e:
            return "dense"
    return "blocked"


def _accelerator_dispatch() -> str:
    """On TPU/GPU: expert parallelism when the active mesh has an ``expert`` axis of size > 1 (the automatic
    partitioner would otherwise sort all tokens globally and gather every expert's weights), else ``ragged``.
    On GPU also under any mesh without one (an expert axis of 1, or none): XLA:GPU lowers ``ragged_dot`` to a
    dense matmul over every expert, masked (24x V2-Lite's model flops and 86 GiB of temporaries for a 4-layer
    train step of 4 x 2048 on one H200, deviceless compile); ``ep``'s ``shard_map`` is where the Mosaic-GPU
    grouped GEMMs can run (1.11x, 9.4 GiB), the exchange then staying on each device."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and (mesh.shape.get("expert", 1) > 1 or active_platform() == "gpu"):
        return "ep"
    return "ragged"


def _unpartitioned() -> bool:
    """No mesh, or a mesh of one device: a custom call (the Mosaic-GPU kernels) needs no ``shard_map`` then."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


class MoE(nnx.Module):
    """``h' = u + shared(u) + sum_i g_i expert_i(u)``; the residual is added by the decoder layer.

    ``router [d, e]`` is kept in fp32 (as HF does); ``routing_bias [e]`` exists for noaux_tc only.
    With ``cfg.fp8`` the experts (grouped; unless ``fp8.routed_experts`` is False) and shared experts run as
    FP8 GEMMs; the router stays fp32.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype):
        d, e, f, std = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.initializer_range
        self.cfg = cfg
        self.router = param(rngs, (d, e), ("embed", "experts"), jnp.float32, std)
        if cfg.has_routing_bias:
            self.routing_bias = RoutingBias(jnp.zeros((e,), jnp.float32), logical_axes=("experts",))
        make = dict(n_in=1, n_lead=1, fp8_weights=cfg.fp8_weights)
        self.w_gate, self.w_gate_scale = projection(rngs, (e, d, f), _UP_AXES, param_dtype, std, **make)
        self.w_up, self.w_up_scale = projection(rngs, (e, d, f), _UP_AXES, param_dtype, std, **make)
        self.w_down, self.w_down_scale = projection(rngs, (e, f, d), _DOWN_AXES, param_dtype, std, **make)
        if cfg.n_shared_experts:
            self.shared = MLP(
                d,
                cfg.shared_intermediate_size,
                "moe_mlp",
                rngs=rngs,
                param_dtype=param_dtype,
                std=std,
                fp8=cfg.fp8,
                fp8_weights=cfg.fp8_weights,
            )

    def __call__(self, x_btd, dispatch: str = "auto") -> tuple[jnp.ndarray, Routing]:
        b, t, d = x_btd.shape
        dispatch = resolve_dispatch(dispatch, b * t, self.cfg)
        # Tokens stay on their (data, expert) shard: routing is row-wise, so it runs on local tokens.
        x_md = shard(x_btd.reshape(b * t, d), ("batch", "act_embed"))
        bias = self.routing_bias[...] if self.cfg.has_routing_bias else None
        routing = route(x_md, self.router[...], bias, self.cfg)
        combine = _COMBINE[dispatch]
        accum = x_md.dtype if self.cfg.numerics == Numerics.OFFICIAL else jnp.float32
        names = ("w_gate", "w_up", "w_down")
        experts = [weight_and_scale(self, n) for n in names]
        kwargs = {}
        fp8 = routed_fp8(self.cfg)
        if fp8 is not None:  # float weights quantised from master precision; fp8 ones with their scales
            weights = [w if s is None else (w, s) for w, s in experts]
            if dispatch == "blocked":
                kwargs["bmm"] = blocked_matmul(fp8)
            else:
                kwargs["gmm"] = grouped_matmul(fp8)
                # Quantised here, on their shards: expert parallelism then gathers E4M3 (1 byte a value, the
                # bf16 path gathers 2), their gradients coming back through `grad` (in fp8.wgrad_dtype).
                weights = [
                    (w, s) if s is not None else fp8_experts(w, fp8, x_md.dtype, weight_spec(axes, w.shape))
                    for (w, s), axes in zip(experts, (_UP_AXES, _UP_AXES, _DOWN_AXES), strict=True)
                ]
                # Pallas (TPU) and Mosaic-GPU kernels' outputs carry no replication type
                if dispatch == "ep" and (uses_pallas(fp8) or uses_gpu_kernels(fp8)):
                    kwargs["check_vma"] = False
        else:
            weights = [float_weight(w, s, x_md.dtype, n_in=1, n_lead=1) for w, s in experts]
        if dispatch == "ep":
            kwargs["capacity_factor"] = self.cfg.moe_capacity_factor
            kwargs["exchange"] = self.cfg.moe_exchange
            # Mosaic tiles are multiples of 128 in the last two dims (real models: 7168 x 2048, 2048 x 1408).
            widths = (self.cfg.hidden_size, self.cfg.moe_intermediate_size)
            if fp8 is None and active_platform() == "tpu" and all(w % 128 == 0 for w in widths):
                kwargs["gmm"], kwargs["check_vma"] = megablox_gmm, False
            # Hopper: JAX's Mosaic-GPU grouped GEMMs (XLA:GPU lowers ragged_dot to a dense matmul over all experts).
            elif fp8 is None and active_platform() == "gpu" and gpu_gmm_supported(*widths, x_md.dtype):
                kwargs["gmm"], kwargs["check_vma"] = gpu_gmm, False
        elif dispatch == "ragged" and fp8 is None and active_platform() == "gpu" and _unpartitioned():
            kwargs["gmm"] = gpu_gmm  # one GPU, no mesh: the kernels run as they are (ragged_dot where unsupported)
        y_md = combine(x_md, routing.weights_mk, routing.experts_mk, *weights, accum_dtype=accum, **kwargs)
        y_btd = shard(y_md.reshape(b, t, d), ("batch", "seq", "act_embed"))
        if self.cfg.n_shared_experts:
            y_btd = y_btd + self.shared(x_btd)
        return y_btd, routing
