"""The DeepSeek-V2/V3 causal language model: embedding, scanned dense and MoE stacks, head, MTP modules."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.layers.block import DecoderLayer, MTPLayer, embed_lookup
from dsjax.layers.common import config_norm, param, scan_stack, stacked
from dsjax.ops.attention import AttentionMask
from dsjax.ops.rope import inverse_frequencies, rope_angles
from dsjax.ops.routing import Routing
from dsjax.sharding import DEFAULT_RULES, Rules, shard, state_shardings


class ModelOutput(NamedTuple):
    """Everything a forward pass produces.

    ``mtp_logits[k-1, :, i]`` (depth k) predicts token ``i + k + 1``; its last ``k`` positions see padding
    instead of a real next token and carry no meaning. ``routing`` fields are stacked over MoE layers.
    """

    logits: jax.Array  # [b, t, vocab]
    mtp_logits: jax.Array | None  # [D, b, t, vocab]
    hidden: jax.Array  # [b, t, d], after the final norm
    routing: Routing | None  # [L_moe, b*t, ...]
    mtp_routing: Routing | None  # [D, b*t, ...]
    mtp_hidden: jax.Array | None = None  # [D, b, t, d], the MTP modules' output-head inputs (after head_norm)


class Transformer(nnx.Module):
    """DeepSeek-V2/V3 model. ``model(tokens)`` maps int ``[batch, seq]`` token ids to ``[batch, seq, vocab]``
    logits; ``model(tokens, return_mtp=True)`` also returns the MTP logits ``[D, batch, seq, vocab]``.

    Args:
      cfg: the architecture.
      rngs: initialisation randomness (weights ~ N(0, initializer_range), norms 1, routing bias 0).
      dtype: compute dtype of activations (weights are cast to it); routing runs in fp32 regardless.
      param_dtype: storage dtype of the weights (the router and routing bias stay fp32).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        d, std = cfg.hidden_size, cfg.initializer_range
        self.embed = param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), param_dtype, std)
        layer = functools.partial(DecoderLayer, cfg, param_dtype=param_dtype)
        # The stack a pipeline cuts into stages (dsjax.pipeline: the MoE layers, else the dense ones) is sharded
        # over the `stage` mesh axis by its own logical axis name.
        dense_axis = "layers" if cfg.num_moe_layers else "pipeline_layers"
        self.dense_layers = (
            stacked(cfg.first_k_dense_replace, lambda r: layer(moe=False, rngs=r), rngs, axis=dense_axis)
            if cfg.first_k_dense_replace
            else None
        )
        self.moe_layers = (
            stacked(cfg.num_moe_layers, lambda r: layer(moe=True, rngs=r), rngs, axis="pipeline_layers")
            if cfg.num_moe_layers
            else None
        )
        self.final_norm = config_norm(cfg, d, "embed", param_dtype)
        self.lm_head = param(rngs, (d, cfg.vocab_size), ("embed", "vocab"), param_dtype, std)
        self.mtp = (
            stacked(cfg.num_nextn_predict_layers, lambda r: MTPLayer(cfg, rngs=r, param_dtype=param_dtype), rngs)
            if cfg.num_nextn_predict_layers
            else None
        )

    # ---- public entry point --------------------------------------------------------------------------------
    def __call__(self, tokens, *, positions=None, segment_ids=None, return_mtp: bool = False, **options):
        """Logits for ``tokens`` (and MTP logits if ``return_mtp``). Validates the input first.

        With concrete inputs the call runs a cached jit-compiled forward; inside a user's ``jax.jit`` it traces
        :meth:`forward` directly. ``options``: ``attention`` (auto|naive|absorbed|xla|splash, see
        :data:`~dsjax.layers.mla.ATTENTION_IMPLS`), ``dispatch``
        (auto|ragged|blocked|dense|ep), ``remat`` (none|full|dots|offload|offload_attn), ``layers``
        (auto|scan|unroll: how the layer stacks are looped, see :func:`~dsjax.layers.common.scan_stack`).
        """
        tokens = check_tokens(tokens, self.config)
        for name, value in (("positions", positions), ("segment_ids", segment_ids)):
            if value is not None and tuple(jnp.shape(value)) != tuple(tokens.shape):
                raise ValueError(f"{name} has shape {tuple(jnp.shape(value))}, tokens {tuple(tokens.shape)}")
        if return_mtp and self.mtp is None:
            raise ValueError("return_mtp=True but this model has no MTP modules (num_nextn_predict_layers=0)")
        if isinstance(tokens, jax.core.Tracer):
            out = self.forward(tokens, positions=positions, segment_ids=segment_ids, return_mtp=return_mtp, **options)
        else:
            graphdef, state = nnx.split(self)
            out = _jit_forward(graphdef, state, tokens, positions, segment_ids, return_mtp, **options)
        return (out.logits, out.mtp_logits) if return_mtp else out.logits

    # ---- the computation -----------------------------------------------------------------------------------
    def forward(
        self,
        tokens_bt: jax.Array,
        *,
        positions=None,
        segment_ids=None,
        input_embeddings=None,
        return_mtp: bool = False,
        attention: str = "auto",
        dispatch: str = "auto",
        remat: str = "none",
        layers: str = "auto",
        compute_logits: bool = True,
    ) -> ModelOutput:
        """The pure forward pass (no input checks); see :class:`ModelOutput`.

        ``compute_logits=False`` skips the output head: ``logits`` and ``mtp_logits`` are None and the head's
        inputs come back as ``hidden`` / ``mtp_hidden`` (for a loss computed chunk by chunk).

        ``input_embeddings [b, t, d]`` replaces the embedding lookup of ``tokens_bt`` for the main stack (e.g.
        image features spliced in by a vision adapter); the MTP modules still embed the shifted tokens.
        """
        cfg = self.config
        b, t = tokens_bt.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = AttentionMask(positions, positions, segment_ids, segment_ids)
        cos, sin = self.rope(positions)
        kw = dict(attention=attention, dispatch=dispatch)
        loop = dict(remat=remat, layers=layers)

        def run(layer, x):
            return layer(x, cos, sin, mask, **kw)

        if input_embeddings is None:
            input_embeddings = embed_lookup(self.embed[...], tokens_bt, self.dtype)
        x = shard(input_embeddings.astype(self.dtype), ("batch", "seq", "act_embed"))
        if self.dense_layers is not None:
            x, _ = scan_stack(self.dense_layers, x, lambda layer, x: (run(layer, x)[0], None), **loop)
        routing = None
        if self.moe_layers is not None:
            x, routing = scan_stack(self.moe_layers, x, lambda layer, x: run(layer, x), **loop)
        hidden = self.final_norm(x)
        logits = self.logits(hidden) if compute_logits else None

        mtp_logits = mtp_routing = None
        if return_mtp:
            depth = cfg.num_nextn_predict_layers
            # Depth k reads the embedding of token i+k; positions past the end see token 0 (masked by losses).
            shifted = jnp.stack([jnp.roll(tokens_bt, -k, axis=1).at[:, t - k :].set(0) for k in range(1, depth + 1)])
            emb_next = embed_lookup(self.embed[...], shifted, self.dtype)

            def mtp_step(module, h_prev, emb):
                h, normed, r = module(h_prev, emb, cos, sin, mask, **kw)
                return h, (self.logits(normed) if compute_logits else normed, r)

            # The first module reads the main model's final-norm output (the released weights' convention). The
            # modules are rematerialised like the layers: an MTP module is a full MoE layer, whose residuals would
            # otherwise be kept for the backward.
            _, (mtp_out, mtp_routing) = scan_stack(self.mtp, hidden, mtp_step, xs=emb_next, **loop)
            if compute_logits:
                mtp_logits = mtp_out
            else:
                mtp_hidden = mtp_out
                return ModelOutput(None, None, hidden, routing, mtp_routing, mtp_hidden)
        return ModelOutput(logits, mtp_logits, hidden, routing, mtp_routing)

    def rope(self, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        """RoPE ``(cos, sin)`` tables for integer positions (YaRN-scaled when the config says so)."""
        cfg = self.config
        inv_freq = inverse_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        factor = cfg.rope_scaling.attention_factor if cfg.rope_scaling is not None else 1.0
        return rope_angles(positions_bt, inv_freq, factor)

    def logits(self, hidden_btd: jax.Array) -> jax.Array:
        """The output head (untied from the embedding)."""
        return shard(hidden_btd @ self.lm_head[...].astype(hidden_btd.dtype), ("batch", "seq", "act_vocab"))


@functools.partial(jax.jit, static_argnames=("graphdef", "return_mtp", "attention", "dispatch", "remat", "layers"))
def _jit_forward(graphdef, state, tokens, positions, segment_ids, return_mtp, **options):
    return nnx.merge(graphdef, state).forward(
        tokens, positions=positions, segment_ids=segment_ids, return_mtp=return_mtp, **options
    )


def check_tokens(tokens, cfg: ModelConfig):
    """Validate token ids at the API boundary: rank 2, integer dtype, length and (when concrete) range.

    JAX gathers clamp or fill out-of-range indices silently, so ids outside ``[0, vocab_size)`` must be
    rejected here rather than producing plausible but wrong logits.
    """
    if not isinstance(tokens, jax.Array | np.ndarray):
        tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, seq], got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.shape[1] == 0 or tokens.shape[0] == 0:
        raise ValueError(f"tokens must be non-empty, got shape {tuple(tokens.shape)}")
    if tokens.shape[1] > cfg.max_position_embeddings:
        raise ValueError(
            f"sequence length {tokens.shape[1]} exceeds max_position_embeddings={cfg.max_position_embeddings}"
        )
    if not isinstance(tokens, jax.core.Tracer):
        host = np.asarray(tokens)
        bad = np.unique(host[(host < 0) | (host >= cfg.vocab_size)])
        if bad.size:
            raise ValueError(f"token ids outside [0, {cfg.vocab_size}): {bad[:10].tolist()}")
        tokens = jnp.asarray(host, jnp.int32)
    return tokens


