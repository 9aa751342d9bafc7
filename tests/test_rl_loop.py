"""The GRPO loop with a real model: packed == unpacked loss, rollouts, a short run, exact resume; dynamic sampling
(DAPO) with a stub rollout and with the tiny model."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsjax
from dsjax.data import ByteTokenizer
from dsjax.rl import ArithmeticTask, GRPOConfig, Reward, format_reward, group_advantages, grpo_loss, trainer
from dsjax.rl.step import build_batch, token_logprobs
from dsjax.rl.trainer import (
    RLTrainConfig,
    Rollout,
    Sampled,
    evaluate,
    informative_groups,
    rollout,
    sample_informative,
    sampling_seeds,
    score_rollout,
    train_grpo,
)
from dsjax.rl.zero import corpus, reasoning_correct, worked_reasoning, write_transcripts
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
    logprobs = nnx.jit(token_logprobs)  # eager, the forward compiled each op per shape (~430 compiles)
    for pack in (True, False):
        batch = {k: jnp.asarray(v) for k, v in build_batch(prompts, completions, pack=pack, row_len=32).items()}
        logp, _ = logprobs(model, batch)
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
    """A random model never answers correctly; reward digits instead so that groups have a signal, except for
    questions with an even first operand: every completion of those gets 1 (a zero-advantage group)."""

    def rewards(self):
        def digits(prompts, completions, **_):
            even = [int(TOK.decode(p[1:]).split("+")[0]) % 2 == 0 for p in prompts]
            return [1.0 if e else sum(ch.isdigit() for ch in c) / 8 for e, c in zip(even, completions)]

        return [Reward(digits, 1.0, "accuracy"), Reward(format_reward, 0.5, "format")]


def test_grpo_run_resumes_exactly(tmp_path, monkeypatch):
    """With dynamic sampling on: resampled rounds resume exactly too, and no zero-advantage group is trained on."""
    task = _LikesDigits(digits=1, ops="+")
    cfg = dataclasses.replace(GRPO, dynamic_sampling=True, max_resample_rounds=3)
    trained = []
    real_build = trainer.build_batch

    def spy(prompts, completions, **kw):  # the questions of every batch the update sees
        trained.append([TOK.decode(p[1:]).rstrip("=") for p in prompts])
        return real_build(prompts, completions, **kw)

    monkeypatch.setattr(trainer, "build_batch", spy)
    tc = RLTrainConfig(steps=4, questions=2, template="{question}=", checkpoint_every=2)
    full = train_grpo(dsjax.create_model(CFG, seed=0), TOK, task, cfg, tc, str(tmp_path / "full"), progress=False)
    half = dataclasses.replace(tc, steps=2)
    train_grpo(dsjax.create_model(CFG, seed=0), TOK, task, cfg, half, str(tmp_path / "resumed"), progress=False)
    resumed = train_grpo(dsjax.create_model(CFG, seed=0), TOK, task, cfg, tc, str(tmp_path / "resumed"),
                         progress=False)  # fmt: skip
    a, b = read_jsonl(str(tmp_path / "full" / "metrics.jsonl")), read_jsonl(str(tmp_path / "resumed" / "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["reward"] == y["reward"] and x["kl"] == y["kl"]
        assert x["ds_groups_sampled"] == y["ds_groups_sampled"]
    chex.assert_trees_all_equal(jax.device_get(nnx.state(full)), jax.device_get(nnx.state(resumed)))
    assert (tmp_path / "full" / "rl.png").exists() and (tmp_path / "full" / "hf" / "config.json").exists()
    assert {"reward/accuracy", "reward/format", "frac_reward_zero_std", "clipped_fraction", "kl", "entropy",
            "completion_length", "ds_generate_calls", "ds_informative_frac"} <= set(a[-1])  # fmt: skip
    assert a[-1]["kl"] > 0  # the policy moved away from the reference
    # The engine's log-probs of the sampled tokens match the training forward's (same weights at mu = 1).
    assert all(r["sampler_logp_gap"] < 1e-4 for r in a)
    # Even first operands (constant reward) were drawn and resampled away: never in a trained batch.
    assert len(trained) == 8 and all(len(qs) == tc.questions * cfg.G for qs in trained)
    assert all(int(q.split("+")[0]) % 2 == 1 for qs in trained for q in qs)
    assert any(r["ds_generate_calls"] > 1 for r in a) and all(r["ds_groups_trained"] == 2 for r in a)


def test_rl_learning_rate_is_constant_by_default_and_else_warmup_then_cosine():
    assert RLTrainConfig(steps=10).learning_rate(1e-4) == 1e-4  # R1 / DAPO: constant
    schedule = RLTrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1).learning_rate(1e-4, updates_per_step=2)
    lrs = np.asarray([schedule(i) for i in range(22)])  # counted in optimizer updates: mu = 2 per round
    np.testing.assert_allclose(lrs[[0, 2, 4, 20, 21]], [0.0, 5e-5, 1e-4, 1e-5, 1e-5], rtol=1e-6)
    assert (np.diff(lrs[:5]) > 0).all() and (np.diff(lrs[4:21]) < 0).all()
    for bad in (dict(warmup_steps=10), dict(warmup_steps=-1), dict(min_lr_ratio=1.5), dict(min_lr_ratio=-0.1)):
        with pytest.raises(ValueError, match="warmup_steps"):
            RLTrainConfig(steps=10, **bad)


def test_evaluate_and_corpus(tmp_path):
    assert worked_reasoning(47, 38) == "7+8=15\n4+3+1=8"
    assert worked_reasoning(5, 95) == "5+5=10\n0+9+1=10"
    completions = ["7+8=15\n4+3+1=8\nso 85\nThe answer is 75.", "so 84\n</think>\n<answer>\n85\n</answer>", ""]
    rows = [dict(answer="85", completion=c) for c in completions]
    assert reasoning_correct(rows) == 1 / 3  # the sum the reasoning reached, wherever the answer is
    task = ArithmeticTask(digits=2, ops="+")
    docs = corpus(task.sample(200, "train", np.random.default_rng(0)), np.random.default_rng(1), answer_accuracy=0.2,
                  format_rate=0.6)  # fmt: skip
    assert any("<answer>" in d for d in docs) and any("The answer is" in d for d in docs)
    model = dsjax.create_model(CFG, seed=1)
    result = evaluate(model, TOK, task, GRPO, "{question}=", problems=4, samples=2)
    assert 0.0 <= result["pass1"] <= 1.0 and result["format"] == 0.0  # a random model does not write the format
    rows = result["transcripts"]
    assert len(rows) == 8 and rows[0]["question"] == rows[1]["question"] and rows[0]["completion"] == result["example"]
    assert np.mean([r["accuracy"] for r in rows]) == result["pass1"]
    write_transcripts(result, str(tmp_path / "t.md"), "Base", problems=2)
    text = (tmp_path / "t.md").read_text()
    assert text.startswith("# Base") and text.count("## ") == 4 and f"## {rows[0]['question']} = " in text
    assert "2 samples per problem" in text


def test_r1_zero_starts_from_a_given_base_model_in_float32(tmp_path, monkeypatch):
    """``--base``: no pretraining, and the policy is loaded in the pretraining's float32 (a bf16 policy's AdamW
    updates round away), however the checkpoint is stored."""
    from dsjax.rl import zero

    ckpt = str(tmp_path / "base_hf")
    dsjax.save_pretrained(dsjax.create_model(CFG, seed=0), ckpt)
    seen = {}

    class Stop(Exception):
        pass

    def evaluate_spy(model, *args, **kw):
        seen["dtypes"] = {v.dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        raise Stop

    monkeypatch.setattr(trainer, "evaluate", evaluate_spy)
    with pytest.raises(Stop):
        zero.run(zero.ZeroConfig(corpus_docs=10), str(tmp_path / "run"), progress=False, base_model=ckpt)
    assert seen["dtypes"] == {jnp.dtype(jnp.float32)}
    assert not (tmp_path / "run" / "base").exists()


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


def _stub_sampler(G, informative):
    """``sample(attempt, n)`` whose group ``g`` of attempt ``a`` has a reward spread iff ``informative(a, g)``;
    prompts record (attempt, group) so that the chosen groups can be identified."""
    calls = []

    def sample(attempt, n):
        calls.append((attempt, n))
        prompts = [[attempt, g] for g in range(n) for _ in range(G)]
        total = np.asarray([float(i % 2 and informative(attempt, g)) for g in range(n) for i in range(G)])
        r = Rollout(prompts, [[1]] * len(prompts), [[0.0]] * len(prompts), ["x"] * len(prompts),
                    {"answer": ["1"] * len(prompts)})  # fmt: skip
        return Sampled(r, total, {"accuracy": total})

    return sample, calls


def test_informative_groups_ignore_nan_rewards():
    total = np.asarray([np.nan, 1, 1, np.nan, np.nan, 0, 1, np.nan, np.nan, np.nan, np.nan, np.nan, 0, 0, 0, 0.5])
    np.testing.assert_array_equal(informative_groups(total, 4), [False, True, False, True])


def test_dynamic_sampling_trains_only_on_informative_groups():
    G = 4
    sample, calls = _stub_sampler(G, lambda a, g: a > 0 or g % 2 == 0)  # attempt 0: groups 0 and 2 of 4
    first, train, stats = sample_informative(sample, G=G, questions=4, dynamic=True, max_rounds=3)
    # One extra batched call for the 2 missing groups at the observed rate 1/2: 4 prompts (16 rows, one bucket).
    assert calls == [(0, 4), (1, 4)]
    groups = [tuple(train.rollout.prompts[i]) for i in range(0, len(train.rollout.prompts), G)]
    assert groups == [(0, 0), (0, 2), (1, 0), (1, 1)]  # the first informative groups, in order
    assert informative_groups(train.total, G).all()  # never a zero-advantage group
    assert np.all(np.asarray(group_advantages(jnp.asarray(train.total), G)).reshape(-1, G).std(axis=1) > 0)
    assert len(train.rollout.fields["answer"]) == len(train.total) == 4 * G
    assert first.rollout.prompts[0] == [0, 0] and len(first.total) == 4 * G  # attempt 0 as drawn (metrics)
    assert stats == dict(ds_generate_calls=2, ds_groups_sampled=8, ds_groups_informative=6, ds_groups_trained=4,
                         ds_informative_frac=0.75)  # fmt: skip


def test_dynamic_sampling_is_bounded_and_fails_clearly():
    sample, calls = _stub_sampler(4, lambda a, g: False)
    with pytest.raises(RuntimeError, match="no group whose rewards differ in 3 generate calls"):
        sample_informative(sample, G=4, questions=2, dynamic=True, max_rounds=2)
    assert [a for a, _ in calls] == [0, 1, 2] and all(n <= 8 for _, n in calls)  # capped at 4 x questions
    # Few informative groups: the round trains on those it found.
    sample, calls = _stub_sampler(4, lambda a, g: (a, g) == (2, 0))
    _, train, stats = sample_informative(sample, G=4, questions=2, dynamic=True, max_rounds=2)
    assert [tuple(p) for p in train.rollout.prompts[::4]] == [(2, 0)] and stats["ds_groups_trained"] == 1
    # Off: attempt 0 is trained on as it is, zero-spread groups included (their advantage is 0).
    sample, calls = _stub_sampler(4, lambda a, g: False)
    first, train, stats = sample_informative(sample, G=4, questions=2, dynamic=False, max_rounds=2)
    assert train is first and stats == {} and calls == [(0, 2)]


def test_overlong_penalty_is_added_to_the_rewards_as_its_own_column():
    cfg = dataclasses.replace(GRPO, max_completion_length=8, overlong_buffer=4)
    completions = [[1] * n for n in (3, 4, 6, 8)]  # penalty 0, 0, -0.5, -1 (linear over the last 4 tokens)
    r = Rollout([[0]] * 4, completions, [[0.0] * len(c) for c in completions], ["x"] * 4, {"answer": ["1"] * 4})
    rewards = [Reward(lambda prompts, completions, **_: [1.0, 0.0, 1.0, None], 1.0, "accuracy")]
    total, per_fn = score_rollout(rewards, r, cfg)
    np.testing.assert_allclose(per_fn["overlong"], [0.0, 0.0, -0.5, -1.0])
    np.testing.assert_allclose(total[:3], [1.0, 0.0, 0.5])
    assert np.isnan(total[3])  # no function judged the item: it stays out of its group's statistics
    total, per_fn = score_rollout(rewards, r, dataclasses.replace(cfg, overlong_buffer=0))
    assert "overlong" not in per_fn and total[2] == 1.0


def test_sampling_seeds_depend_only_on_seed_round_attempt():
    rng, seed = sampling_seeds(3, 7, 0)
    assert seed == 3 * 1_000_003 + 7 and rng.integers(1 << 30) == np.random.default_rng([3, 7]).integers(1 << 30)
    seeds = {sampling_seeds(3, r, a)[1] for r in range(5) for a in range(4)}
    assert len(seeds) == 20 and all(0 <= s < 2**31 for s in seeds)
    assert sampling_seeds(3, 2, 1)[1] == sampling_seeds(3, 2, 1)[1]
