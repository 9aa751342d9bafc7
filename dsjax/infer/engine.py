"""Batched generation: prefill, then a jit-compiled decode loop over the latent cache, optionally speculative.

Shapes are bucketed (batch and prompt length to powers of two, the output buffer likewise) so a compiled prefill
and decode loop serve many requests; the loop runs on device (``lax.while_loop``) until every row has stopped,
with the decode state — cache included — donated to each call. ``stream`` runs the same loop one step per call.

Speculative decoding (V3 §2.2/§5.4.3) drafts the next-but-one token with the first MTP module and verifies it with
the main model in the same pass that produces the next token: each step feeds ``[token, draft]`` at positions
``[p, p + 1]`` and emits one token, or two when the draft is accepted. Greedy acceptance is exact agreement, so the
output equals plain greedy decoding; with sampling, the speculative-sampling rule keeps the main model's
distribution.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dsjax.infer.cache import KVCache, init_cache
from dsjax.infer.forward import first_mtp_layer, forward_cached, mtp_cached
from dsjax.infer.sampling import (
    Sampling,
    categorical,
    log_probs,
    make_sampling,
    row_keys,
    sample_with_logp,
    speculative_accept,
    step_keys,
)
from dsjax.sharding import DEFAULT_RULES, logical_to_spec


class DecodeState(NamedTuple):
    """Everything the decode loop carries (all ``[b, ...]`` unless noted).

    ``token`` is the last emitted token, not yet in the cache, at ``position``; ``draft`` the MTP guess for the
    token after it (speculative only, with its draft log-probs when sampling). ``out[:, :count]`` are the
    emitted tokens and ``logp[:, :count]`` their log-probabilities under the distribution they were drawn from
    (the model's softmax for greedy); ``done`` rows emit nothing more. ``drafted`` / ``accepted`` count drafts.
    """

    cache: KVCache
    mtp_cache: KVCache | None
    token: jax.Array
    position: jax.Array
    draft: jax.Array
    draft_logp: jax.Array | None
    out: jax.Array
    logp: jax.Array
    count: jax.Array
    done: jax.Array
    keys: jax.Array
    step: jax.Array
    drafted: jax.Array
    accepted: jax.Array


class GenerationResult(NamedTuple):
    """Generated ids per prompt (stop token included when one ended the row) and decode statistics."""

    tokens: list[list[int]]
    logprobs: list[list[float]]  # per generated token, under the distribution it was sampled from
    decode_steps: int  # model calls after the prefill
    drafted: int  # speculative drafts verified (0 without speculation)
    accepted: int  # drafts accepted
    prefill_seconds: float
    decode_seconds: float

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


class _Static(NamedTuple):
    # Compile-time settings of prefill and decode (one compiled program per combination and shape bucket).
    graphdef: object
    num_slots: int
    sampling: Sampling
    speculative: bool
    attention: str
    dispatch: str


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def _is_stop(tokens_b, stop_ids):
    return jnp.any(tokens_b[:, None] == stop_ids[None, :], axis=-1)


def _draft(logits_bv, keys_b, sampling: Sampling):
    if sampling.greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32), None
    logp = log_probs(logits_bv, sampling)
    return categorical(keys_b, logp), logp


def _emit(out, count, tokens, write):
    # Write tokens[r] at out[r, count[r]] where `write`; past the buffer's end the write is dropped.
    rows = jnp.arange(out.shape[0])
    return out.at[rows, jnp.where(write, count, out.shape[1])].set(tokens, mode="drop")


@functools.partial(jax.jit, static_argnames=("static",))
def _prefill(static: _Static, state, tokens_bt, lengths_b, active_b, stop_ids, max_new, seed, embeddings=None):
    model = nnx.merge(static.graphdef, state)
    cfg = model.config
    b, t = tokens_bt.shape
    rows = jnp.arange(b)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = init_cache(cfg.num_hidden_layers, b, static.num_slots, cfg, model.dtype)
    # A fresh prefill attends within the prompt chunk, where the naive (expanded) form is the cheaper one.
    logits, hidden, cache = forward_cached(
        model, tokens_bt, positions, cache, fresh=True, attention="naive", dispatch=static.dispatch,
        input_embeddings=embeddings,
    )  # fmt: skip
    last = lengths_b - 1
    keys = row_keys(seed, b)
    k_first, k_draft = jax.vmap(jax.random.split, out_axes=1)(step_keys(keys, 0))
    first, first_logp = sample_with_logp(logits[rows, last], k_first, static.sampling)
    # The output buffer is as long as the cache (>= max_new), so the slot count alone keys the compiled loop.
    zero_count = jnp.zeros(b, jnp.int32)
    out = _emit(jnp.zeros((b, static.num_slots), jnp.int32), zero_count, first, active_b)
    out_logp = _emit(jnp.zeros((b, static.num_slots), jnp.float32), zero_count, first_logp, active_b)
    done = ~active_b | _is_stop(first, stop_ids) | (max_new <= 1)
    draft, draft_logp, mtp_cache = jnp.zeros(b, jnp.int32), None, None
    if static.speculative:
        # MTP input at position i: (h_i, token i+1); the last prompt position pairs with the first new token.
        next_tokens = jnp.roll(tokens_bt, -1, axis=1).at[rows, last].set(first)
        mtp_cache = init_cache(1, b, static.num_slots, cfg, model.dtype)
        mtp_logits, mtp_cache = mtp_cached(
            model, hidden, next_tokens, positions, mtp_cache, fresh=True, attention="naive", dispatch=static.dispatch
        )
        draft, draft_logp = _draft(mtp_logits[rows, last], k_draft, static.sampling)
    zero = jnp.zeros((), jnp.int32)
    return DecodeState(
        cache, mtp_cache, first, lengths_b, draft, draft_logp, out, out_logp, active_b.astype(jnp.int32), done, keys,
        jnp.ones((), jnp.int32), zero, zero,
    )  # fmt: skip


def _plain_step(model, static: _Static, s: DecodeState, stop_ids, max_new, window: int, mtp=None) -> DecodeState:
    logits, _, cache = forward_cached(
        model, s.token[:, None], s.position[:, None], s.cache, window=window, attention=static.attention,
        dispatch=static.dispatch,
    )  # fmt: skip
    new, new_logp = sample_with_logp(logits[:, 0], step_keys(s.keys, s.step), static.sampling)
    active = ~s.done
    out = _emit(s.out, s.count, new, active)
    out_logp = _emit(s.logp, s.count, new_logp, active)
    count = s.count + active
    done = s.done | (active & (_is_stop(new, stop_ids) | (count >= max_new)))
    return s._replace(
        cache=cache, token=jnp.where(active, new, s.token), position=s.position + active, out=out, logp=out_logp,
        count=count,
        done=done, step=s.step + 1,
    )  # fmt: skip


def _speculative_step(model, static: _Static, s: DecodeState, stop_ids, max_new, window: int, mtp) -> DecodeState:
    rows = jnp.arange(s.token.shape[0])
    tokens = jnp.stack([s.token, s.draft], axis=1)
    positions = jnp.stack([s.position, s.position + 1], axis=1)
    logits, hidden, cache = forward_cached(
        model, tokens, positions, s.cache, window=window, attention=static.attention, dispatch=static.dispatch
    )
    k_verify, k_bonus, k_draft = jax.vmap(lambda k: jax.random.split(k, 3), out_axes=1)(step_keys(s.keys, s.step))
    if static.sampling.greedy:
        first, first_logp = sample_with_logp(logits[:, 0], k_verify, static.sampling)
        accepted = first == s.draft
    else:
        target = log_probs(logits[:, 0], static.sampling)
        accepted, first = speculative_accept(target, s.draft_logp, s.draft, k_verify)
        first_logp = jnp.take_along_axis(target, first[:, None], axis=-1)[:, 0]
    # The model's next token after an accepted draft.
    bonus, bonus_logp = sample_with_logp(logits[:, 1], k_bonus, static.sampling)

    active = ~s.done
    out = _emit(s.out, s.count, first, active)
    # Emitted tokens are distributed as the main model's (speculative sampling), so their log-probs are its.
    out_logp = _emit(s.logp, s.count, first_logp, active)
    count = s.count + active
    stop_first = _is_stop(first, stop_ids) | (count >= max_new)
    second = active & accepted & ~stop_first
    out = _emit(out, count, bonus, second)
    out_logp = _emit(out_logp, count, bonus_logp, second)
    count = count + second
    done = s.done | (active & stop_first) | (second & (_is_stop(bonus, stop_ids) | (count >= max_new)))

    # Draft the token after the last emitted one. MTP at position p reads (h_p, first) and at p + 1 reads
    # (h_{p+1}, bonus); after a rejection h_{p+1} saw the wrong draft, so its output (and cache slot p + 1, which
    # the next step overwrites) is unused.
    mtp_logits, mtp_cache = mtp_cached(
        model, hidden, jnp.stack([first, bonus], axis=1), positions, s.mtp_cache, window=window,
        attention=static.attention, dispatch=static.dispatch, mtp_layer=mtp,
    )  # fmt: skip
    draft, draft_logp = _draft(mtp_logits[rows, second.astype(jnp.int32)], k_draft, static.sampling)
    return DecodeState(
        cache, mtp_cache, jnp.where(second, bonus, jnp.where(active, first, s.token)),
        s.position + active + second, draft, draft_logp, out, out_logp, count, done, s.keys, s.step + 1,
        s.drafted + active.sum(dtype=jnp.int32), s.accepted + (active & accepted).sum(dtype=jnp.int32),
    )  # fmt: skip


def _lookahead(static: _Static) -> int:
    return 2 if static.speculative else 1  # slots a step writes past a row's position: p (and p + 1)


@functools.partial(jax.jit, static_argnames=("static", "window"), donate_argnames=("dstate",))
def _decode(static: _Static, state, dstate: DecodeState, stop_ids, max_new, step_limit, window: int) -> DecodeState:
    """Decode until every row is done, ``dstate.step`` reaches ``step_limit``, or an active row's next write
    would leave the attention ``window`` (the caller then continues with a larger one)."""
    model = nnx.merge(static.graphdef, state)
    body = _speculative_step if static.speculative else _plain_step
    mtp = first_mtp_layer(model) if static.speculative else None  # sliced once, outside the loop

    def fits(s):
        return jnp.max(jnp.where(s.done, 0, s.position)) + _lookahead(static) <= window

    return jax.lax.while_loop(
        lambda s: (s.step < step_limit) & ~jnp.all(s.done) & fits(s),
        lambda s: body(model, static, s, stop_ids, max_new, window, mtp),
        dstate,
    )


def _fetch(tree):
    """``jax.device_get``, also of arrays split over several processes' devices (``jax.distributed``): those are
    gathered, a collective that every process reaches together (they all run the same ``generate``)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return multihost_utils.process_allgather(x, tiled=True)
        return jax.device_get(x)

    return jax.tree.map(one, tree)


def _run(req: _Request, dstate: DecodeState, step_limit: int) -> tuple[DecodeState, bool]:
    """Decode up to ``step_limit`` in attention windows that double as the rows grow; True when finished."""
    while True:
        position, done, step = _fetch((dstate.position, dstate.done, dstate.step))
        if done.all() or step >= req.max_new:
            return dstate, True
        if step >= step_limit:
            return dstate, False
        need = int(np.max(np.where(done, 0, position))) + _lookahead(req.static)
        window = min(req.static.num_slots, _bucket(need, 32))  # powers of two: few compiled variants
        dstate = _decode(req.static, req.state, dstate, req.stop_ids, req.max_new, step_limit, window)


class _Request(NamedTuple):
    static: _Static
    state: object
    tokens: np.ndarray  # [B, T] right-padded
    lengths: np.ndarray  # [B]
    active: np.ndarray  # [B] bool: real prompts (the rest is batch padding)
    stop_ids: np.ndarray
    max_new: int
    seed: int
    num_prompts: int
    embeddings: object = None  # [B, T, d] prefill inputs with image embeddings spliced in (vision-language)


def _batch_multiple() -> int:
    # Under a mesh the batch is split over the axes "batch" maps to; pad it to a multiple of their size.
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    spec = logical_to_spec(("batch",), DEFAULT_RULES, mesh)[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return int(np.prod([mesh.shape[a] for a in axes]))


def _prepare(
    model, prompts, *, max_new_tokens, temperature, top_p, top_k, seed, stop_tokens, speculative, attention, dispatch,
    images=None,
) -> _Request:  # fmt: skip
    vl = None
    if hasattr(model, "language") and hasattr(model, "image_embeddings"):  # a dsjax.vision.VisionLanguageModel
        vl, model = model, model.language  # it embeds the prompts; its language model decodes
    elif images is not None:
        raise ValueError("images need a vision-language model (dsjax.vision.VisionLanguageModel)")
    cfg = model.config
    sampling = make_sampling(temperature, top_k, top_p)
    rows = check_prompts(prompts, cfg, max_new_tokens)
    if speculative and model.mtp is None:
        raise ValueError("speculative=True needs MTP modules (num_nextn_predict_layers > 0)")
    if attention not in ("naive", "absorbed"):
        raise ValueError(f"attention={attention!r}; choose 'absorbed' or 'naive'")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if stop_tokens is None:
        stop_tokens = () if cfg.eos_token_id is None else (cfg.eos_token_id,)
    stop = [int(t) for t in stop_tokens]
    if any(not 0 <= t < cfg.vocab_size for t in stop):
        raise ValueError(f"stop_tokens must be ids in [0, {cfg.vocab_size}), got {stop}")

    multiple = _batch_multiple()
    batch = _bucket(len(rows), 1)
    batch = -(-batch // multiple) * multiple
    longest = max(len(r) for r in rows)
    prompt_len = min(_bucket(longest, 16), cfg.max_position_embeddings)
    # Slots: the prompt bucket, every new token, and one more for a speculative draft.
    num_slots = _bucket(prompt_len + _bucket(max_new_tokens, 16) + 1, 32)
    tokens = np.zeros((batch, prompt_len), np.int32)
    lengths = np.ones(batch, np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
        lengths[i] = len(r)
    active = np.arange(batch) < len(rows)
    graphdef, state = nnx.split(model)
    static = _Static(graphdef, num_slots, sampling, bool(speculative), attention, dispatch)
    stop_ids = np.asarray(stop or [-1], np.int32)
    embeddings = None
    if vl is not None:
        from dsjax.vision.chat import prefill_embeddings  # here: dsjax.vision imports this package

        embeddings = prefill_embeddings(vl, tokens, lengths[: len(rows)], images)
    return _Request(
        static, state, tokens, lengths, active, stop_ids, int(max_new_tokens), int(seed), len(rows), embeddings
    )


def check_prompts(prompts, cfg, max_new_tokens: int) -> list[np.ndarray]:
    """Validate a batch of prompts (lists of token ids) and ``max_new_tokens``; returns int32 arrays."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(prompts, np.ndarray | jax.Array) and np.ndim(prompts) == 2:
        prompts = list(np.asarray(prompts))
    if not isinstance(prompts, Sequence) or isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if any(np.ndim(p) == 0 for p in prompts):
        raise ValueError("prompts must be a list of token-id lists; for one prompt pass [ids]")
    rows = []
    for i, p in enumerate(prompts):
        arr = np.asarray(p)
        if arr.ndim != 1:
            raise ValueError(f"prompt {i} must be a flat list of token ids, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"prompt {i} is empty; generation needs at least one token")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"prompt {i} must hold integer token ids, got dtype {arr.dtype}")
        bad = arr[(arr < 0) | (arr >= cfg.vocab_size)]
        if bad.size:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size}): {bad[:10].tolist()}")
        if arr.size + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt {i} has {arr.size} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )
        rows.append(arr.astype(np.int32))
    return rows


def _start(req: _Request) -> DecodeState:
    return _prefill(
        req.static, req.state, req.tokens, req.lengths, req.active, req.stop_ids, req.max_new, req.seed,
        req.embeddings,
    )  # fmt: skip


def _rows(req: _Request, dstate: DecodeState, buffer: str = "out") -> list[list]:
    out, count = _fetch((getattr(dstate, buffer), dstate.count))
    return [out[i, : count[i]].tolist() for i in range(req.num_prompts)]


def generate(
    model,
    prompts,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop_tokens: Sequence[int] | None = None,
    speculative: bool = False,
    attention: str = "absorbed",
    dispatch: str = "auto",
    return_result: bool = False,
    images=None,
) -> list[list[int]] | GenerationResult:
    """Generate continuations of a batch of prompts (lists of token ids, any lengths) with the latent KV cache.

    Args:
      model: a :class:`~dsjax.model.Transformer` (under ``jax.set_mesh`` the batch is sharded over the mesh), or
        a :class:`~dsjax.vision.VisionLanguageModel` (then the prefill runs on the prompts' embeddings with the
        images written over their placeholder runs, and decoding uses its language model).
      prompts: list of token-id lists.
      max_new_tokens: tokens to generate per prompt at most (prompt + new must fit max_position_embeddings).
      temperature: 0 is greedy; > 0 samples from softmax(logits / temperature).
      top_p, top_k: nucleus and top-k filters (1.0 and 0 are off).
      seed: PRNG seed; the same seed gives the same output.
      stop_tokens: ids that end a row (included in its output); default: the config's ``eos_token_id``.
      speculative: draft with the MTP module and verify with the main model (greedy: identical output).
      attention: decode attention form, ``absorbed`` (default, attends in latent space) or ``naive``.
      dispatch: MoE dispatch (see :class:`~dsjax.layers.moe.MoE`).
      return_result: return a :class:`GenerationResult` with statistics instead of the ids alone.
      images: with a vision-language model, one entry per prompt: its processed images in order
        (:class:`~dsjax.vision.VLProcessor` output's ``images``; None or empty for a prompt without any). Each
        prompt's placeholder count must equal its images' token count.

    Returns:
      The generated ids per prompt, or a :class:`GenerationResult`.
    """
    req = _prepare(
        model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=seed, stop_tokens=stop_tokens, speculative=speculative, attention=attention, dispatch=dispatch,
        images=images,
    )  # fmt: skip
    t0 = time.perf_counter()
    dstate = jax.block_until_ready(_start(req))
    t1 = time.perf_counter()
    dstate, _ = _run(req, dstate, req.max_new)
    tokens = _rows(req, dstate)
    t2 = time.perf_counter()
    if not return_result:
        return tokens
    steps, drafted, accepted = (int(x) for x in jax.device_get((dstate.step, dstate.drafted, dstate.accepted)))
    return GenerationResult(tokens, _rows(req, dstate, "logp"), steps - 1, drafted, accepted, t1 - t0, t2 - t1)


def stream(model, prompts, **kwargs) -> Iterator[list[list[int]]]:
    """Like :func:`generate`, but yields each step's newly emitted ids per prompt (possibly empty lists) as soon
    as they exist; the concatenation of everything yielded equals :func:`generate`'s output."""
    if kwargs.pop("return_result", False):
        raise ValueError("stream() yields ids; return_result is not supported")
    defaults = dict(max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop_tokens=None,
                    speculative=False, attention="absorbed", dispatch="auto", images=None)  # fmt: skip
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unexpected arguments {sorted(unknown)}")
    req = _prepare(model, prompts, **{**defaults, **kwargs})
    dstate = _start(req)
    seen, finished = [0] * req.num_prompts, False
    while True:
        rows = _rows(req, dstate)
        yield [r[n:] for r, n in zip(rows, seen)]
        seen = [len(r) for r in rows]
        if finished:
            return
        dstate, finished = _run(req, dstate, int(dstate.step) + 1)
