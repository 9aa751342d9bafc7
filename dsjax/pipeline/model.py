"""The DeepSeek model as pipeline stages: the training loss and its gradients computed by a pipeline schedule.

Cut (`split_state`): the MoE layer stack (the dense stack for a model without MoE layers) is split evenly into
``schedule.stages`` stages, stacked on a leading stage axis; every other weight is *shared*, held whole by each
rank and used only by the stages that need it:

- stage 0 (kind ``first``): the embedding lookup, the dense layers (``first_k_dense_replace``), its MoE layers;
- middle stages (kind ``middle``): their MoE layers;
- the last stage (kind ``last``): its MoE layers, the final norm, the output head and cross-entropy, the MTP
  modules (which embed the shifted tokens with the shared embedding) and their loss.

Every stage adds the sequence-wise balance loss of its own MoE layers (the MTP layers' on the last stage) and
reports its layers' expert loads, so the loss and the auxiliary-loss-free bias update are those of
`dsjax.train.step` (same terms, same global normalisation: token counts and the number of sequences are those
of the whole batch). For DualPipeV, rank 0 holds stages 0 and 2R-1: the embedding and the head share a rank.

Micro-batch m holds rows ``m, m + M, m + 2M, ...`` of the global batch (`microbatch_inputs`): a batch sharded
over ``data`` / ``expert`` splits into micro-batches without moving data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.data.pipeline import future_targets
from dsjax.layers.block import embed_lookup
from dsjax.layers.common import scan_stack
from dsjax.ops.attention import AttentionMask
from dsjax.pipeline.executor import EngineResult, make_engine, sum_stages
from dsjax.pipeline.schedules import Kind, Schedule
from dsjax.train import losses
from dsjax.train.config import TrainConfig

FIRST, MIDDLE, LAST, ONLY = range(4)
BATCH_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_mask")


def split_stack(model_cfg: ModelConfig) -> str:
    """The layer stack cut into stages: the MoE layers, or the dense ones for a model without MoE layers."""
    return "moe_layers" if model_cfg.num_moe_layers else "dense_layers"


def check_stages(model_cfg: ModelConfig, stages: int) -> None:
    """Raise ``ValueError`` unless the split stack's layers divide evenly into ``stages`` stages."""
    n = model_cfg.num_moe_layers or model_cfg.first_k_dense_replace
    if n < stages or n % stages:
        kind = "MoE" if model_cfg.num_moe_layers else "dense"
        raise ValueError(
            f"{n} {kind} layers do not split evenly into {stages} pipeline stages (set model.num_hidden_layers so "
            f"that the {kind} layers are a multiple of the stages)"
        )


