"""Document-level fill-in-the-middle (FIM) in PSM mode, as in DeepSeek-Coder and DeepSeek-V3 (§4.1).

With probability ``rate`` a document is cut at two uniformly random points into prefix, middle and suffix and
rearranged as::

    <fim_begin> prefix <fim_hole> suffix <fim_end> middle

so that ordinary next-token prediction teaches the model to fill a hole from both sides. V3 uses rate 0.1.

The split is done on token ids after tokenization, not on characters before it. On characters, re-tokenizing
the three pieces changes the token sequence near the cuts (BPE merges across a cut are lost), so the multiset of
tokens would not be preserved and the exact invariants below could not be tested; on tokens, FIM is a pure
permutation plus three sentinels, and costs no second tokenization. The byte-level tokenizer makes both
choices identical anyway. The cost is that a hole can never start inside a multi-byte token, which is also what
the model sees at inference when the prompt is tokenized piecewise.
"""

from __future__ import annotations

import numpy as np

from dsjax.data.tokenizer import Tokenizer


def apply_fim(tokens: np.ndarray, rng: np.random.Generator, *, rate: float, tokenizer: Tokenizer) -> np.ndarray:
    """PSM-rearranges a document's tokens with probability ``rate``.

    Args:
      tokens: int32 ``[n]`` document content, without BOS/EOS (those stay outside the FIM span).
      rng: the randomness; the result is a deterministic function of ``tokens`` and the generator's state.
      rate: probability in [0, 1] that the document is rearranged.
      tokenizer: supplies the sentinel ids.

    Returns:
      ``tokens`` unchanged (the same object), or int32 ``[n + 3]``
      ``[fim_begin, *prefix, fim_hole, *suffix, fim_end, *middle]``.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"FIM rate must be in [0, 1], got {rate}")
    # Draw the coin even at rate 0 or 1: then, for a given generator, the documents rearranged at rate r are a
    # subset of those rearranged at any larger rate, so changing the rate perturbs the stream as little as possible.
    if not rng.random() < rate:
        return tokens
    n = len(tokens)
    # Two independent uniform cut points in [0, n], sorted: empty prefix, middle or suffix are all possible.
    lo, hi = np.sort(rng.integers(0, n + 1, size=2))
    sentinel = lambda i: np.array([i], dtype=np.int32)
    return np.concatenate(
        [
            sentinel(tokenizer.fim_begin_id),
            tokens[:lo],
            sentinel(tokenizer.fim_hole_id),
            tokens[hi:],
            sentinel(tokenizer.fim_end_id),
            tokens[lo:hi],
        ]
    ).astype(np.int32, copy=False)


def is_fim(tokens: np.ndarray, tokenizer: Tokenizer) -> bool:
    """Whether ``tokens`` (content without BOS/EOS) is in PSM form."""
    return len(tokens) > 0 and int(tokens[0]) == tokenizer.fim_begin_id


def undo_fim(tokens: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """Inverse of :func:`apply_fim`: returns ``prefix + middle + suffix`` for a PSM sequence, else ``tokens``.

    Assumes the document itself contains no sentinel ids (true for :class:`~dsjax.data.tokenizer.ByteTokenizer`;
    a Hugging Face tokenizer maps the sentinel strings to their ids if they occur in raw text).
    """
    tokens = np.asarray(tokens)
    if not is_fim(tokens, tokenizer):
        return tokens
    # The first hole and the first end after it delimit the pieces; content has no sentinels, so they are unique.
    hole = 1 + int(np.flatnonzero(tokens[1:] == tokenizer.fim_hole_id)[0])
    end = hole + 1 + int(np.flatnonzero(tokens[hole + 1 :] == tokenizer.fim_end_id)[0])
    prefix, suffix, middle = tokens[1:hole], tokens[hole + 1 : end], tokens[end + 1 :]
    return np.concatenate([prefix, middle, suffix]).astype(tokens.dtype, copy=False)


def document_tokens(content: np.ndarray, rng: np.random.Generator, *, fim_rate: float, tokenizer: Tokenizer):
    """A training document: ``[bos, *maybe_fim(content), eos]`` as int32.

    BOS/EOS wrap the FIM span as in V3's ``<fim_begin> pre <fim_hole> suf <fim_end> mid <eos>`` layout.
    """
    body = apply_fim(np.asarray(content, dtype=np.int32), rng, rate=fim_rate, tokenizer=tokenizer)
    bos, eos = np.array([tokenizer.bos_id], np.int32), np.array([tokenizer.eos_id], np.int32)
    return np.concatenate([bos, body, eos])
