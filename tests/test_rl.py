"""GRPO's pure pieces: advantages, loss modes (hand-computed), policy-gradient equivalence, rewards, tasks."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsjax.rl import (
    ArithmeticTask,
    CountdownTask,
    GRPOConfig,
    JsonlTask,
    Reward,
    accuracy_reward,
    aggregate,
    countdown_reward,
    extract_answer,
    format_reward,
    group_advantages,
    grpo_loss,
    k3_kl,
    score,
    tag_count_reward,
)
from dsjax.rl.rewards import safe_arithmetic

HYP = settings(max_examples=60, deadline=None)


# ---- advantages --------------------------------------------------------------------------------------------
@given(st.lists(st.floats(-5, 5), min_size=8, max_size=8), st.sampled_from([2, 4, 8]))
@HYP
def test_advantages_are_standardised_per_group(rewards, G):
    adv = np.asarray(group_advantages(jnp.asarray(rewards), G, eps=0.0)).reshape(-1, G)
    r = np.asarray(rewards, np.float32).reshape(-1, G)
    for a, g in zip(adv, r):
        if np.ptp(g) < 1e-3:  # (nearly) all equal: no signal
            continue
        # float32: r - mean carries ~eps32 * max|r| of rounding, which the division by std magnifies (found by
        # hypothesis: rewards -4.0, -4.032 give a mean advantage of 1.5e-5)
        atol = 1e-5 + 8 * np.finfo(np.float32).eps * np.abs(g).max() / g.std()
        np.testing.assert_allclose(a.mean(), 0.0, atol=atol)
        np.testing.assert_allclose(a.std(), 1.0, rtol=1e-4)
    equal = group_advantages(jnp.full((8,), 0.7), 4)
    chex.assert_trees_all_equal(equal, jnp.zeros(8))


def test_advantages_skip_nan_and_dr_grpo_keeps_scale():
    adv = group_advantages(jnp.asarray([1.0, jnp.nan, 0.0, 0.0]), 4, eps=0.0)
    # valid rewards {1, 0, 0}: mean 1/3, std sqrt(2)/3 -> sqrt(2), -1/sqrt(2), -1/sqrt(2); the NaN item gets 0
    np.testing.assert_allclose(adv, [np.sqrt(2), 0.0, -1 / np.sqrt(2), -1 / np.sqrt(2)], rtol=1e-5)
    np.testing.assert_allclose(group_advantages(jnp.asarray([3.0, 1.0]), 2, scale=False), [1.0, -1.0])


# ---- loss modes: hand-computed -------------------------------------------------------------------------------
# Two completions packed in one row of 5 tokens: sequence 0 has 2 tokens, sequence 1 has 3. A_0 = 1, A_1 = -2.
SEQ = jnp.asarray([[0, 0, 1, 1, 1]])
ADV = jnp.asarray([1.0, -2.0])
LOGP = jnp.log(jnp.asarray([[0.5, 0.25, 0.5, 0.2, 0.1]]))
OLD = jnp.log(jnp.asarray([[0.4, 0.25, 0.5, 0.4, 0.1]]))
REF = jnp.log(jnp.asarray([[0.5, 0.5, 0.25, 0.2, 0.2]]))


def _hand_token_losses(eps, eps_high, beta):
    ratio = np.array([0.5 / 0.4, 1.0, 1.0, 0.5, 1.0])
    adv = np.array([1.0, 1.0, -2.0, -2.0, -2.0])
    clipped = np.clip(ratio, 1 - eps, 1 + eps_high)
    surrogate = np.minimum(ratio * adv, clipped * adv)
    logp, ref = np.log([0.5, 0.25, 0.5, 0.2, 0.1]), np.log([0.5, 0.5, 0.25, 0.2, 0.2])
    kl = np.exp(ref - logp) - (ref - logp) - 1
    return -surrogate + beta * kl


@pytest.mark.parametrize("mode", ["sequence-mean", "token-mean", "dr_grpo"])
@pytest.mark.parametrize(("eps", "eps_high", "beta"), [(0.2, None, 0.0), (0.2, 0.28, 0.04), (10.0, None, 0.001)])
def test_loss_modes_match_hand_computation(mode, eps, eps_high, beta):
    cfg = GRPOConfig(epsilon=eps, epsilon_high=eps_high, beta=beta, loss_mode=mode, max_completion_length=4)
    token = _hand_token_losses(eps, eps if eps_high is None else eps_high, beta)
    expected = {
        "sequence-mean": (token[:2].mean() + token[2:].mean()) / 2,
        "token-mean": token.sum() / 5,
        "dr_grpo": token.sum() / (2 * 4),
    }[mode]
    loss, metrics = grpo_loss(LOGP, OLD, REF, SEQ, ADV, cfg, num_seqs=2)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # The fourth token's ratio 0.5 (A < 0) is clipped at eps = 0.2; the first's 1.25 (A > 0) only when the upper
    # range is also 0.2 (clip-higher's 0.28 lets it through).
    clipped = {(0.2, None): 2 / 5, (0.2, 0.28): 1 / 5}.get((eps, eps_high), 0.0)
    np.testing.assert_allclose(metrics["clipped_fraction"], clipped)


def test_k3_is_nonnegative_and_zero_at_equality():
    x = jax.random.normal(jax.random.key(0), (100,))
    y = jax.random.normal(jax.random.key(1), (100,))
    assert bool(jnp.all(k3_kl(x, y) >= 0)) and float(jnp.abs(k3_kl(x, x)).max()) == 0.0


def test_packed_and_unpacked_layouts_give_the_same_loss():
    cfg = GRPOConfig(epsilon=0.2, beta=0.04, max_completion_length=4)
    packed = grpo_loss(LOGP, OLD, REF, SEQ, ADV, cfg, num_seqs=2)[0]
    # The same two completions, one per row, right-padded (padding has seq -1 and arbitrary values).
    pad = lambda x, fill: jnp.asarray([[x[0, 0], x[0, 1], fill], [x[0, 2], x[0, 3], x[0, 4]]])
    seq = jnp.asarray([[0, 0, -1], [1, 1, 1]])
    unpacked = grpo_loss(pad(LOGP, 3.0), pad(OLD, -7.0), pad(REF, 0.0), seq, ADV, cfg, num_seqs=2)[0]
    np.testing.assert_allclose(packed, unpacked, rtol=1e-6)


@pytest.mark.parametrize("mode", ["sequence-mean", "token-mean", "dr_grpo"])
def test_one_iteration_without_kl_is_the_policy_gradient(mode):
    """mu = 1, beta = 0: old log-probs equal the current ones, the ratio is 1 and never clipped, so the GRPO
    gradient is the policy gradient -agg(A * grad log pi)."""
    cfg = GRPOConfig(epsilon=0.2, beta=0.0, loss_mode=mode, max_completion_length=4)
    theta = jax.random.normal(jax.random.key(2), (1, 5, 7))
    tokens = jnp.asarray([[1, 4, 0, 6, 2]])

    def logp_of(th):
        return jnp.take_along_axis(jax.nn.log_softmax(th), tokens[..., None], -1)[..., 0]

    def grpo(th):
        lp = logp_of(th)
        return grpo_loss(lp, jax.lax.stop_gradient(lp), None, SEQ, ADV, cfg, num_seqs=2)[0]

    def policy_gradient(th):
        return -aggregate(logp_of(th) * ADV[SEQ], SEQ, 2, mode, 4)

    chex.assert_trees_all_close(jax.grad(grpo)(theta), jax.grad(policy_gradient)(theta), atol=1e-6)


def test_config_validates():
    with pytest.raises(ValueError, match="G=1"):
        GRPOConfig(G=1)
    with pytest.raises(ValueError, match="loss_mode"):
        GRPOConfig(loss_mode="mean")
    assert GRPOConfig().clip_high == 10.0 and GRPOConfig(epsilon_high=0.28).clip_high == 0.28


# ---- rewards -----------------------------------------------------------------------------------------------
GOOD = "<think>\n2 plus 2 is 4\n</think>\n<answer>\n4\n</answer>"


def test_rewards_on_known_completions():
    completions = [GOOD, "the answer is 4", "<answer>5</answer>", "4 <answer></answer>", GOOD + GOOD]
    assert format_reward(None, completions) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert accuracy_reward(None, completions, answer=["4"] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert tag_count_reward(None, completions) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert extract_answer("4 <answer> 7 </answer> then <answer>8</answer>") == "8"


def test_accuracy_uses_math_verify_for_latex():
    completions = ["<answer>$\\frac{1}{2}$</answer>", "<answer>0.5</answer>", "<answer>1/3</answer>"]
    assert accuracy_reward(None, completions, answer=["\\frac{1}{2}"] * 3) == [1.0, 1.0, 0.0]
    assert accuracy_reward(None, ["<answer>1,000</answer>"], answer=["1000"]) == [1.0]


@given(st.text(max_size=300))
@HYP
def test_reward_parsers_never_crash(text):
    for fn in (format_reward, tag_count_reward):
        assert fn(None, [text])[0] in (0.0, 0.25, 0.5, 0.75, 1.0)
    value = accuracy_reward(None, [text], answer=["12"])[0]
    assert value in (0.0, 1.0)
    assert countdown_reward(None, [text], numbers=[[3, 4]], target=[12])[0] in (0.0, 1.0)
    if "<answer>" not in text:  # answers outside the tags never count
        assert value == 0.0


def test_safe_arithmetic_rejects_everything_but_arithmetic():
    assert safe_arithmetic("(3 + 4) * 2") == (14, [3, 4, 2])
    for bad in ("__import__('os')", "2 ** 10", "a + 1", "1 / 0", "-3 + 4", "(1" * 150):
        assert safe_arithmetic(bad) is None
    assert countdown_reward(None, ["<answer>(3*4)</answer>", "<answer>12</answer>", "<answer>4*3*1</answer>"],
                            numbers=[[3, 4]] * 3, target=[12] * 3) == [1.0, 0.0, 0.0]  # fmt: skip


def test_failing_or_skipping_reward_does_not_stop_scoring(caplog):
    def broken(prompts, completions, **_):
        raise RuntimeError("boom")

    def partial(prompts, completions, **_):
        return [None, 1.0]

    total, per_fn = score([Reward(format_reward, 0.5), Reward(broken), Reward(partial, 2.0)], ["p", "p"],
                          [GOOD, "x"], {})  # fmt: skip
    np.testing.assert_allclose(total, [0.5, 2.0])
    assert np.isnan(per_fn["broken"]).all() and "boom" in caplog.text
    total, _ = score([Reward(partial)], ["p", "p"], ["a", "b"], {})
    assert np.isnan(total[0]) and total[1] == 1.0


# ---- tasks -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", [ArithmeticTask(digits=2), ArithmeticTask(digits=3, ops="+-*"), CountdownTask()])
def test_splits_are_disjoint_and_answers_verify(task):
    rng = np.random.default_rng(0)
    train = task.sample(400, "train", rng)
    held = task.sample(100, "heldout", rng)
    assert not {p.question for p in train} & {p.question for p in held}
    completions = [f"<think>\nx\n</think>\n<answer>\n{p.answer}\n</answer>" for p in held]
    fields = {k: [p.fields[k] for p in held] for k in held[0].fields}
    accuracy = task.rewards()[0]
    assert accuracy.fn(None, completions, **fields) == [1.0] * len(held)


def test_jsonl_task(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [{"question": f"q{i}", "answer": f"work... #### {i * 2}", "id": i} for i in range(50)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = JsonlTask(path)
    problems = task.sample(20, "train", np.random.default_rng(0))
    assert all(p.answer == str(int(p.question[1:]) * 2) and p.fields["id"] == int(p.question[1:]) for p in problems)
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        JsonlTask(tmp_path / "bad.jsonl")
