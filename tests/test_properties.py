"""Property tests of the model and its ops (chex assertions, hypothesis over small fixed shape sets)."""

import contextlib
import io

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.ad_checkpoint import print_saved_residuals
from jaxpr_eqns import all_eqns

import dsjax
from dsjax.layers.moe import MoE
from dsjax.ops.attention import attention_mask, mla_absorbed, mla_naive
from dsjax.ops.moe import moe_blocked, moe_dense, moe_ragged
from dsjax.ops.routing import route

CFG = dsjax.ModelConfig.tiny(initializer_range=0.1)
HYP = settings(max_examples=12, deadline=None)


@pytest.fixture(scope="module")
def model():
    m = dsjax.create_model(CFG, seed=1)
    bias = m.moe_layers.ffn.routing_bias
    bias.set_value(0.1 * jax.random.normal(jax.random.key(5), bias.get_value().shape))
    return m


def test_causality_by_gradient(model):
    """d logits[t] / d input[s] is exactly zero for every s > t (and not zero for s <= t)."""
    t = 9
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (1, t)), jnp.int32)
    emb = model.embed[...][tokens]
    for attention in ("naive", "absorbed"):

        @jax.jit
        def grad_at(pos, emb, attention=attention):
            logits_at = lambda e: model.forward(tokens, input_embeddings=e, attention=attention).logits[0, pos].sum()
            return jax.grad(logits_at)(emb)

        for pos in (0, 4, t - 1):
            grad = grad_at(pos, emb)
            future = np.abs(np.asarray(grad[0, pos + 1 :]))
            past = np.abs(np.asarray(grad[0, : pos + 1])).sum(-1)
            assert future.max(initial=0.0) == 0.0, f"{attention}: position {pos} depends on the future"
            assert (past > 0).all()


def test_segments_isolate_documents(model):
    """With segment ids, a token's logits ignore other documents in the packed row."""
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, CFG.vocab_size, (1, 6)), rng.integers(0, CFG.vocab_size, (1, 5))
    packed = jnp.asarray(np.concatenate([a, b], 1), jnp.int32)
    segments = jnp.asarray([[1] * 6 + [2] * 5])
    positions = jnp.asarray([list(range(6)) + list(range(5))])
    out = model(packed, segment_ids=segments, positions=positions)
    alone = model(jnp.asarray(b, jnp.int32))
    chex.assert_trees_all_close(out[:, 6:], alone, atol=1e-5, rtol=1e-5)


@nnx.jit
def _moe_apply(moe, x):
    return moe(x)[0]


@given(m=st.sampled_from([7, 16]), seed=st.integers(0, 2**16))
@HYP
def test_moe_permutation_equivariant(m, seed):
    moe = nnx.eval_shape(lambda: MoE(CFG, rngs=nnx.Rngs(0), param_dtype=jnp.float32))
    graphdef, state = nnx.split(moe)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    state = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])
    moe = nnx.merge(graphdef, state)
    x = jax.random.normal(jax.random.key(seed), (1, m, CFG.hidden_size))
    perm = jax.random.permutation(jax.random.key(seed + 1), m)
    y, y_perm = _moe_apply(moe, x), _moe_apply(moe, x[:, perm])
    chex.assert_trees_all_close(y_perm, y[:, perm], atol=1e-5, rtol=1e-5)


@jax.jit
def _all_dispatch(*args):
    # block=None: the automatic size, down to 1-row blocks when there are fewer slots than experts (decoding)
    return moe_ragged(*args), moe_dense(*args), moe_blocked(*args, block=4), moe_blocked(*args)


@given(
    m=st.sampled_from([1, 2, 32]),
    e=st.sampled_from([1, 8]),
    k=st.sampled_from([1, 3]),
    skew=st.booleans(),
    seed=st.integers(0, 2**16),
)
@HYP
def test_ragged_and_blocked_dispatch_equal_dense(m, e, k, skew, seed):
    k = min(k, e)
    keys = jax.random.split(jax.random.key(seed), 5)
    d, f = 12, 10
    x = jax.random.normal(keys[0], (m, d))
    logits = jax.random.normal(keys[1], (m, e)) + (jnp.arange(e) == 0)[None, :] * (10.0 if skew else 0.0)
    experts = jax.lax.top_k(logits, k)[1]  # with skew, expert 0 gets every token and others may get none
    weights = jax.random.uniform(keys[2], (m, k))
    w_gate, w_up = (jax.random.normal(kk, (e, d, f)) * 0.3 for kk in keys[3:5])
    w_down = jax.random.normal(keys[4], (e, f, d)) * 0.3
    ragged, dense, blocked, blocked_auto = _all_dispatch(x, weights, experts, w_gate, w_up, w_down)
    chex.assert_trees_all_close(ragged, dense, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(blocked, dense, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(blocked_auto, dense, atol=1e-5, rtol=1e-5)


@jax.jit
def _both_attention(*args):
    n = args[0].shape[-1]
    return mla_naive(*args, 0.3, nope_dim=n), mla_absorbed(*args, 0.3, nope_dim=n)


@given(t=st.sampled_from([1, 11]), segmented=st.booleans(), seed=st.integers(0, 2**16))
@HYP
def test_absorbed_equals_naive(t, segmented, seed):
    b, h, n, r, c, v = 2, 3, 8, 4, 6, 5
    ks = jax.random.split(jax.random.key(seed), 5)
    q_nope, q_pe = jax.random.normal(ks[0], (b, t, h, n)), jax.random.normal(ks[1], (b, t, h, r))
    c_kv, k_pe = jax.random.normal(ks[2], (b, t, c)), jax.random.normal(ks[3], (b, t, r))
    wkv_b = jax.random.normal(ks[4], (c, h, n + v)) * 0.5
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    seg = (pos >= t // 2).astype(jnp.int32) if segmented else None
    mask = attention_mask(pos, pos, seg, seg)
    naive, absorbed = _both_attention(q_nope, q_pe, c_kv, k_pe, wkv_b, mask)
    chex.assert_shape(naive, (b, t, h, v))
    chex.assert_trees_all_close(absorbed, naive, atol=1e-5, rtol=1e-5)


def test_remat_and_layer_loops_match(model):
    """Rematerialisation and the layer loop (scan vs unrolled) change the schedule, not the result."""
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 8)), jnp.int32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, remat, layers):
        m = nnx.merge(graphdef, params, rest)
        out = m.forward(tokens, remat=remat, layers=layers, return_mtp=True)
        return jnp.mean(out.logits**2) + jnp.mean(out.mtp_logits**2) + jnp.mean(out.routing.weights_mk**2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))
    base_loss, base_grads = value_and_grad(params, "none", "unroll")
    for remat, layers in (("none", "scan"), ("full", "unroll"), ("dots", "scan"), ("offload_attn", "scan")):
        value, grads = value_and_grad(params, remat, layers)
        chex.assert_trees_all_close(value, base_loss, rtol=1e-6)
        chex.assert_trees_all_close(grads, base_grads, atol=1e-7, rtol=1e-5)


