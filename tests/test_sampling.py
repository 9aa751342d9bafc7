"""Sampling filters and speculative sampling draw from the distributions they claim (empirical checks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsjax.infer.sampling import (
    Sampling,
    categorical,
    first_argmax,
    log_probs,
    make_sampling,
    row_keys,
    sample,
    sample_with_logp,
    speculative_accept,
)

N = 40_000  # draws per empirical check: total-variation noise ~ sqrt(V / N) / 2 ~ 0.01 for V = 6
TV_BOUND = 0.02
LOGITS = jnp.asarray([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def _empirical(tokens, vocab):
    return np.bincount(np.asarray(tokens), minlength=vocab) / len(tokens)


def _tv(p, q):
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum()


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        (Sampling(1.0), jax.nn.softmax(LOGITS)),
        (Sampling(0.5), jax.nn.softmax(LOGITS / 0.5)),
        (Sampling(1.0, top_k=2), jax.nn.softmax(jnp.where(jnp.arange(6) < 2, LOGITS, -jnp.inf))),
        # softmax(LOGITS) = [.53 .20 .12 .07 .03 .00]: the nucleus reaching 0.8 is the first three tokens
        (Sampling(1.0, top_p=0.8), jax.nn.softmax(jnp.where(jnp.arange(6) < 3, LOGITS, -jnp.inf))),
    ],
)
def test_samples_follow_the_filtered_distribution(sampling, expected):
    logits = jnp.broadcast_to(LOGITS, (N, 6))
    tokens = jax.jit(sample, static_argnums=2)(logits, row_keys(0, N), sampling)
    np.testing.assert_allclose(np.exp(log_probs(LOGITS[None], sampling))[0], expected, atol=1e-6)
    assert _tv(_empirical(tokens, 6), expected) < TV_BOUND


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (5, 17))
    np.testing.assert_array_equal(sample(logits, row_keys(0, 5), Sampling()), np.argmax(logits, -1))


def test_first_argmax_and_categorical_equal_jax():
    """The CPU-fast argmax and categorical draw give jax's own results: ties (the first index), -inf entries,
    rows all -inf, NaN (counted as the maximum, as jnp.argmax does) and a draw over masked logits."""
    x = np.asarray(jax.random.randint(jax.random.key(1), (64, 33), 0, 4), np.float32)  # many ties
    x[3] = -np.inf
    x[5, 7] = np.inf
    x[6, [2, 9]] = np.nan
    x[8, ::2] = -np.inf
    np.testing.assert_array_equal(jax.jit(first_argmax)(x), jnp.argmax(jnp.asarray(x), -1))
    keys = row_keys(3, 64)
    logits = jnp.where(
        jax.random.uniform(jax.random.key(2), (64, 33)) < 0.5, -jnp.inf, jax.random.normal(keys[0], (64, 33))
    )
    np.testing.assert_array_equal(jax.jit(categorical)(keys, logits), jax.vmap(jax.random.categorical)(keys, logits))


@pytest.mark.parametrize("s", [Sampling(1.0, 0, 1.0), Sampling(0.7, 3, 0.9), Sampling(0.0, 0, 1.0)])
def test_sample_with_logp_is_sample_and_its_log_probability(s):
    """The engine's fused draw: the token a categorical draw from `log_probs` gives with the same keys (greedy:
    the argmax), and that token's log-probability under the distribution it was drawn from (greedy: the
    unfiltered softmax)."""
    logits = jax.random.normal(jax.random.key(0), (64, 50)) * 2
    keys = row_keys(3, 64)
    token, logp = sample_with_logp(logits, keys, s)
    full = jax.nn.log_softmax(logits, axis=-1) if s.greedy else log_probs(logits, s)
    expected = jnp.argmax(logits, -1) if s.greedy else jax.vmap(jax.random.categorical)(keys, full)
    np.testing.assert_array_equal(np.asarray(token), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(logp), np.asarray(full)[np.arange(64), np.asarray(token)])
    assert np.isfinite(np.asarray(logp)).all()


@given(seed=st.integers(0, 2**16), top_k=st.sampled_from([1, 3]), top_p=st.sampled_from([0.3, 0.9, 1.0]))
@settings(max_examples=10, deadline=None)
def test_samples_stay_inside_top_k_and_nucleus(seed, top_k, top_p):
    logits = jax.random.normal(jax.random.key(seed), (64, 11)) * 3
    tokens = np.asarray(sample(logits, row_keys(seed, 64), Sampling(1.0, top_k, top_p)))
    order = np.argsort(-np.asarray(logits), axis=-1)
    probs = np.asarray(jax.nn.softmax(logits, -1))
    for row, tok in enumerate(tokens):
        rank = int(np.where(order[row] == tok)[0][0])
        assert rank < top_k
        mass_before = probs[row, order[row, :rank]].sum()
        assert mass_before < top_p + 1e-6


def test_speculative_sampling_keeps_the_target_distribution():
    vocab = 6
    target = jax.nn.log_softmax(LOGITS)
    draft = jax.nn.log_softmax(jnp.asarray([0.0, 2.0, 0.0, 1.0, 0.0, 0.5]))  # deliberately different
    keys = row_keys(1, N)
    k_draft, k_accept = jax.vmap(jax.random.split, out_axes=1)(keys)
    drafts = jax.vmap(jax.random.categorical, in_axes=(0, None))(k_draft, draft).astype(jnp.int32)
    accepted, tokens = jax.jit(speculative_accept)(
        jnp.broadcast_to(target, (N, vocab)), jnp.broadcast_to(draft, (N, vocab)), drafts, k_accept
    )
    assert _tv(_empirical(tokens, vocab), np.exp(target)) < TV_BOUND
    # Acceptance probability is sum_x min(p(x), q(x)) = 1 - TV(p, q).
    expected_rate = 1 - _tv(np.exp(target), np.exp(draft))
    assert abs(float(np.mean(accepted)) - expected_rate) < TV_BOUND
    np.testing.assert_array_equal(np.asarray(tokens)[np.asarray(accepted)], np.asarray(drafts)[np.asarray(accepted)])


def test_make_sampling_validates():
    assert make_sampling(0, 0, 1) == Sampling(0.0, 0, 1.0)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=2), dict(top_k=-2), dict(top_k=1.5),
                dict(temperature=float("inf")), dict(temperature="1")):  # fmt: skip
        with pytest.raises(ValueError):
            make_sampling(**bad)
