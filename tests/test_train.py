"""Pretraining: losses against hand computation, bias rule, non-finite skipping, sharded == single device,
killed-and-resumed == uninterrupted, and the loss falling below the corpus's unigram entropy."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsjax
from dsjax.ops.routing import Routing
from dsjax.pipeline.residuals import data_dependent
from dsjax.sharding import DEFAULT_RULES, FSDP_RULES, make_mesh
from dsjax.train import losses
from dsjax.train.config import ConfigError, load_run_config
from dsjax.train.loop import TrainingDiverged, train
from dsjax.train.metrics import read_jsonl
from dsjax.train.optim import make_optimizer
from dsjax.train.step import init_train_state, jit_train_step, make_train_step

SMALL = [  # a few seconds per run on 2 CPU cores
    "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=96",
    "model.moe_intermediate_size=32", "model.n_routed_experts=8", "model.num_experts_per_tok=2",
    "model.n_group=2", "model.topk_group=1", "data.num_docs=200", "train.batch_size=8", "train.seq_len=32",
    "train.log_every=1",
]  # fmt: skip


def test_balance_loss_matches_hand_computation():
    # One layer, one sequence of T=3 tokens, N_r=4 experts, K_r=2.
    scores = np.array([[0.9, 0.1, 0.5, 0.5], [0.2, 0.8, 0.6, 0.4], [0.7, 0.3, 0.1, 0.9]], np.float32)
    experts = np.array([[0, 2], [1, 2], [3, 0]])
    routing = Routing(jnp.ones((1, 3, 2)), jnp.asarray(experts)[None], jnp.asarray(scores)[None])
    counts = np.array([2, 1, 2, 1])  # expert 0: tokens 0 and 2, ...
    f = 4 / (2 * 3) * counts
    p = (scores / scores.sum(-1, keepdims=True)).mean(0)
    expected = float((f * p).sum())
    got = losses.sequence_balance_loss(routing, jnp.ones((1, 3), bool), num_experts=4, top_k=2)
    assert got == pytest.approx(expected, rel=1e-6)
    # Padding tokens are excluded: masking token 2 equals a 2-token sequence.
    masked = losses.sequence_balance_loss(routing, jnp.asarray([[True, True, False]]), num_experts=4, top_k=2)
    f2 = 4 / (2 * 2) * np.array([1, 1, 2, 0])
    assert masked == pytest.approx(float((f2 * (scores[:2] / scores[:2].sum(-1, keepdims=True)).mean(0)).sum()))


def test_bias_update_direction():
    load = jnp.asarray([[10.0, 0.0, 5.0, 5.0]])
    new = losses.bias_update(jnp.zeros((1, 4)), load, gamma=0.001)
    np.testing.assert_allclose(np.asarray(new), [[-0.001, 0.001, 0.0, 0.0]])  # overloaded down, idle up


def _setup(run, mesh=None, rules=None):
    kw = {} if mesh is None else dict(mesh=mesh, rules=rules)
    model = dsjax.create_model(run.model, seed=0, **kw)
    tx = make_optimizer(run.train, nnx.state(model, nnx.Param))
    graphdef, state = init_train_state(model, tx)
    return graphdef, state, tx


def _batches(run, n):
    from dsjax.data.corpus import default_corpus
    from dsjax.data.pipeline import make_pretrain_iterator
    from dsjax.data.tokenizer import ByteTokenizer

    it = make_pretrain_iterator(
        default_corpus(num_docs=100), ByteTokenizer(), batch_size=run.train.batch_size, seq_len=run.train.seq_len,
        seed=0, fim_rate=0.5,
    )  # fmt: skip
    return [next(it) for _ in range(n)]


def test_nonfinite_step_changes_nothing():
    run = load_run_config("configs/train_tiny.yaml", SMALL)
    graphdef, state, tx = _setup(run)
    step = jit_train_step(make_train_step(graphdef, run.model, run.train, tx))
    batch = _batches(run, 1)[0]
    before = jax.device_get(state)
    poisoned = state._replace(params=jax.tree.map(lambda x: x, state.params))
    poisoned.params["lm_head"].set_value(poisoned.params["lm_head"].get_value().at[0, 0].set(jnp.inf))
    poisoned_host = jax.device_get(poisoned)
    after, metrics = step(poisoned, batch)
    assert not bool(metrics["finite"])
    assert int(after.step) == 1 and int(after.nonfinite_run) == 1 and int(after.nonfinite_total) == 1
    chex.assert_trees_all_equal(jax.device_get(after.params), poisoned_host.params)
    chex.assert_trees_all_equal(jax.device_get(after.opt_state), before.opt_state)
    chex.assert_trees_all_equal(jax.device_get(after.rest), before.rest)


@pytest.mark.parametrize(("dispatch", "fsdp"), [("ep", False), ("blocked", True)])
def test_sharded_step_equals_single_device(dispatch, fsdp):
    run = load_run_config("configs/train_tiny.yaml", [*SMALL, f"train.dispatch={dispatch}"])
    batches = _batches(run, 2)
    graphdef, state, tx = _setup(run)
    ref_train = dataclasses.replace(run.train, dispatch="ragged")
    ref_step = jit_train_step(make_train_step(graphdef, run.model, ref_train, tx))
    ref_metrics = []
    for b in batches:
        state, m = ref_step(state, b)
        ref_metrics.append(jax.device_get(m))
    ref_state = jax.device_get(state)

    mesh = make_mesh(data=2, expert=4)
    with jax.set_mesh(mesh):
        graphdef, sstate, tx = _setup(run, mesh, FSDP_RULES if fsdp else DEFAULT_RULES)
        if fsdp:
            spec = jax.sharding.PartitionSpec(None, ("data", "expert"))  # FSDP over all 8 devices
            assert sstate.params["embed"].get_value().sharding.spec == spec
            assert sstate.opt_state[1][0].mu["embed"].get_value().sharding.spec == spec
        shardings = jax.tree.map(lambda x: x.sharding, sstate)
        batch_sharding = jax.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "expert")))
        step = jit_train_step(make_train_step(graphdef, run.model, run.train, tx), shardings, batch_sharding)
        for b, ref in zip(batches, ref_metrics):
            sstate, m = step(sstate, b)
            for key in ("loss", "ce", "mtp", "balance", "grad_norm"):
                assert float(m[key]) == pytest.approx(float(ref[key]), rel=1e-5, abs=1e-6), key
            np.testing.assert_array_equal(np.asarray(m["load"]), np.asarray(ref["load"]))
    chex.assert_trees_all_close(jax.device_get(sstate.params), ref_state.params, atol=2e-5, rtol=1e-4)
    chex.assert_trees_all_close(jax.device_get(sstate.rest), ref_state.rest, atol=1e-6)


def test_divergence_stops_the_run_and_checkpoints_stay_finite(tmp_path):
    sets = [*SMALL, "train.steps=20", "train.lr=1e30", "train.warmup_steps=1", "train.max_nonfinite_run=3",
            "train.checkpoint_every=2"]  # fmt: skip
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        train(load_run_config("configs/train_tiny.yaml", sets), str(tmp_path), resume=False, progress=False)
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["finite"] for r in records][-3:] == [0.0, 0.0, 0.0]
    from dsjax.train.checkpoint import TrainCheckpointer

    run = load_run_config("configs/train_tiny.yaml", sets)
    _, state, _ = _setup(run)
    ckpt = TrainCheckpointer(tmp_path / "checkpoints", keep=3, every=2)
    restored, _ = ckpt.restore(state)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


def test_bad_run_configs_name_the_field():
    with pytest.raises(ConfigError, match="train.lr"):
        load_run_config("configs/train_tiny.yaml", ["train.lr=fast"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_run_config("configs/train_tiny.yaml", ["train.batch_size=6", "mesh.data=4"])
    with pytest.raises(ConfigError, match="unknown fields"):
        load_run_config("configs/train_tiny.yaml", ["train.learning_rate=1"])
    with pytest.raises(ConfigError, match="train.layers"):
        load_run_config("configs/train_tiny.yaml", ["train.layers=unrolled"])


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    """SIGKILL a real training process after its second checkpoint, resume it, and compare every logged loss
    bit for bit with a run that was never interrupted."""
    sets = [*SMALL, "train.steps=40", "train.checkpoint_every=5", "train.keep_checkpoints=2"]
    args = [a for s in sets for a in ("--set", s)]
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "train.py")
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    subprocess.run([sys.executable, script, "--quiet", "--out", str(whole), *args], check=True, env=env,
                   capture_output=True, timeout=300)  # fmt: skip
    proc = subprocess.Popen([sys.executable, script, "--quiet", "--out", str(parts), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not (parts / "checkpoints" / "10").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in read_jsonl(str(parts / "metrics.jsonl")))
    assert killed_at < 40, "the run finished before it could be killed; make it longer"
    subprocess.run([sys.executable, script, "--quiet", "--out", str(parts), *args], check=True, env=env,
                   capture_output=True, timeout=300)  # fmt: skip
    a, b = read_jsonl(str(whole / "metrics.jsonl")), read_jsonl(str(parts / "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(1, 41))
    for ra, rb in zip(a, b):
        for key in ("loss", "ce", "mtp", "balance", "grad_norm"):
            assert ra[key] == rb[key], (ra["step"], key)
        assert ra["load"] == rb["load"]
    assert (
        json.loads((whole / "summary.json").read_text())["final_loss"]
        == json.loads((parts / "summary.json").read_text())["final_loss"]
    )


@pytest.mark.slow
def test_loss_falls_below_unigram_entropy(tmp_path):
    run = load_run_config("configs/train_tiny.yaml", [*SMALL, "train.steps=200", "train.log_every=20",
                                                        "data.num_docs=1000"])  # fmt: skip
    summary = train(run, str(tmp_path), resume=False, progress=False)
    assert summary.final_ce < 0.75 * summary.unigram_entropy, summary
    assert (tmp_path / "loss.png").exists() and (tmp_path / "expert_load.png").exists()
    assert any((tmp_path / "tensorboard").iterdir())


def test_capacity_dropping_is_reported_by_the_step():
    """Expert parallelism with a capacity factor: the step reports the share of dropped slots, computed from
    the routing alone; it equals what the layer drops (tests/test_ep.py) and is absent when dropless."""
    from dsjax.ops.ep import dropped_slots

    run = load_run_config("configs/train_tiny.yaml", [*SMALL, "train.dispatch=ep", "model.moe_capacity_factor=0.5"])
    batch = _batches(run, 1)[0]
    mesh = make_mesh(data=2, expert=4)
    with jax.set_mesh(mesh):
        graphdef, state, tx = _setup(run, mesh, DEFAULT_RULES)
        out = jax.jit(  # jitted: the eager forward over 8 simulated devices was most of this test's time
            lambda params, rest: nnx.merge(graphdef, params, rest).forward(
                batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"], return_mtp=True,
                dispatch="ep",
            )
        )(state.params, state.rest)  # fmt: skip
        step = jit_train_step(make_train_step(graphdef, run.model, run.train, tx))
        _, metrics = step(state, batch)  # donates the state: forward first
    experts = jnp.concatenate([out.routing.experts_mk, out.mtp_routing.experts_mk])
    count = sum(
        int(dropped_slots(e, num_experts=8, expert_shards=4, token_shards=8, capacity_factor=0.5, exchange="auto"))
        for e in experts
    )
    assert 0 < float(metrics["moe_dropped"]) == pytest.approx(count / experts.size)
    assert bool(metrics["finite"])


def test_chunked_output_head_loss_equals_whole_logits():
    """train.loss_chunk: the output head and cross-entropy a chunk of tokens at a time (incl. a ragged last
    chunk), main and MTP losses: same loss, metrics and update as with the whole logits."""
    run = load_run_config("configs/train_tiny.yaml", SMALL)
    batch = _batches(run, 1)[0]
    results = []
    for chunk in (0, 24):
        tc = dataclasses.replace(run.train, loss_chunk=chunk)
        graphdef, state, tx = _setup(run)
        new_state, metrics = jit_train_step(make_train_step(graphdef, run.model, tc, tx))(state, batch)
        results.append((jax.device_get(metrics), jax.device_get(new_state.params)))
    (whole, whole_params), (chunked, chunked_params) = results
    for key in ("loss", "ce", "mtp", "grad_norm"):
        assert float(chunked[key]) == pytest.approx(float(whole[key]), rel=1e-5), key
    chex.assert_trees_all_close(chunked_params, whole_params, atol=1e-6, rtol=1e-5)


def test_chunked_cross_entropy_chunk_longer_than_sequence():
    """A chunk longer than the sequence computes the sequence's logits once, unpadded (its scan has one step of
    the sequence's length), and the same loss as the whole logits."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 16, (2, 6)), jnp.int32)
    mask = jnp.asarray(rng.random((2, 6)) < 0.8)
    whole, _ = losses.cross_entropy(h @ head, targets, mask)
    chunked, count = losses.chunked_cross_entropy(h, head, targets, mask, chunk=64)
    assert float(chunked) == pytest.approx(float(whole), rel=1e-6) and int(count) == int(mask.sum())
    jaxpr = str(jax.make_jaxpr(lambda h: losses.chunked_cross_entropy(h, head, targets, mask, chunk=64))(h))
    assert "2,64" not in jaxpr and "2,6,16" in jaxpr  # logits [rows, 6, vocab], not [rows, 64, vocab]
    assert jaxpr.count("dot_general") == 1  # without differentiation: the logits alone, no gradients formed