def abstract_model(cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32) -> Transformer:
    """The model with ShapeDtypeStruct leaves: shapes, dtypes and logical axes with no memory (any size)."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))


def create_model(
    cfg: ModelConfig,
    *,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
) -> Transformer:
    """A randomly initialised model; with ``mesh``, every weight is created directly in its sharded layout."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg, dtype=dtype, param_dtype=param_dtype))
    shardings = state_shardings(abstract_state, mesh, rules) if mesh is not None else None

    # One normal draw sliced over all weights compiles in a fraction of the time of one draw per (vmapped)
    # weight; the constructor's own draws are then dead code that XLA removes.
    @functools.partial(jax.jit, out_shardings=shardings)
    def init(noise):
        return redraw_weights(
            nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype))[1], noise
        )

    return nnx.merge(graphdef, init(weight_noise(abstract_state, seed, mesh)))


# Up to this size every device holds the whole draw and slices its weights locally (fastest to compile); a
# larger draw is split over the mesh's devices, and the weights gather their slices with collectives.
REPLICATED_NOISE_BYTES = 1 << 30


def weight_noise(state: nnx.State, seed: int, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    """The one normal draw that :func:`redraw_weights` slices, as a buffer of its own (split over every device of
    ``mesh``). Drawn inside the jitted init instead, XLA's fusion copies the whole generator into every weight's
    slice: a 2-layer model's init grew from ~800 to 4,000 instructions (17,000 on 8 devices), seconds of compile
    time for each model built. Values are those of ``normal(key(seed), (n,))`` (counter-based: padding the draw
    to a multiple of the device count leaves its first ``n`` values unchanged)."""
    size = sum(v.get_value().size for _, v in nnx.to_flat_state(state) if "init_std" in v.get_metadata())
    if mesh is None or size * 4 <= REPLICATED_NOISE_BYTES:
        return _normal_draw(seed, size, None if mesh is None else jax.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    padded = -(-size // mesh.size) * mesh.size
    return _normal_draw(seed, padded, jax.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names)))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal_draw(seed: int, size: int, sharding) -> jax.Array:
    noise = jax.random.normal(jax.random.key(seed), (size,), jnp.float32)
    return noise if sharding is None else jax.lax.with_sharding_constraint(noise, sharding)


def redraw_weights(state: nnx.State, noise: jax.Array) -> nnx.State:
    """Replace every weight made by :func:`~dsjax.layers.common.param` (metadata ``init_std``) with consecutive
    slices of ``noise`` (:func:`weight_noise`) times the weight's ``init_std``. Inside ``jit`` this compiles in a
    fraction of the time of one draw per (vmapped) weight; the constructor's own draws become dead code that XLA
    removes."""
    drawn = [v for _, v in nnx.to_flat_state(state) if "init_std" in v.get_metadata()]
    offset = 0
    for v in drawn:
        old = v.get_value()
        v.set_value(
            (noise[offset : offset + old.size].reshape(old.shape) * v.get_metadata()["init_std"]).astype(old.dtype)
        )
        offset += old.size
    return state


def count_params(model: Transformer, *, include_mtp: bool = False) -> int:
    """Number of parameters (``nnx.Param`` only; the routing bias is state, not a parameter)."""
    state = nnx.state(model, nnx.Param)
    total = 0
    for path, var in nnx.to_flat_state(state):
        if not include_mtp and path and path[0] == "mtp":
            continue
        total += int(np.prod(var.get_value().shape))
    return total
