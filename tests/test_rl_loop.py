"""The GRPO loop with a real model: packed == unpacked loss, rollouts, a short run, exact resume."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsjax
from dsjax.data import ByteTokenizer
from dsjax.rl import ArithmeticTask, GRPOConfig, Reward, format_reward, group_advantages, grpo_loss
from dsjax.rl.step import build_batch, token_logprobs
from dsjax.rl.trainer import RLTrainConfig, evaluate, rollout, train_grpo
from dsjax.rl.zero import corpus, worked_reasoning
from dsjax.train.metrics import read_jsonl

CFG = dsjax.ModelConfig.tiny(vocab_size=264, initializer_range=0.1)
GRPO = GRPOConfig(G=4, epsilon=0.2, beta=0.04, max_completion_length=8, learning_rate=1e-3)
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    return dsjax.create_model(CFG, seed=0)


def _sequences(seed=0, n=6):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 256, int(rng.integers(3, 9))).tolist() for _ in range(n)]
    completions = [rng.integers(0, 256, int(rng.integers(1, 7))).tolist() for _ in range(n)]
    return prompts, completions


def test_packed_and_unpacked_batches_give_the_same_loss(model):
    prompts, completions = _sequences()
    rng = np.random.default_rng(1)
    adv = jnp.asarray(rng.normal(size=len(prompts)), jnp.float32)
    losses = []
    for pack in (True, False):
        batch = {k: jnp.asarray(v) for k, v in build_batch(prompts, completions, pack=pack, row_len=32).items()}
        logp, _ = token_logprobs(model, batch)
        losses.append((batch, logp))
    (packed, lp_p), (unpacked, lp_u) = losses
    assert packed["tokens"].shape[0] < unpacked["tokens"].shape[0]  # packing did pack

    def per_completion(batch, lp):  # completion log-probs gathered by sequence index, in order
        seq, lp = np.asarray(batch["seq"]).ravel(), np.asarray(lp).ravel()
        return [lp[seq == i] for i in range(len(prompts))]

    for a, b in zip(per_completion(packed, lp_p), per_completion(unpacked, lp_u)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    l_p = grpo_loss(lp_p, lp_p - 0.05, lp_p + 0.1, packed["seq"], adv, GRPO, len(prompts))[0]
    l_u = grpo_loss(lp_u, lp_u - 0.05, lp_u + 0.1, unpacked["seq"], adv, GRPO, len(prompts))[0]
    np.testing.assert_allclose(l_p, l_u, rtol=1e-5)


def test_batch_layout_marks_completion_targets():
    batch = build_batch([[5, 6, 7]], [[8, 9]], row_len=16)
    np.testing.assert_array_equal(batch["tokens"][0, :4], [5, 6, 7, 8])
    np.testing.assert_array_equal(batch["targets"][0, :4], [6, 7, 8, 9])
    np.testing.assert_array_equal(batch["seq"][0, :5], [-1, -1, 0, 0, -1])
    with pytest.raises(ValueError, match="does not fit"):
        build_batch([[1] * 20], [[2]], row_len=16)


def test_rollout_groups_and_scores(model):
    task = ArithmeticTask(digits=2, ops="+")
    problems = task.sample(2, "train", np.random.default_rng(0))
    r = rollout(model, TOK, problems, GRPO, "{question}=", seed=3)
    assert len(r.completions) == 2 * GRPO.G and len(r.fields["answer"]) == 2 * GRPO.G
    assert r.prompts[0] == [TOK.bos_id, *TOK.encode(problems[0].question + "=")]
    assert all(1 <= len(c) <= GRPO.max_completion_length for c in r.completions)
    # Samples of a group differ (temperature 1), and the rollout is reproducible.
    assert len({tuple(c) for c in r.completions[: GRPO.G]}) > 1
    assert rollout(model, TOK, problems, GRPO, "{question}=", seed=3).completions == r.completions


class _LikesDigits(ArithmeticTask):
    """A random model never answers correctly; reward digits instead so that every group has a signal."""

    def rewards(self):
        digits = lambda prompts, completions, **_: [sum(ch.isdigit() for ch in c) / 8 for c in completions]
        return [Reward(digits, 1.0, "accuracy"), Reward(format_reward, 0.5, "format")]


def test_grpo_run_resumes_exactly(tmp_path):
    task = _LikesDigits(digits=1, ops="+")
    tc = RLTrainConfig(steps=4, questions=2, template="{question}=", checkpoint_every=2)
    full = train_grpo(dsjax.create_model(CFG, seed=0), TOK, task, GRPO, tc, str(tmp_path / "full"), progress=False)
    half = dataclasses.replace(tc, steps=2)
    train_grpo(dsjax.create_model(CFG, seed=0), TOK, task, GRPO, half, str(tmp_path / "resumed"), progress=False)
    resumed = train_grpo(dsjax.create_model(CFG, seed=0), TOK, task, GRPO, tc, str(tmp_path / "resumed"),
                         progress=False)  # fmt: skip
    a, b = read_jsonl(str(tmp_path / "full" / "metrics.jsonl")), read_jsonl(str(tmp_path / "resumed" / "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["reward"] == y["reward"] and x["kl"] == y["kl"]
    chex.assert_trees_all_equal(jax.device_get(nnx.state(full)), jax.device_get(nnx.state(resumed)))
    assert (tmp_path / "full" / "rl.png").exists() and (tmp_path / "full" / "hf" / "config.json").exists()
    assert {"reward/accuracy", "reward/format", "frac_reward_zero_std", "clipped_fraction", "kl", "entropy",
            "completion_length"} <= set(a[-1])  # fmt: skip
    assert a[-1]["kl"] > 0  # the policy moved away from the reference
    # The engine's log-probs of the sampled tokens match the training forward's (same weights at mu = 1).
    assert all(r["sampler_logp_gap"] < 1e-4 for r in a)


def test_evaluate_and_corpus():
    assert worked_reasoning(47, 38) == "7+8=15\n4+3+1=8"
    assert worked_reasoning(5, 95) == "5+5=10\n0+9+1=10"
    task = ArithmeticTask(digits=2, ops="+")
    docs = corpus(task.sample(200, "train", np.random.default_rng(0)), np.random.default_rng(1), answer_accuracy=0.2,
                  format_rate=0.6)  # fmt: skip
    assert any("<answer>" in d for d in docs) and any("The answer is" in d for d in docs)
    model = dsjax.create_model(CFG, seed=1)
    result = evaluate(model, TOK, task, GRPO, "{question}=", problems=4, samples=2)
    assert 0.0 <= result["pass1"] <= 1.0 and result["format"] == 0.0  # a random model does not write the format


def test_group_advantages_of_real_rewards_are_centred():
    adv = np.asarray(group_advantages(jnp.asarray([1.0, 0.0, 0.0, 0.5, 1, 1, 1, 1]), 4))
    np.testing.assert_allclose(adv[:4].sum(), 0.0, atol=1e-5)
    np.testing.assert_array_equal(adv[4:], 0.0)


def test_grpo_script_on_an_hf_checkpoint_and_jsonl(tmp_path):
    """configs/grpo_hf.yaml's path: an HF checkpoint directory with tokenizer.json and a user JSONL dataset."""
    import importlib.util
    import json
    import pathlib

    from tok_fixtures import write_tokenizer

    from dsjax.data import HFTokenizer, default_corpus

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    tok = HFTokenizer.from_file(write_tokenizer(ckpt / "tokenizer.json", default_corpus(32)))
    cfg = dataclasses.replace(CFG, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    dsjax.save_pretrained(dsjax.create_model(cfg, seed=0), ckpt)
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"{i}+1", "answer": f"... #### {i + 1}"}) + "\n" for i in range(40))
    )
    root = pathlib.Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("grpo_script", root / "scripts" / "grpo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    sets = [f"model.path={ckpt}", f"data.path={data}", "model.dtype=float32", "grpo.G=2",
            "grpo.max_completion_length=4", "train.steps=2", "train.questions=2",
            "data.template={question}="]  # fmt: skip
    args = ["--config", str(root / "configs" / "grpo_hf.yaml"), "--out", str(tmp_path / "out")]
    assert script.main(args + [a for s in sets for a in ("--set", s)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) == {"base_pass1", "rl_pass1", "base_format", "rl_format"}
    assert len(read_jsonl(str(tmp_path / "out" / "metrics.jsonl"))) == 2
