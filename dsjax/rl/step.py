"""Rollout batches and the jitted GRPO update ``(state, batch) -> (state, metrics)``.

A batch holds sequences ``prompt + completion`` packed into rows (segment ids keep them apart, positions restart
per sequence) with per-token ``targets`` and ``seq`` (the completion index of each target token, -1 elsewhere).
Log-probs of the old and reference policies are computed by the same jitted pass as the policy's own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dsjax.infer.forward import head_logits
from dsjax.rl.grpo import GRPOConfig, grpo_loss, tis_weights
from dsjax.train.losses import chunked_token_logprobs
from dsjax.train.step import TrainState

BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "seq")


def build_batch(prompts: list[list[int]], completions: list[list[int]], *, pack: bool = True,
                row_len: int | None = None, completion_logprobs=None) -> dict[str, np.ndarray]:  # fmt: skip
    """Pack (or, with ``pack=False``, lay out one per row) the sequences ``prompt_i + completion_i``.

    Rows are ``row_len`` long (default: the longest sequence rounded up to a multiple of 16); the row count is
    rounded up with empty rows (see below). The target of position ``j`` is token ``j + 1`` of the same
    sequence; ``seq`` marks targets that are completion tokens. ``completion_logprobs`` (the sampler's, one per
    completion token) become ``sampler_logp`` at those targets, for the sampler-vs-trainer log-prob gap metric.
    """
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    longest = max(len(s) - 1 for s in seqs)
    row_len = row_len or -(-longest // 16) * 16
    if longest > row_len:
        raise ValueError(f"a sequence of {longest + 1} tokens does not fit rows of {row_len}")
    rows: list[list[int]] = []  # sequence indices per row, first fit
    space: list[int] = []
    for i, s in enumerate(seqs):
        need = len(s) - 1
        slot = next((r for r, free in enumerate(space) if free >= need), None) if pack else None
        if slot is None:
            rows.append([])
            space.append(row_len)
            slot = len(rows) - 1
        rows[slot].append(i)
        space[slot] -= need
    # Row counts rounded up (to a power of two up to 16, then to a multiple of 16): few distinct shapes, so the
    # jitted update compiles a few times without padding the batch by up to 2x.
    n = len(rows)
    shape = (1 << (n - 1).bit_length() if n <= 16 else -(-n // 16) * 16, row_len)
    out = {k: np.zeros(shape, np.int32) for k in BATCH_KEYS}
    out["seq"][:] = -1
    if completion_logprobs is not None:
        out["sampler_logp"] = np.zeros(shape, np.float32)
    for r, members in enumerate(rows):
        col = 0
        for segment, i in enumerate(members, 1):
            s, n = seqs[i], len(seqs[i]) - 1
            sl = slice(col, col + n)
            out["tokens"][r, sl] = s[:-1]
            out["targets"][r, sl] = s[1:]
            out["positions"][r, sl] = np.arange(n)
            out["segment_ids"][r, sl] = segment
            is_completion = np.arange(1, n + 1) >= len(prompts[i])
            out["seq"][r, sl] = np.where(is_completion, i, -1)
            if completion_logprobs is not None:
                out["sampler_logp"][r, col + len(prompts[i]) - 1 : col + n] = completion_logprobs[i]
            col += n
    return out


def token_logprobs(model, batch: dict, *, temperature: float = 1.0, chunk: int = 0, completion_tokens: int = 0,
                   **forward_options) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """fp32 ``log pi(target)`` per token and the policy's entropy per token, ``[rows, T]`` each.

    The logits come from the same float32-output head as the rollout engine's (:func:`~dsjax.infer.forward.
    head_logits`), so a bf16 model's trainer and sampler log-probs differ only by their hidden states.
    ``temperature`` divides the logits as the sampler does (``softmax(logits / T)``); at the default 1 the
    log-probs are the model's own. ``chunk > 0`` computes the head ``chunk`` positions at a time, recomputed in
    the backward (:func:`~dsjax.train.losses.chunked_token_logprobs`: the whole fp32 logits never exist, as
    pretraining's ``train.loss_chunk``). ``forward_options`` go to ``model.forward`` (``dispatch``,
    ``attention``, ``remat``, ``layers``).

    ``completion_tokens > 0``: the head runs only at the completion targets (``seq >= 0``), gathered from all
    rows into ``completion_tokens`` slots (an upper bound on their count, e.g. completions x max length);
    other positions get log-prob and entropy 0, which the GRPO loss never reads. Prompt positions and packing
    padding are then free in the head, the largest matmul of a small model. More completion targets than slots
    would be silently wrong, so the log-probs become NaN instead (the update then skips the step, counted).
    The gather crosses rows: use it with a batch that is not split over devices.
    """
    out = model.forward(
        batch["tokens"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        compute_logits=False,
        **forward_options,
    )
    if completion_tokens:
        return _completion_logprobs(model, out.hidden, batch, completion_tokens, temperature, chunk)
    if chunk:
        return chunked_token_logprobs(
            out.hidden, model.lm_head[...], batch["targets"], chunk=chunk, temperature=temperature
        )
    logits = head_logits(model, out.hidden)
    logp_all = jax.nn.log_softmax(logits if temperature == 1.0 else logits / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, batch["targets"][..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


def _completion_logprobs(model, hidden_btd, batch, slots: int, temperature: float, chunk: int):
    """:func:`token_logprobs` with the head at the completion targets only (see ``completion_tokens``)."""
    shape = batch["seq"].shape
    slots = min(slots, shape[0] * shape[1])
    is_completion = (batch["seq"] >= 0).reshape(-1)
    (index,) = jnp.nonzero(is_completion, size=slots, fill_value=0)
    used = jnp.arange(slots) < is_completion.sum()
    hidden = hidden_btd.reshape(-1, hidden_btd.shape[-1])[index][None]
    targets = batch["targets"].reshape(-1)[index][None]
    logp, entropy = chunked_token_logprobs(hidden, model.lm_head[...], targets, chunk=chunk, temperature=temperature)

    def scatter(x):  # unused slots point at position 0 with 0 added: they change nothing
        return jnp.zeros(is_completion.shape, x.dtype).at[index].add(jnp.where(used, x[0], 0.0)).reshape(shape)

    overflow = is_completion.sum() > slots
    return jnp.where(overflow, jnp.nan, scatter(logp)), scatter(entropy)


def make_logprob_fn(graphdef: nnx.GraphDef, *, temperature: float = 1.0, chunk: int = 0, completion_tokens: int = 0,
                    **forward_options):  # fmt: skip
    """Jitted ``(params, rest, batch) -> logp [rows, T]`` (old and reference log-probs, no gradient); the
    ``temperature``, ``chunk``, ``completion_tokens`` and forward options must be the update's
    (:func:`make_grpo_step`)."""

    @jax.jit
    def fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        return token_logprobs(model, batch, temperature=temperature, chunk=chunk,
                              completion_tokens=completion_tokens, **forward_options)[0]  # fmt: skip

    return fn


def make_grpo_step(graphdef: nnx.GraphDef, cfg: GRPOConfig, tx: optax.GradientTransformation, num_seqs: int, *,
                   temperature: float = 1.0, logprob_chunk: int = 0, completion_tokens: int = 0,
                   forward_options: dict | None = None, state_shardings=None, batch_shardings=None):  # fmt: skip
    """The jitted, state-donating update. ``batch`` adds to :func:`build_batch`'s arrays ``advantages``
    (``[num_seqs]``), ``old_logp`` (``[rows, T]``; omitted when ``mu == 1``) and ``ref_logp`` (when
    ``beta > 0``). A non-finite loss or gradient leaves the state unchanged (counted, as in pretraining).

    With ``sampler_logp`` in the batch (the rollout engine's log-probs, :func:`build_batch`), the metrics add
    ``sampler_logp_gap`` (mean ``|trainer - sampler|`` per token) and the spread of the importance ratio
    ``pi_old / pi_sampler`` (``tis_ratio_*``, per token unless ``cfg.tis == "sequence"``); with ``cfg.tis`` set,
    the ratio also weights the policy gradient (truncated importance sampling, :func:`~dsjax.rl.grpo.tis_weights`),
    and ``sampler_logp`` is required.

    ``temperature``: the policy's log-probs are those of ``softmax(logits / temperature)``. The rollouts are
    drawn at ``cfg.temperature``; passing it here (and to :func:`make_logprob_fn` for ``old_logp`` /
    ``ref_logp``) makes the trained policy the sampling one and the sampler-vs-trainer ratio 1 up to numerics.
    The default 1 keeps the untempered model's log-probs (the same thing at the usual ``cfg.temperature = 1``).

    ``completion_tokens``: as in :func:`token_logprobs` (the head at completion targets only, for a batch on
    one device); ``num_seqs * cfg.max_completion_length`` bounds what a rollout can hold.

    At scale: ``logprob_chunk`` and ``forward_options`` as in :func:`token_logprobs`; ``state_shardings`` (the
    state's, e.g. ``jax.tree.map(lambda x: x.sharding, state)``) and ``batch_shardings`` (one sharding for every
    batch array, rows split over the batch axes) pin the jitted step's layout, as the pretraining step's."""
    # Without correction the ratio's spread is still worth logging: it says whether cfg.tis is needed.
    spread_cfg = cfg if cfg.tis is not None else dataclasses.replace(cfg, tis="token")

    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        logp, entropy = token_logprobs(model, batch, temperature=temperature, chunk=logprob_chunk,
                                       completion_tokens=completion_tokens, **(forward_options or {}))  # fmt: skip
        # With one iteration per rollout the old policy is the current one: its log-probs are this pass's,
        # without the gradient (no separate forward needed). The same holds for the reference when beta = 0.
        old = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp)
        ref = batch.get("ref_logp")
        sampler = batch.get("sampler_logp")
        if cfg.tis is not None and sampler is None:
            raise ValueError(f"GRPOConfig.tis={cfg.tis!r}: the batch needs 'sampler_logp' (build_batch's "
                             "completion_logprobs, the rollout engine's log-probs)")  # fmt: skip
        loss, metrics = grpo_loss(logp, old, ref, batch["seq"], batch["advantages"], cfg, num_seqs,
                                  sampler_logp_bt=sampler)  # fmt: skip
        if sampler is not None and cfg.tis is None:
            metrics.update(tis_weights(old, sampler, batch["seq"], num_seqs, spread_cfg)[1])
        mask = batch["seq"] >= 0
        n = jnp.maximum(mask.sum(), 1)
        metrics["entropy"] = jnp.where(mask, entropy, 0.0).sum() / n
        if "sampler_logp" in batch:  # the rollout engine's log-probs vs this pass's (at mu = 1: same weights)
            metrics["sampler_logp_gap"] = jnp.where(mask, jnp.abs(logp - batch["sampler_logp"]), 0.0).sum() / n
        return loss, metrics

    def step(state: TrainState, batch: dict):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.rest, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state._replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        )
        return new_state, dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite)

    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, donate_argnums=0, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, None))  # fmt: skip
