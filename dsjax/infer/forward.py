"""Forward passes that read and extend the latent KV cache: prefill, decode steps, speculative verification.

A chunk of ``t`` tokens per row at explicit ``positions [b, t]`` runs through the model; each layer stores the
chunk's latents at those positions and attends over the cache (``slot <= position``). With ``fresh=True`` (a
prefill into an empty cache) each layer attends within the chunk only, which is the training forward's work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.infer.cache import KVCache
from dsjax.layers.block import embed_lookup
from dsjax.ops.attention import AttentionMask, attention_mask
from dsjax.sharding import shard


def _kv_mask(positions_bt: jax.Array, num_slots: int) -> jax.Array:
    slots = jnp.broadcast_to(jnp.arange(num_slots, dtype=positions_bt.dtype), (positions_bt.shape[0], num_slots))
    return attention_mask(positions_bt, slots)


def head_logits(model, hidden_btd: jax.Array) -> jax.Array:
    """The output head with float32 results: ``hidden @ lm_head`` in the model's dtype, accumulated and returned in
    float32 (no rounding of the logits to bf16).

    The sampler (:func:`forward_cached`) and the RL trainer (:func:`dsjax.rl.step.token_logprobs`) both use it: a
    bf16 logit of magnitude 8 is only known to 1/32, and the two computations reach slightly different hidden
    states, so logits rounded to bf16 can land on different grid points: on the code job's bf16 model that made
    the mean per-token log-prob gap 1.45e-3 instead of 4.1e-4. In float32 models this is exactly ``model.logits``.
    """
    w = model.lm_head[...].astype(hidden_btd.dtype)
    logits = jnp.einsum("btd,dv->btv", hidden_btd, w, preferred_element_type=jnp.float32)
    return shard(logits, ("batch", "seq", "act_vocab"))


class _Runner:
    """The per-layer call with its cache hook (fresh: attend within the chunk; else attend over the cache)."""

    def __init__(self, model, positions_bt, window, *, fresh, attention, dispatch):
        self.cos, self.sin = model.rope(positions_bt)
        self.positions = positions_bt
        self.fresh = fresh
        self.window = window
        # Within a fresh chunk the mask stays positions (any attention form, incl. memory-efficient kernels).
        self.mask = AttentionMask(positions_bt, positions_bt) if fresh else _kv_mask(positions_bt, window)
        self.kw = dict(attention=attention, dispatch=dispatch)

    def cache_hook(self, cache: KVCache, index, c_kv, k_pe):
        cache = cache.write(index, c_kv, k_pe, self.positions)
        return cache, ((c_kv, k_pe) if self.fresh else cache.read(index, self.window))

    def __call__(self, layer, x, kv_fn):
        return layer(x, self.cos, self.sin, self.mask, kv_fn=kv_fn, **self.kw)[0]


def _scan_cached(stack, x, cache: KVCache, first_layer: int, runner: _Runner):
    """Scan ``runner(layer, x, kv_fn) -> x`` over a stacked module, layer ``i`` using cache layer ``first_layer + i``.

    The whole cache rides in the scan carry and each layer scatters its new slots into it, so the loop updates
    the (donated) buffer in place instead of copying per-layer slices in and out.
    """
    graphdef, state = nnx.split(stack)

    def step(carry, layer_state):
        x, cache, index = carry
        stored = []

        def kv_fn(c_kv, k_pe):
            # Called once, inside the layer, with this chunk's latents; the updated cache leaves through `stored`.
            stored.append(runner.cache_hook(cache, index, c_kv, k_pe))
            return stored[0][1]

        x = runner(nnx.merge(graphdef, layer_state), x, kv_fn)
        return (x, stored[0][0], index + 1), None

    (x, cache, _), _ = jax.lax.scan(step, (x, cache, jnp.asarray(first_layer, jnp.int32)), state)
    return x, cache


def forward_cached(
    model,
    tokens_bt: jax.Array,
    positions_bt: jax.Array,
    cache: KVCache,
    *,
    fresh: bool = False,
    window: int | None = None,
    attention: str = "absorbed",
    dispatch: str = "auto",
    input_embeddings: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Main model over a chunk: ``(logits [b, t, V], hidden [b, t, d] after the final norm, updated cache)``.

    ``cache`` covers all ``num_hidden_layers`` layers (dense first, then MoE). ``window`` (static, default all
    slots) limits attention to the first slots, so a step's cost follows the sequence length rather than the
    cache size; every position must be below it. ``input_embeddings [b, t, d]`` replaces the embedding lookup
    of ``tokens_bt`` (a vision-language prefill: image embeddings spliced over the placeholders).
    """
    window = cache.num_slots if window is None else window
    runner = _Runner(model, positions_bt, window, fresh=fresh, attention=attention, dispatch=dispatch)
    if input_embeddings is None:
        input_embeddings = embed_lookup(model.embed[...], tokens_bt, model.dtype)
    x = shard(input_embeddings.astype(model.dtype), ("batch", "seq", "act_embed"))
    num_dense = 0
    if model.dense_layers is not None:
        x, cache = _scan_cached(model.dense_layers, x, cache, 0, runner)
        num_dense = model.config.first_k_dense_replace
    if model.moe_layers is not None:
        x, cache = _scan_cached(model.moe_layers, x, cache, num_dense, runner)
    hidden = model.final_norm(x)
    return head_logits(model, hidden), hidden, cache


def first_mtp_layer(model):
    """The first MTP module as its own module (a slice of the stacked MTP weights)."""
    graphdef, state = nnx.split(model.mtp)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))


def mtp_cached(
    model,
    hidden_btd: jax.Array,
    next_tokens_bt: jax.Array,
    positions_bt: jax.Array,
    cache: KVCache,
    *,
    fresh: bool = False,
    window: int | None = None,
    attention: str = "absorbed",
    dispatch: str = "auto",
    mtp_layer=None,
) -> tuple[jax.Array, KVCache]:
    """The first MTP module over a chunk: at position ``i`` it reads the main model's ``h_i`` and the embedding of
    token ``i + 1`` and predicts token ``i + 2``. Returns ``(draft logits [b, t, V], updated cache)``; ``cache``
    has one layer; ``window`` as for :func:`forward_cached`. Deeper MTP modules are not used for drafting.
    ``mtp_layer``: :func:`first_mtp_layer` taken once outside a decode loop (slicing the stacked weights inside
    the loop body would copy them every step).
    """
    window = cache.num_slots if window is None else window
    runner = _Runner(model, positions_bt, window, fresh=fresh, attention=attention, dispatch=dispatch)
    first = first_mtp_layer(model) if mtp_layer is None else mtp_layer
    emb = embed_lookup(model.embed[...], next_tokens_bt, model.dtype)
    stored = []

    def kv_fn(c_kv, k_pe):
        stored.append(runner.cache_hook(cache, 0, c_kv, k_pe))
        return stored[0][1]

    _, normed, _ = first(hidden_btd, emb, runner.cos, runner.sin, runner.mask, kv_fn=kv_fn, **runner.kw)
    return model.logits(normed), stored[0][0]