@pytest.mark.parametrize("chunk, temperature", [(0, 1.0), (0, 0.7), (4, 0.7)])
def test_token_logprobs_equal_autodiffs_log_softmax(chunk, temperature):
    """The RL head's written-out backward (``head_logprobs``): log-probs, entropy and the gradients of a weighted
    sum of log-probs (hidden and head) equal autodiff through ``log_softmax``, whole or in chunks (a ragged last
    one), at a temperature; the entropy passes no gradient (a metric, stop_gradient in the reference)."""
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 10, 8)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(8, 24)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 24, (2, 10)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(2, 10)), jnp.float32)

    def reference(h, head):
        logp_all = jax.nn.log_softmax((h @ head) / temperature, axis=-1)
        logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
        return logp, jax.lax.stop_gradient(-jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1))

    def ours(h, head):
        return losses.chunked_token_logprobs(h, head, targets, chunk=chunk, temperature=temperature)

    def outputs(fn):
        def objective(h, w):
            logp, entropy = fn(h, w)
            return jnp.sum(weights * logp) + jnp.sum(entropy)

        return (*fn(h, head), jax.grad(objective, argnums=(0, 1))(h, head))

    (logp, entropy, grads), expected = outputs(ours), outputs(reference)
    chex.assert_trees_all_close((logp, entropy, grads), expected, atol=1e-5, rtol=1e-5)