def split_state(state: nnx.State, model_cfg: ModelConfig, stages: int) -> tuple[nnx.State, nnx.State]:
    """``(stacked, shared)``: the split stack reshaped to ``[stages, layers_per_stage, ...]``, and the rest.

    Linear (a reshape and a partition), so its transpose (`jax.vjp`) maps stage gradients back to the model's
    layout. Works for the parameters and for the non-trainable state (routing biases) alike.
    """
    key = split_stack(model_cfg)
    shared = nnx.State({k: v for k, v in state.items() if k != key})
    if key not in state:
        return nnx.State({}), shared
    stacked = jax.tree.map(lambda a: a.reshape(stages, a.shape[0] // stages, *a.shape[1:]), state[key])
    return nnx.State({key: stacked}), shared


def microbatch_inputs(batch: dict, microbatches: int) -> dict:
    """``[B, t]`` batch arrays -> ``[M, B/M, t]``: micro-batch m holds rows m, m + M, ... (see the module doc)."""
    out = {}
    for k in BATCH_KEYS:
        a = batch[k]
        if a.shape[0] % microbatches:
            raise ValueError(f"batch of {a.shape[0]} rows does not split into {microbatches} micro-batches")
        out[k] = jnp.swapaxes(a.reshape(a.shape[0] // microbatches, microbatches, *a.shape[1:]), 0, 1)
    return out


def global_counts(batch: dict, depth: int) -> dict:
    """The whole batch's normalisers: valid next-token targets, valid targets per MTP depth, sequences."""
    return dict(
        ce_count=jnp.sum(batch["loss_mask"]).astype(jnp.int32),
        mtp_count=jnp.stack([jnp.sum(future_targets(batch, k)[1]) for k in range(1, depth + 1)]).astype(jnp.int32)
        if depth
        else jnp.zeros((0,), jnp.int32),
        sequences=jnp.asarray(batch["tokens"].shape[0], jnp.int32),
    )


def stage_functions(
    graphdef: nnx.GraphDef, model_cfg: ModelConfig, cfg: TrainConfig, stages: int, *, split_backward: bool = False
):
    """``(fns, kind_of)`` for `make_engine`: the stage function of each kind and each stage's kind.

    ``split_backward`` (a schedule with W ops): the chunked output-head loss recomputes its logits in the
    backward rather than forming the head's gradient in the forward, which B would store for W (see
    `dsjax.train.losses.chunked_cross_entropy`).

    Stage function ``(stacked params, (stacked rest, stage index), shared params, (shared rest, global_counts),
    x, inputs_m) -> (y, loss, aux)`` with ``aux = dict(ce_sum, mtp_sum [D], balance, load [L_moe + D, e])``;
    ``inputs_m`` holds the micro-batch's `BATCH_KEYS` (its rows on this device).
    """
    depth = model_cfg.num_nextn_predict_layers
    n_moe, e, top_k = model_cfg.num_moe_layers, model_cfg.n_routed_experts, model_cfg.num_experts_per_tok
    key = split_stack(model_cfg)
    per_stage = (model_cfg.num_moe_layers or model_cfg.first_k_dense_replace) // stages
    kw = dict(attention=cfg.attention, dispatch=cfg.dispatch)
    loop = dict(remat=cfg.remat, layers=cfg.layers)

    def make(kind: int):
        first, last = kind in (FIRST, ONLY), kind in (LAST, ONLY)

        def fn(p, consts, s, sc, x, inp):
            rest, index = consts
            rest_shared, counts = sc
            model = nnx.merge(graphdef, s, p, rest_shared, rest)
            tokens, positions, seg = inp["tokens"], inp["positions"], inp["segment_ids"]
            b, t = tokens.shape
            mask = AttentionMask(positions, positions, seg, seg)
            cos, sin = model.rope(positions)

            def run(layer, x):
                return layer(x, cos, sin, mask, **kw)

            if first:
                x = embed_lookup(model.embed[...], tokens, model.dtype)
                if key == "moe_layers" and model.dense_layers is not None:
                    x, _ = scan_stack(model.dense_layers, x, lambda layer, x: (run(layer, x)[0], None), **loop)
            x = x.astype(model.dtype)
            routing = None
            if key == "moe_layers":
                x, routing = scan_stack(model.moe_layers, x, lambda layer, x: run(layer, x), **loop)
            else:
                x, _ = scan_stack(model.dense_layers, x, lambda layer, x: (run(layer, x)[0], None), **loop)
            valid = seg != 0
            aux = dict(
                ce_sum=jnp.zeros((), jnp.float32),
                mtp_sum=jnp.zeros((depth,), jnp.float32),
                balance=jnp.zeros((), jnp.float32),
                load=jnp.zeros((n_moe + depth, e), jnp.float32),
            )
            loss = jnp.zeros((), jnp.float32)
            share = b / counts["sequences"].astype(jnp.float32)  # balance is a mean over the whole batch's sequences

            def add_routing(aux, loss, routing, row):
                if routing is None:
                    return aux, loss
                if cfg.balance_alpha > 0:
                    bal = losses.sequence_balance_loss(routing, valid, e, top_k) * share
                    aux = {**aux, "balance": aux["balance"] + bal}
                    loss = loss + cfg.balance_alpha * bal
                load = jax.lax.dynamic_update_slice(aux["load"], losses.expert_load(routing, valid, e), (row, 0))
                return {**aux, "load": load}, loss

            aux, loss = add_routing(aux, loss, routing, index * per_stage)
            if not last:
                return x, loss, aux
            hidden = model.final_norm(x)
            batch = dict(inp)

            def xent(h, k):
                targets, tmask = future_targets(batch, k)
                if cfg.loss_chunk:
                    return losses.chunked_cross_entropy(
                        h, model.lm_head[...], targets, tmask, chunk=cfg.loss_chunk, grads_in_forward=not split_backward
                    )
                return losses.cross_entropy(model.logits(h), targets, tmask)

            ce_sum, _ = xent(hidden, 0)
            loss = loss + ce_sum / jnp.maximum(counts["ce_count"], 1)
            aux = {**aux, "ce_sum": ce_sum}
            if depth:
                shifted = jnp.stack([jnp.roll(tokens, -k, axis=1).at[:, t - k :].set(0) for k in range(1, depth + 1)])
                emb_next = embed_lookup(model.embed[...], shifted, model.dtype)

                def mtp_step(module, h_prev, emb):
                    h, normed, r = module(h_prev, emb, cos, sin, mask, **kw)
                    return h, (normed, r)

                _, (mtp_hidden, mtp_routing) = scan_stack(model.mtp, hidden, mtp_step, xs=emb_next, **loop)
                sums = jnp.stack([xent(mtp_hidden[k - 1], k)[0] for k in range(1, depth + 1)])
                mtp = jnp.sum(sums / jnp.maximum(counts["mtp_count"], 1)) / depth
                loss = loss + cfg.mtp_lambda * mtp
                aux, loss = add_routing({**aux, "mtp_sum": sums}, loss, mtp_routing, n_moe)
            return None, loss, aux

        return fn

    if stages == 1:
        return [make(ONLY)], [0]
    fns = [make(FIRST), make(MIDDLE), make(LAST)] if stages > 2 else [make(FIRST), make(LAST)]
    last_kind = len(fns) - 1
    return fns, [0] + [1] * (stages - 2) + [last_kind]


class PipelinedLoss:
    """The training loss of `dsjax.train.step` and its gradients, computed by running ``schedule`` on ``mesh``.

    ``loss_and_grad(params, rest, batch) -> (loss, aux, grads)``: ``params`` / ``rest`` are the model's
    ``nnx.Param`` state and the rest (routing biases), ``grads`` is laid out like ``params``; ``aux`` holds
    ``ce``, ``mtp``, ``balance``, ``load`` and ``tokens`` as the plain step's, and ``losses`` (``[M]``, each
    micro-batch's share of the loss). Call inside ``jax.jit`` and ``jax.set_mesh(mesh)``.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        schedule: Schedule,
        *,
        mesh: jax.sharding.Mesh,
        batch_rows: int,
        stage_axis: str = "stage",
    ):
        check_stages(model_cfg, schedule.stages)
        if batch_rows % schedule.microbatches:
            raise ValueError(f"batch of {batch_rows} rows does not split into {schedule.microbatches} micro-batches")
        self.model_cfg, self.cfg, self.schedule = model_cfg, cfg, schedule
        split_backward = any(op.kind == Kind.W for ops in schedule.ops for op in ops)
        fns, self.kind_of = stage_functions(graphdef, model_cfg, cfg, schedule.stages, split_backward=split_backward)
        x_struct = jax.ShapeDtypeStruct(
            (batch_rows // schedule.microbatches, cfg.seq_len, model_cfg.hidden_size), jnp.dtype(cfg.compute_dtype)
        )
        self.fns = fns
        self.engine = make_engine(schedule, fns, self.kind_of, mesh=mesh, x_struct=x_struct, stage_axis=stage_axis)

    def engine_args(self, params: nnx.State, rest: nnx.State, batch: dict):
        """The engine's arguments: stacked / shared parameters and state, and the micro-batch inputs."""
        S, M = self.schedule.stages, self.schedule.microbatches
        stacked, shared = split_state(params, self.model_cfg, S)
        rest_stacked, rest_shared = split_state(rest, self.model_cfg, S)
        inputs = microbatch_inputs(batch, M)
        counts = global_counts(batch, self.model_cfg.num_nextn_predict_layers)
        return stacked, (rest_stacked, jnp.arange(S)), shared, (rest_shared, counts), inputs

    def loss_and_grad(self, params: nnx.State, rest: nnx.State, batch: dict):
        """One pipelined forward and backward over the batch's micro-batches (see the class docstring)."""
        _, unsplit = jax.vjp(lambda p: split_state(p, self.model_cfg, self.schedule.stages), params)
        res: EngineResult = self.engine(*self.engine_args(params, rest, batch))
        (grads,) = unsplit((res.stage_grads, res.shared_grads))
        per_mb = sum_stages(res.losses)
        return jnp.sum(per_mb), self.metrics(res.aux, batch, per_mb), grads

    def metrics(self, aux: dict, batch: dict, per_mb: jax.Array) -> dict:
        """The plain step's loss terms from the summed stage ``aux``."""
        depth = self.model_cfg.num_nextn_predict_layers
        counts = global_counts(batch, depth)
        mtp = jnp.sum(aux["mtp_sum"] / jnp.maximum(counts["mtp_count"], 1)) / depth if depth else jnp.zeros(())
        out = dict(
            ce=aux["ce_sum"] / jnp.maximum(counts["ce_count"], 1),
            mtp=mtp,
            balance=aux["balance"],
            load=aux["load"] if self.model_cfg.num_moe_layers or depth else None,
            tokens=counts["ce_count"],
            losses=per_mb,
        )
        return out


def sequential_loss_and_grad(pl: PipelinedLoss, params: nnx.State, rest: nnx.State, batch: dict, *, jit=jax.jit):
    """The reference for `PipelinedLoss`: the plain loop over the same micro-batches and stages on one program
    per stage (losses), and per micro-batch one gradient of the whole chain, summed in micro-batch order.

    Returns ``(loss, per-micro-batch losses [M], grads laid out like params)``.
    """
    S, M = pl.schedule.stages, pl.schedule.microbatches
    stacked, consts, shared, shared_c, inputs = pl.engine_args(params, rest, batch)
    by_kind = [jit(functools.partial(_call, fn)) for fn in pl.fns]

    def pick(tree, i):
        return jax.tree.map(lambda a: a[i], tree)

    def chain(stacked, shared, inp):
        x, parts = None, []
        for s in range(S):
            x, loss, _ = pl.fns[pl.kind_of[s]](pick(stacked, s), pick(consts, s), shared, shared_c, x, inp)
            parts.append(loss)
        return sum_stages(jnp.stack(parts)[:, None])[0]

    grad_fn = jit(jax.grad(chain, argnums=(0, 1)))
    per_mb, total = [], None
    for m in range(M):
        inp = pick(inputs, m)
        x, parts = None, []
        for s in range(S):
            x, loss = by_kind[pl.kind_of[s]](pick(stacked, s), pick(consts, s), shared, shared_c, x, inp)
            parts.append(loss)
        per_mb.append(sum_stages(jnp.stack(parts)[:, None])[0])
        g = grad_fn(stacked, shared, inp)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    _, unsplit = jax.vjp(lambda p: split_state(p, pl.model_cfg, S), params)
    (grads,) = unsplit(total)
    per_mb = jnp.stack(per_mb)
    return jnp.sum(per_mb), per_mb, grads


def _call(fn: Callable, p, c, s, sc, x, inp):
    y, loss, _ = fn(p, c, s, sc, x, inp)
    return y, loss
