"""The pure, jit-compiled pretraining step ``(state, batch) -> (state, metrics)``.

Parameters are fp32 master weights; the forward casts them to the compute dtype. The routing bias is model
state outside the optimizer: it gets no gradient and no weight decay, and moves by the balancing rule after the
optimizer step. A step whose loss or gradient norm is not finite changes nothing but the skip counters.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsjax.config import ModelConfig
from dsjax.data.pipeline import future_targets
from dsjax.layers.moe import resolve_dispatch
from dsjax.model import Transformer, abstract_model
from dsjax.ops.ep import dropped_slots
from dsjax.ops.routing import Routing
from dsjax.sharding import Rules, state_shardings
from dsjax.train import losses
from dsjax.train.config import TrainConfig
from dsjax.train.optim import learning_rate


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps applied or skipped
    params: nnx.State  # nnx.Param variables (fp32 master weights)
    rest: nnx.State  # everything else: the routing biases
    opt_state: optax.OptState
    nonfinite_run: jax.Array  # consecutive skipped steps
    nonfinite_total: jax.Array


def optimizer_shardings(tx: optax.GradientTransformation, params):
    """The shardings of ``tx.init(params)``: every moment sharded exactly like its parameter, scalars (step
    counts) replicated. ``params`` leaves are arrays or ``ShapeDtypeStruct`` carrying a ``sharding``.

    ``jax.jit(tx.init)`` alone leaves the choice to the partitioner, which replicates the moments (zeros need no
    input): on a 512-chip slice that is the difference between fitting and not. An optimizer whose state is
    not shaped like the parameters (``optax.flatten``) is refused: its moments cannot be placed like them."""
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    first = jax.tree.leaves(param_shardings)[0]
    scalar = NamedSharding(first.mesh, PartitionSpec()) if isinstance(first, NamedSharding) else first
    try:
        return optax.tree_map_params(
            tx,
            lambda _, sharding: sharding,
            jax.eval_shape(tx.init, params),
            param_shardings,
            transform_non_params=lambda _: scalar,
            is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
        )
    except ValueError as e:
        raise ValueError(
            f"cannot shard this optimizer's state like the parameters ({e}); an optimizer over flattened "
            "parameters (optax.flatten) is for single-device states"
        ) from e


def _check_trainable(params) -> None:
    fp8 = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(params) if v.dtype.itemsize == 1]
    if fp8:
        raise ValueError(
            f"parameters stored in fp8 cannot be trained ({fp8[0]}, ...): load float weights "
            "(from_pretrained(..., dequantize=True)) and set ModelConfig.fp8 for FP8 GEMMs"
        )


def init_train_state(model: Transformer, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """Split ``model`` into graphdef + state and initialise the optimizer, each moment placed like its
    parameter (see :func:`optimizer_shardings`)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    _check_trainable(params)
    # Parameters on one device need no placement (and an optimizer over flattened parameters, optax.flatten,
    # has no per-parameter moments to place).
    one_device = all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(params))
    opt_state = jax.jit(tx.init, out_shardings=None if one_device else optimizer_shardings(tx, params))(params)
    zeros = [jnp.zeros((), jnp.int32) for _ in range(3)]  # distinct buffers: the state is donated
    return graphdef, TrainState(zeros[0], params, rest, opt_state, zeros[1], zeros[2])


def abstract_train_state(
    model_cfg: ModelConfig, tx_for_params, mesh: Mesh, rules: Rules, *, dtype=jnp.bfloat16
) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
    """The train state of ``model_cfg`` as ``ShapeDtypeStruct`` leaves with their shardings on ``mesh`` (fp32
    master weights, moments like the parameters, scalars replicated): what :func:`init_train_state` would build,
    with no memory, for compiling the step ahead of time for any model size. ``tx_for_params(params) -> tx``
    builds the optimizer (e.g. ``functools.partial(make_optimizer, train_cfg)``)."""
    graphdef, params, rest = nnx.split(abstract_model(model_cfg, dtype=dtype, param_dtype=jnp.float32), nnx.Param, ...)

    def placed(state):
        shardings = state_shardings(state, mesh, rules)
        return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings)

    params, rest = placed(params), placed(rest)
    tx = tx_for_params(params)
    opt_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(tx.init, params),
        optimizer_shardings(tx, params),
    )
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    return graphdef, TrainState(scalar, params, rest, opt_state, scalar, scalar), tx


def _concat_routing(a: Routing | None, b: Routing | None) -> Routing | None:
    if a is None or b is None:
        return a if b is None else b
    return Routing(*(jnp.concatenate([x, y]) for x, y in zip(a, b)))


