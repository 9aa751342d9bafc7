"""Bad inputs get clear errors at the API boundary, never silently wrong logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax

CFG = dsjax.ModelConfig.tiny()


@pytest.fixture(scope="module")
def model():
    return dsjax.create_model(CFG)


@pytest.mark.parametrize(
    ("tokens", "error", "match"),
    [
        (np.array([[1, 2, CFG.vocab_size]]), ValueError, "outside"),
        (np.array([[-1, 2]]), ValueError, "outside"),
        (np.array([1, 2, 3]), ValueError, r"shape \[batch, seq\]"),
        (np.zeros((1, 3), np.float32), TypeError, "integer"),
        (np.zeros((1, 0), np.int32), ValueError, "non-empty"),
        (np.zeros((1, CFG.max_position_embeddings + 1), np.int32), ValueError, "max_position_embeddings"),
    ],
)
def test_bad_tokens(model, tokens, error, match):
    with pytest.raises(error, match=match):
        model(tokens)


def test_lists_are_accepted_and_jit_marks_out_of_range_with_nan(model):
    assert model([[1, 2, 3]]).shape == (1, 3, CFG.vocab_size)
    # Inside jit the ids cannot be checked; the embedding gather fills NaN instead of clamping silently.
    # The NaN spreads through its row (0 * NaN in attention) but not into other rows of the batch.
    logits = np.asarray(jax.jit(lambda t: model(t))(jnp.array([[1, 2], [1, CFG.vocab_size + 5]])))
    assert np.isfinite(logits[0]).all() and np.isnan(logits[1, 1]).all()


def test_mismatched_positions_are_rejected(model):
    with pytest.raises(ValueError, match="positions has shape"):
        model([[1, 2, 3]], positions=np.zeros((1, 2), np.int32))


def test_unknown_options_are_rejected(model):
    with pytest.raises(ValueError, match="attention="):
        model([[1, 2]], attention="flash")
    with pytest.raises(ValueError, match="dispatch="):
        model([[1, 2]], dispatch="capacity")