def test_head_logprobs_backward_keeps_fp32_precision_for_bf16_models():
    """With bf16 hidden states and head, the written-out backward is as precise as autodiff's (both keep the fp32
    cotangent through the two products): gradients within 1e-4 of the float32 computation's (rounded to bf16),
    relative to their largest entry. Rounding dlogits to bf16 first gave 4e-3."""
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(size=(1, 256, 64)), jnp.bfloat16)
    head = jnp.asarray(rng.normal(size=(64, 96)) * 0.1, jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 96, (1, 256)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(1, 256)), jnp.float32)

    def grads(fn, h, w):
        return jax.grad(lambda h, w: jnp.sum(weights * fn(h, w)), argnums=(0, 1))(h, w)

    ours = grads(lambda h, w: losses.head_logprobs(h, w, targets, 1.0)[0], h, head)
    # The reference: the same function computed in float32, its gradients rounded to bf16 once at the end.
    f32 = lambda h, w: losses.head_logprobs(h.astype(jnp.float32), w.astype(jnp.float32), targets, 1.0)[0]
    ref = grads(f32, h, head)
    for got, want in zip(ours, ref):
        assert got.dtype == want.dtype == jnp.bfloat16
        got, want = got.astype(jnp.float32), want.astype(jnp.float32)
        assert float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max()) < 1e-4