def make_train_step(
    graphdef: nnx.GraphDef, model_cfg: ModelConfig, cfg: TrainConfig, tx, *, forward_fn=None, language_path=()
):
    """The step function (not yet jitted; see :func:`jit_train_step`).

    Hooks for a model that wraps the language model (e.g. :class:`dsjax.vision.VisionLanguageModel`):
    ``forward_fn(model, batch, **options) -> ModelOutput`` replaces ``model.forward(batch["tokens"], **options)``,
    and ``language_path`` names the language model inside it (its output head and routing biases), e.g.
    ``("language",)``. ``model_cfg`` is the language model's config.
    """
    depth = model_cfg.num_nextn_predict_layers

    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        seg = batch["segment_ids"]
        out = (forward_fn or _forward_tokens)(
            model,
            batch,
            positions=batch["positions"],
            segment_ids=seg,
            return_mtp=depth > 0,
            dispatch=cfg.dispatch,
            attention=cfg.attention,
            remat=cfg.remat,
            layers=cfg.layers,
            compute_logits=not cfg.loss_chunk,
        )
        if cfg.loss_chunk:
            head = _at(model, language_path).lm_head[...]

            def xent(hidden, k):
                return losses.chunked_cross_entropy(hidden, head, *future_targets(batch, k), chunk=cfg.loss_chunk)

            heads = [out.hidden] + ([out.mtp_hidden[k] for k in range(depth)] if depth else [])
        else:

            def xent(logits, k):
                return losses.cross_entropy(logits, *future_targets(batch, k))

            heads = [out.logits] + ([out.mtp_logits[k] for k in range(depth)] if depth else [])
        ce_sum, count = xent(heads[0], 0)
        ce = ce_sum / jnp.maximum(count, 1)
        mtp = jnp.zeros(())
        for k in range(1, depth + 1):  # depth k predicts the token k + 1 places ahead
            s, n = xent(heads[k], k)
            mtp += s / jnp.maximum(n, 1) / depth
        valid = seg != 0
        routing = _concat_routing(out.routing, out.mtp_routing)
        balance = jnp.zeros(())
        load = None
        if routing is not None:
            e, k = model_cfg.n_routed_experts, model_cfg.num_experts_per_tok
            if cfg.balance_alpha > 0:  # its one-hot over [layers, tokens, k, experts] is not free
                balance = losses.sequence_balance_loss(routing, valid, e, k)
            load = losses.expert_load(routing, valid, e)
        loss = ce + cfg.mtp_lambda * mtp + cfg.balance_alpha * balance
        aux = dict(ce=ce, mtp=mtp, balance=balance, load=load, tokens=count)
        if routing is not None:
            dropped = _dropped_fraction(routing, model_cfg, cfg, seg.size)
            if dropped is not None:
                aux["moe_dropped"] = dropped
        return loss, aux

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.rest, batch)
        return apply_gradients(state, loss, aux, grads, tx, model_cfg, cfg, language_path=language_path)

    return step


def apply_gradients(
    state: TrainState,
    loss: jax.Array,
    aux: dict,
    grads,
    tx: optax.GradientTransformation,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    language_path=(),
) -> tuple[TrainState, dict]:
    """The update half of a train step, shared by every way of computing ``(loss, aux, grads)`` (the plain
    step, the pipelined one): the optimizer step, the routing-bias rule from ``aux["load"]``, non-finite
    skipping (a step whose loss or gradient norm is not finite changes nothing but the counters) and the
    metrics. ``aux`` holds ``ce``, ``mtp``, ``balance``, ``tokens``, ``load`` (or None) and optionally
    ``moe_dropped``."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rest = state.rest
    if model_cfg.has_routing_bias and cfg.bias_gamma > 0 and aux["load"] is not None:
        rest = _update_biases(rest, aux["load"], model_cfg, cfg.bias_gamma, language_path)

    def keep_if_finite(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = TrainState(
        step=state.step + 1,
        params=keep_if_finite(params, state.params),
        rest=keep_if_finite(rest, state.rest),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
    )
    metrics = dict(
        loss=loss,
        ce=aux["ce"],
        mtp=aux["mtp"],
        balance=aux["balance"],
        grad_norm=grad_norm,
        lr=learning_rate(cfg)(state.step),
        finite=finite,
        tokens=aux["tokens"],
    )
    if aux["load"] is not None:
        metrics["load"] = aux["load"]
    if "moe_dropped" in aux:
        metrics["moe_dropped"] = aux["moe_dropped"]
    return new_state, metrics


def _dropped_fraction(routing: Routing, model_cfg: ModelConfig, cfg: TrainConfig, tokens: int):
    """Share of (token, expert) slots the expert-parallel layers dropped for capacity (None when dropless)."""
    mesh = jax.sharding.get_abstract_mesh()
    if model_cfg.moe_capacity_factor is None or mesh.empty or mesh.shape.get("expert", 1) == 1:
        return None
    if resolve_dispatch(cfg.dispatch, tokens, model_cfg) != "ep":
        return None
    token_shards = mesh.shape["expert"] * mesh.shape.get("data", 1)
    count = jax.vmap(
        lambda experts_mk: dropped_slots(
            experts_mk,
            num_experts=model_cfg.n_routed_experts,
            expert_shards=mesh.shape["expert"],
            token_shards=token_shards,
            capacity_factor=model_cfg.moe_capacity_factor,
            exchange=model_cfg.moe_exchange,
        )
    )(routing.experts_mk)
    # float: a V3 step routes ~8e9 slots over its layers, past int32
    return count.astype(jnp.float32).sum() / float(routing.experts_mk.size)


def _forward_tokens(model, batch, **options):
    return model.forward(batch["tokens"], **options)


def _at(tree, path):
    for key in path:
        tree = getattr(tree, key) if isinstance(tree, nnx.Module) else tree[key]
    return tree


def _update_biases(rest: nnx.State, load_le: jax.Array, model_cfg: ModelConfig, gamma: float, path=()) -> nnx.State:
    """Apply the sign rule to the MoE stack's biases (first rows of ``load``) and the MTP layers' (last rows) of
    the language model at ``path`` in ``rest``."""
    n_moe = model_cfg.num_moe_layers
    rest = jax.tree.map(lambda x: x, rest)  # a copy to update
    lang = _at(rest, path)
    if n_moe:
        var = lang["moe_layers"]["ffn"]["routing_bias"]
        var.set_value(losses.bias_update(var.get_value(), load_le[:n_moe], gamma))
    if model_cfg.num_nextn_predict_layers:
        var = lang["mtp"]["layer"]["ffn"]["routing_bias"]
        var.set_value(losses.bias_update(var.get_value(), load_le[n_moe:], gamma))
    return rest


def jit_train_step(step, state_shardings=None, batch_shardings=None):
    """``jax.jit`` with explicit shardings and the state donated (its buffers are reused for the new state)."""
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
