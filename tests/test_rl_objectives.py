"""GRPO's objectives as configuration (DAPO, Dr. GRPO, GSPO, GSPO-token), DAPO's overlong shaping, truncated
importance sampling against the sampler, and the sampler-vs-trainer log-prob gap through the real engine.

Expected values are worked out by hand in the comments (small arrays), not re-derived with the implementation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dsjax
from dsjax.rl import GRPOConfig, group_advantages, grpo_loss, overlong_penalty, tis_weights
from dsjax.rl.step import build_batch, make_grpo_step, make_logprob_fn
from dsjax.train.step import init_train_state

# Two completions packed in one row: sequence 0 has 2 tokens, sequence 1 has 3; A_0 = 1, A_1 = -2.
# Token ratios pi/pi_old: 0.5/0.4 = 1.25, 1, 1, 0.2/0.4 = 0.5, 1.
SEQ = jnp.asarray([[0, 0, 1, 1, 1]])
ADV = jnp.asarray([1.0, -2.0])
LOGP = jnp.log(jnp.asarray([[0.5, 0.25, 0.5, 0.2, 0.1]]))
OLD = jnp.log(jnp.asarray([[0.4, 0.25, 0.5, 0.4, 0.1]]))
# A sampler whose probabilities differ from the trainer's old ones: pi_old / pi_sampler = 2.5, 1, 1.25, 4, 1.
SAMPLER = jnp.log(jnp.asarray([[0.16, 0.25, 0.4, 0.1, 0.1]]))


def _loss_and_grad(cfg, logp=LOGP, **kw):
    fn = lambda lp: grpo_loss(lp, OLD, None, SEQ, ADV, cfg, num_seqs=2, **kw)
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(logp)
    return float(loss), metrics, np.asarray(grad)


# ---- DAPO ---------------------------------------------------------------------------------------------------
def test_dapo_preset_and_loss():
    cfg = GRPOConfig.dapo(max_completion_length=4)
    assert (cfg.epsilon, cfg.epsilon_high, cfg.beta, cfg.loss_mode) == (0.2, 0.28, 0.0, "token-mean")
    assert cfg.dynamic_sampling and cfg.scale_rewards and cfg.G == 16
    # The paper's lengths: 20,480 tokens with a 4,096-token buffer; the buffer is a fifth of the budget.
    assert GRPOConfig.dapo(max_completion_length=20480).overlong_buffer == 4096
    assert GRPOConfig.dapo(overlong_buffer=7).overlong_buffer == 7
    # Clip range [0.8, 1.28]. Token 0: ratio 1.25, A = 1, inside -> 1.25. Token 1: 1. Token 2: ratio 1, A = -2
    # -> -2. Token 3: ratio 0.5, A = -2: min(-1, 0.8 * -2 = -1.6) = -1.6 (clipped). Token 4: -2.
    # Token-level mean of the negated surrogates: (-1.25 - 1 + 2 + 1.6 + 2) / 5 = 3.35 / 5 = 0.67.
    loss, metrics, grad = _loss_and_grad(cfg)
    np.testing.assert_allclose(loss, 0.67, rtol=1e-6)
    np.testing.assert_allclose(metrics["clipped_fraction"], 0.2)
    # d/dlogp of -ratio * A / 5 = -ratio * A / 5 where unclipped: -0.25, -0.2, 0.4, 0 (clipped), 0.4.
    np.testing.assert_allclose(grad, [[-0.25, -0.2, 0.4, 0.0, 0.4]], rtol=1e-5, atol=1e-7)


def test_overlong_penalty_by_hand():
    # L_max = 20, L_cache = 4: no penalty up to 16 tokens, then (16 - len) / 4 down to -1 at 20, -1 beyond.
    cfg = GRPOConfig(max_completion_length=20, overlong_buffer=4)
    lengths = [0, 10, 16, 17, 18, 19, 20, 21]
    np.testing.assert_allclose(overlong_penalty(lengths, cfg), [0, 0, 0, -0.25, -0.5, -0.75, -1.0, -1.0])
    half = GRPOConfig(max_completion_length=20, overlong_buffer=4, overlong_penalty=0.5)
    np.testing.assert_allclose(overlong_penalty(np.asarray([[18, 30]]), half), [[-0.25, -0.5]])
    off = GRPOConfig(max_completion_length=20)
    np.testing.assert_array_equal(overlong_penalty([5, 20, 25], off), [0.0, 0.0, 0.0])


# ---- Dr. GRPO -----------------------------------------------------------------------------------------------
def test_dr_grpo_preset_advantages_and_loss():
    cfg = GRPOConfig.dr_grpo(max_completion_length=4)
    assert (cfg.loss_mode, cfg.scale_rewards, cfg.beta) == ("dr_grpo", False, 0.0)
    # Rewards 1, 0, 0, 0 centred, not divided by their std: 0.75, -0.25, -0.25, -0.25.
    adv = group_advantages(jnp.asarray([1.0, 0.0, 0.0, 0.0]), 4, scale=cfg.scale_rewards)
    np.testing.assert_allclose(adv, [0.75, -0.25, -0.25, -0.25], rtol=1e-6)
    # Clip [0.8, 1.2]: token 0 -> min(1.25, 1.2) = 1.2 (clipped), then 1, -2, -1.6 (clipped), -2; the sum of the
    # negated surrogates 3.4 over 2 completions x 4 tokens = 0.425: no per-completion length normalisation.
    loss, _, grad = _loss_and_grad(cfg)
    np.testing.assert_allclose(loss, 0.425, rtol=1e-6)
    # Every unclipped token's gradient is -ratio * A / 8 whatever its completion's length: 0, -1/8, 2/8, 0, 2/8.
    np.testing.assert_allclose(grad, [[0.0, -0.125, 0.25, 0.0, 0.25]], rtol=1e-5, atol=1e-7)


# ---- GSPO ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_gspo_sequence_ratio_by_hand(level):
    cfg = GRPOConfig(importance_level=level, epsilon=0.2, epsilon_high=0.28, beta=0.0, max_completion_length=4)
    # s_0 = (1.25 * 1)^(1/2) = 1.1180 (A = 1, inside [0.8, 1.28]); s_1 = (1 * 0.5 * 1)^(1/3) = 0.7937 (A = -2:
    # min(-1.5874, 0.8 * -2) = -1.6, clipped). Sequence mean: -(1.1180 - 1.6) / 2 = 0.2410.
    s0 = np.sqrt(1.25)
    loss, metrics, grad = _loss_and_grad(cfg)
    np.testing.assert_allclose(loss, (1.6 - s0) / 2, rtol=1e-6)
    # Every token carries its sequence's ratio; sequence 1's three tokens are clipped.
    np.testing.assert_allclose(metrics["ratio_mean"], (2 * s0 + 3 * 0.5 ** (1 / 3)) / 5, rtol=1e-6)
    np.testing.assert_allclose(metrics["clipped_fraction"], 3 / 5)
    # GSPO: d(-s_0 A_0 / 2)/dlogp_t = -s_0 / 2 * (1/2) for both tokens of sequence 0; sequence 1 is clipped.
    # GSPO-token: each token's term -s_0 A_0 pi_t / sg(pi_t), averaged over 2 tokens and 2 sequences: the same.
    np.testing.assert_allclose(grad, [[-s0 / 4, -s0 / 4, 0.0, 0.0, 0.0]], rtol=1e-5, atol=1e-7)


def test_gspo_preset_clips_at_its_small_ranges():
    cfg = GRPOConfig.gspo(max_completion_length=4)
    assert (cfg.epsilon, cfg.epsilon_high, cfg.importance_level, cfg.beta) == (3e-4, 4e-4, "sequence", 0.0)
    # s_0 = 1.118 > 1.0004 with A > 0 -> 1.0004; s_1 = 0.794 < 0.9997 with A < 0 -> 0.9997 * -2. Both clipped.
    loss, metrics, grad = _loss_and_grad(cfg)
    np.testing.assert_allclose(loss, -(1.0004 - 2 * 0.9997) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["clipped_fraction"], 1.0)
    np.testing.assert_array_equal(grad, np.zeros((1, 5)))


def test_gspo_and_gspo_token_share_gradients_that_differ_from_grpo():
    """Clip range [0.4, 1.6]: nothing is clipped. GSPO (and GSPO-token, with its per-sequence advantages) moves all
    tokens of a sequence by the same s_i A_i / |y_i|; GRPO weights each token by its own ratio."""
    kw = dict(epsilon=0.6, beta=0.0, max_completion_length=4)
    s0, s1 = np.sqrt(1.25), 0.5 ** (1 / 3)
    # -(1/2) * A_i * s_i / |y_i| per token: -s0/4 for sequence 0, +2 s1 / 6 = s1/3 for sequence 1.
    gspo_grad = [[-s0 / 4, -s0 / 4, s1 / 3, s1 / 3, s1 / 3]]
    for level in ("sequence", "sequence_token"):
        loss, _, grad = _loss_and_grad(GRPOConfig(importance_level=level, **kw))
        np.testing.assert_allclose(loss, -(s0 - 2 * s1) / 2, rtol=1e-6)
        np.testing.assert_allclose(grad, gspo_grad, rtol=1e-5)
    # GRPO: -(1/2) * A_i * rho_t / |y_i|: -1.25/4, -1/4, 2/6, 0.5 * 2/6, 2/6.
    _, _, grad = _loss_and_grad(GRPOConfig(**kw))
    np.testing.assert_allclose(grad, [[-0.3125, -0.25, 1 / 3, 1 / 6, 1 / 3]], rtol=1e-5)


# ---- truncated importance sampling --------------------------------------------------------------------------
def test_tis_weights_are_one_when_sampler_and_trainer_agree():
    for level in ("token", "sequence"):
        for mode in ("truncate", "mask"):
            cfg = GRPOConfig(tis=level, tis_mode=mode, epsilon=0.2, beta=0.0, max_completion_length=4)
            w, m = tis_weights(OLD, OLD, SEQ, 2, cfg)
            np.testing.assert_array_equal(w, np.ones((1, 5)))
            assert (
                float(m["tis_ratio_min"]) == float(m["tis_ratio_max"]) == 1.0 and float(m["tis_capped_fraction"]) == 0
            )
            base = GRPOConfig(epsilon=0.2, beta=0.0, max_completion_length=4)
            np.testing.assert_array_equal(_loss_and_grad(cfg, sampler_logp_bt=OLD)[0], _loss_and_grad(base)[0])


def test_tis_token_truncate_and_mask_by_hand():
    # pi_old / pi_sampler = 2.5, 1, 1.25, 4, 1; cap 2: truncate -> 2, 1, 1.25, 2, 1; mask -> 0, 1, 1.25, 0, 1.
    cfg = GRPOConfig(tis="token", tis_threshold=2.0, epsilon=0.2, beta=0.0, max_completion_length=4)
    w, m = tis_weights(OLD, SAMPLER, SEQ, 2, cfg)
    np.testing.assert_allclose(w, [[2.0, 1.0, 1.25, 2.0, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(
        [m["tis_ratio_mean"], m["tis_ratio_min"], m["tis_ratio_max"]], [1.95, 1.0, 4.0], rtol=1e-6
    )
    np.testing.assert_allclose(m["tis_capped_fraction"], 0.4)
    masked = GRPOConfig(tis="token", tis_mode="mask", epsilon=0.2, beta=0.0, max_completion_length=4)
    np.testing.assert_allclose(tis_weights(OLD, SAMPLER, SEQ, 2, masked)[0], [[0.0, 1.0, 1.25, 0.0, 1.0]], rtol=1e-6)
    # Padding (seq -1) gets weight 0 whatever its log-probs.
    w_pad, _ = tis_weights(jnp.asarray([[0.0, 5.0]]), jnp.asarray([[0.0, -5.0]]), jnp.asarray([[0, -1]]), 1, cfg)
    np.testing.assert_array_equal(w_pad, [[1.0, 0.0]])


def test_tis_sequence_truncate_and_mask_by_hand():
    # Sequence ratios: 2.5 * 1 = 2.5 and 1.25 * 4 * 1 = 5; cap 3: truncate -> 2.5, 3; mask -> 2.5, 0.
    kw = dict(tis="sequence", tis_threshold=3.0, epsilon=0.2, beta=0.0, max_completion_length=4)
    w, m = tis_weights(OLD, SAMPLER, SEQ, 2, GRPOConfig(**kw))
    np.testing.assert_allclose(w, [[2.5, 2.5, 3.0, 3.0, 3.0]], rtol=1e-6)
    np.testing.assert_allclose(
        [m["tis_ratio_mean"], m["tis_ratio_min"], m["tis_ratio_max"]], [3.75, 2.5, 5.0], rtol=1e-6
    )
    np.testing.assert_allclose(m["tis_capped_fraction"], 0.5)
    w_mask, _ = tis_weights(OLD, SAMPLER, SEQ, 2, GRPOConfig(**kw, tis_mode="mask"))
    np.testing.assert_allclose(w_mask, [[2.5, 2.5, 0.0, 0.0, 0.0]], rtol=1e-6)


def test_tis_weights_the_policy_gradient_term_only():
    # DAPO's token losses -1.25, -1, 2, 1.6, 2 (see test_dapo_preset_and_loss) times the truncated weights
    # 2, 1, 1.25, 2, 1: -2.5 - 1 + 2.5 + 3.2 + 2 = 4.2, token mean 0.84.
    cfg = GRPOConfig.dapo(max_completion_length=4, tis="token", tis_threshold=2.0)
    loss, metrics, grad = _loss_and_grad(cfg, sampler_logp_bt=SAMPLER)
    np.testing.assert_allclose(loss, 0.84, rtol=1e-6)
    assert {"tis_ratio_mean", "tis_ratio_min", "tis_ratio_max", "tis_capped_fraction"} <= set(metrics)
    # Gradients are weighted too (no gradient through the weights): -w ratio A / 5 = -0.5, -0.2, 0.5, 0, 0.4.
    np.testing.assert_allclose(grad, [[-0.5, -0.2, 0.5, 0.0, 0.4]], rtol=1e-5, atol=1e-7)
    # The KL term is not weighted: with beta it adds beta * token-mean(k3) exactly as without TIS.
    ref = jnp.log(jnp.asarray([[0.5, 0.5, 0.25, 0.2, 0.2]]))
    d = np.log([0.5, 0.5, 0.25, 0.2, 0.2]) - np.log([0.5, 0.25, 0.5, 0.2, 0.1])
    k3 = np.exp(d) - d - 1
    with_kl = GRPOConfig.dapo(max_completion_length=4, tis="token", tis_threshold=2.0, beta=0.1)
    loss_kl = grpo_loss(LOGP, OLD, ref, SEQ, ADV, with_kl, num_seqs=2, sampler_logp_bt=SAMPLER)[0]
    np.testing.assert_allclose(loss_kl, 0.84 + 0.1 * k3.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="sampler"):
        grpo_loss(LOGP, OLD, None, SEQ, ADV, cfg, num_seqs=2)


# ---- configuration ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("importance_level", "seq", "importance_level"),
        ("overlong_buffer", -1, "overlong_buffer"),
        ("overlong_buffer", 8, "overlong_buffer"),  # not below max_completion_length = 8
        ("overlong_buffer", 2.5, "overlong_buffer"),
        ("overlong_penalty", -0.5, "overlong_penalty"),
        ("dynamic_sampling", 1, "dynamic_sampling"),
        ("max_resample_rounds", -1, "max_resample_rounds"),
        ("tis", "geometric", "tis="),
        ("tis_threshold", 0.5, "tis_threshold"),
        ("tis_mode", "clip", "tis_mode"),
        ("log_ratio_clamp", 0.0, "log_ratio_clamp"),
    ],
)
def test_new_fields_are_validated(field, value, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(max_completion_length=8, **{field: value})


def test_defaults_are_plain_grpo():
    cfg = GRPOConfig()
    assert (cfg.importance_level, cfg.overlong_buffer, cfg.dynamic_sampling, cfg.tis) == ("token", 0, False, None)
    assert cfg.max_resample_rounds == 4 and cfg.tis_threshold == 2.0 and cfg.tis_mode == "truncate"


# ---- the sampler's log-probs against the trainer's, through the real engine ---------------------------------
CFG = dsjax.ModelConfig.tiny(vocab_size=264, initializer_range=0.1)
TEMPERATURE = 0.7  # not 1: the trainer must divide the logits by the rollout temperature as the sampler does


@pytest.fixture(scope="module")
def rollout():
    """A tiny random model's samples at temperature 0.7 with the engine's log-probs (of softmax(logits / 0.7)),
    packed into a batch; the model as a train state for the jitted log-prob pass and update."""
    model = dsjax.create_model(CFG, seed=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 256, int(rng.integers(3, 9))).tolist() for _ in range(4)]
    res = dsjax.generate(
        model, prompts, max_new_tokens=8, temperature=TEMPERATURE, seed=3, stop_tokens=[1], return_result=True
    )
    batch = build_batch(prompts, res.tokens, row_len=32, completion_logprobs=res.logprobs)
    tx = optax.sgd(0.0)
    graphdef, state = init_train_state(model, tx)
    return graphdef, state, tx, prompts, res, {k: jnp.asarray(v) for k, v in batch.items()}


def test_sampler_and_trainer_logprobs_agree_in_float32(rollout):
    """float32 at highest matmul precision (conftest): the engine (prefill, then absorbed attention over the
    latent cache, one token a step) and the training forward (naive attention over the packed sequences) give
    the same log-probs to rounding when both use the rollout temperature. Measured max gap 2.4e-6 (mean 4e-7) at
    temperature 0.7, 1.9e-6 at 1; the bound leaves 4x room. A trainer ignoring the temperature is 0.32 off."""
    graphdef, state, _, _, res, batch = rollout
    logp = make_logprob_fn(graphdef, temperature=TEMPERATURE)(state.params, state.rest, batch)
    mask = np.asarray(batch["seq"] >= 0)
    gap = np.abs(np.asarray(logp) - np.asarray(batch["sampler_logp"]))[mask]
    assert gap.size == sum(map(len, res.tokens)) and gap.max() <= 1e-5, gap.max()


def test_grpo_step_with_perturbed_sampler_logprobs(rollout):
    """TIS in the jitted update: a sampler that gave some tokens exp(-0.5) and others exp(-1) of the trainer's
    probability. At mu = 1 the ratio is 1, so the loss is -mean_i A_i mean_t w_t with w = 1, e^0.5 and 2 (e^1
    truncated at 2)."""
    graphdef, state, tx, prompts, _, batch = rollout
    cfg = GRPOConfig(G=2, epsilon=0.2, beta=0.0, max_completion_length=8, temperature=TEMPERATURE, tis="token")
    n = len(prompts)
    seq = np.asarray(batch["seq"])
    # Shift the sampler's log-probs down by 0.5 on every third completion token and by 1 on every other third.
    order = np.cumsum(seq >= 0).reshape(seq.shape) % 3
    shift = np.where(seq < 0, 0.0, np.select([order == 1, order == 2], [0.5, 1.0], 0.0))
    adv = jnp.asarray([1.0, -0.5, 2.0, -1.0])
    perturbed = dict(batch, sampler_logp=batch["sampler_logp"] - shift, advantages=adv)
    step = make_grpo_step(graphdef, cfg, tx, n, temperature=TEMPERATURE)
    _, metrics = step(jax.tree.map(jnp.copy, state), perturbed)
    w = np.select([shift == 0.5, shift == 1.0], [np.exp(0.5), 2.0], 1.0)
    expected = -np.mean([float(adv[i]) * w[seq == i].mean() for i in range(n)])
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-4)
    np.testing.assert_allclose(metrics["tis_ratio_max"], np.e, rtol=1e-4)
    np.testing.assert_allclose(metrics["tis_ratio_min"], 1.0, atol=1e-4)
    np.testing.assert_allclose(metrics["tis_capped_fraction"], (shift == 1.0).sum() / (seq >= 0).sum())
    np.testing.assert_allclose(metrics["sampler_logp_gap"], shift[seq >= 0].mean(), atol=1e-5)
    assert bool(metrics["finite"])