def test_chunked_cross_entropy_gradients_without_recomputed_logits():
    """The chunked loss forms each chunk's gradients in the forward pass: its gradients (hidden and head, a
    ragged last chunk and masked targets included) equal the whole logits' ones, and the program has 3
    head-sized matmuls per chunk (logits, d hidden, d head), not 4 (logits recomputed in the backward)."""
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 10, 8)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(8, 16)) / 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 16, (2, 10)), jnp.int32)
    mask = jnp.asarray(rng.random((2, 10)) < 0.7)

    def whole(h, head):
        return losses.cross_entropy(h @ head, targets, mask)[0] / 3.0

    def chunked(h, head):
        return losses.chunked_cross_entropy(h, head, targets, mask, chunk=4)[0] / 3.0

    expect = jax.grad(whole, argnums=(0, 1))(h, head)
    got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(h, head)
    chex.assert_trees_all_close(got, expect, atol=1e-6, rtol=1e-5)
    assert float(jnp.abs(got[0][~mask]).max()) == 0.0  # masked positions get no gradient
    jaxpr = str(jax.make_jaxpr(jax.grad(chunked, argnums=(0, 1)))(h, head))
    assert jaxpr.count("dot_general") == 3

    # grads_in_forward=False (a pipeline's split backward): the same values, the logits recomputed in the
    # backward (4 matmuls), and nothing head-sized kept by the forward for it: only the hidden states.
    def recomputed(h, head):
        return losses.chunked_cross_entropy(h, head, targets, mask, chunk=4, grads_in_forward=False)[0] / 3.0

    chex.assert_trees_all_close(jax.jit(jax.grad(recomputed, argnums=(0, 1)))(h, head), expect, atol=1e-6, rtol=1e-5)
    assert str(jax.make_jaxpr(jax.grad(recomputed, argnums=(0, 1)))(h, head)).count("dot_general") == 4

    def stored(fn):  # the vjp closure's leaves that depend on the hidden states: what a pipeline's B keeps for W
        closed = jax.make_jaxpr(lambda h, w: jax.tree.leaves(jax.vjp(fn, h, w)[1]))(h, head)
        return [a.shape for a, dep in zip(closed.out_avals, data_dependent(closed, [True, False])) if dep]

    assert head.shape in stored(chunked) and head.shape not in stored(recomputed), (stored(chunked), stored(recomputed))