def test_offload_policies_save_their_named_tensors_to_host(model):
    """``offload`` keeps each layer's input in host memory and nothing else; ``offload_attn`` also the attention
    block's output: one and two host residuals per decoder layer (MTP module included)."""
    tokens = jnp.zeros((2, 8), jnp.int32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    layers = CFG.num_hidden_layers + CFG.num_nextn_predict_layers

    def residuals(remat):
        def loss(params):
            out = nnx.merge(graphdef, params, rest).forward(tokens, remat=remat, layers="unroll", return_mtp=True)
            return jnp.mean(out.logits**2) + jnp.mean(out.mtp_logits**2)

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            print_saved_residuals(loss, params)
        return buf.getvalue().splitlines()

    for remat, per_layer in (("offload", 1), ("offload_attn", 2)):
        host = [line for line in residuals(remat) if "<host>" in line]
        assert len(host) == per_layer * layers, host
        assert all(f"[2,8,{CFG.hidden_size}]" in line for line in host)


def test_v3_routing_rules():
    """Weights sum to routed_scaling_factor, experts come from kept groups, bias moves selection only."""
    m, e = 64, CFG.n_routed_experts
    x = jax.random.normal(jax.random.key(0), (m, CFG.hidden_size))
    gate = jax.random.normal(jax.random.key(1), (CFG.hidden_size, e)) * 0.2
    plain = route(x, gate, jnp.zeros((e,)), CFG)
    chex.assert_trees_all_close(plain.weights_mk.sum(-1), jnp.full((m,), CFG.routed_scaling_factor), rtol=1e-6)
    groups = np.asarray(plain.experts_mk) // (e // CFG.n_group)
    assert all(len(set(row)) <= CFG.topk_group for row in groups)
    # A huge bias on expert 3 forces it into every selection, but its weight still comes from the raw score.
    bias = jnp.zeros((e,)).at[3].set(100.0)
    biased = route(x, gate, bias, CFG)
    assert (np.asarray(biased.experts_mk) == 3).any(-1).all()
    raw = np.asarray(biased.scores_me)[:, 3]
    w3 = np.asarray(biased.weights_mk)[np.asarray(biased.experts_mk) == 3]
    sums = np.take_along_axis(np.asarray(biased.scores_me), np.asarray(biased.experts_mk), 1).sum(-1)
    np.testing.assert_allclose(w3, raw / sums * CFG.routed_scaling_factor, rtol=1e-5)


def test_full_size_parameter_counts():
    """jax.eval_shape of the full presets: V3 671.0B (main model, without MTP) and V2-Lite 15.7B."""
    v3 = dsjax.abstract_model(dsjax.ModelConfig.deepseek_v3())
    assert round(dsjax.count_params(v3) / 1e9, 1) == 671.0
    assert round(dsjax.count_params(v3, include_mtp=True) / 1e9, 1) == 682.6  # + 11.6B MTP (emb/head shared)
    assert round(dsjax.count_params(dsjax.abstract_model(dsjax.ModelConfig.deepseek_v2_lite())) / 1e9, 1) == 15.7
    assert round(dsjax.count_params(dsjax.abstract_model(dsjax.ModelConfig.deepseek_v2())) / 1e9, 1) == 235.7


def test_mtp_modules_rematerialised(model):
    """``remat`` covers the MTP modules as well as the layers: each is a full MoE layer whose residuals would
    otherwise all be kept for the backward (one checkpointed scan body more with ``return_mtp``)."""
    tokens = jnp.zeros((1, 8), jnp.int32)

    def checkpoints(jaxpr) -> int:
        return sum(eqn.primitive.name in ("checkpoint", "remat", "remat2") for eqn in all_eqns(jaxpr))

    def count(return_mtp):
        def fn(m):
            return m.forward(tokens, remat="full", layers="scan", return_mtp=return_mtp)

        return checkpoints(jax.make_jaxpr(fn)(model).jaxpr)

    assert count(True) == count(False) + 1
