"""Document-level fill-in-the-middle (FIM) in PSM and SPM form, as in DeepSeek-Coder and DeepSeek-V3 (§4.1).

With probability ``rate`` a document is cut at two uniformly random points into prefix, middle and suffix and
rearranged, so that ordinary next-token prediction teaches the model to fill a hole from both sides. Two layouts
(Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle")::

    PSM:  <fim_begin> prefix <fim_hole> suffix <fim_end> middle
    SPM:  <fim_begin> <fim_hole> suffix <fim_end> prefix middle

DeepSeek's three sentinels play the roles of the paper's ``<PRE> <SUF> <MID>``. SPM is the paper's variant that
codellama ships (``<PRE> <SUF>{suf} <MID> {pre}`` in its ``infilling_prompt_tokens``), not the naive
``<SUF> suffix <PRE> prefix <MID> middle``: the prefix and the middle stay adjacent, so the middle is a plain
continuation of the prefix, and every sentinel keeps its PSM role (``fim_end`` still marks where the model
starts writing). The two layouts coincide when the prefix is empty, which is harmless: :func:`undo_fim` gives
the same document under either reading. DeepSeek-Coder trains PSM at rate 0.5, V3 PSM at rate 0.1; a share
``spm_rate`` of the FIM documents can be laid out SPM instead (default 0: PSM only).

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

FIM_MODES = ("psm", "spm")


def _check_rate(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_mode(mode: str) -> None:
    if mode not in FIM_MODES:
        raise ValueError(f"FIM mode must be one of {FIM_MODES}, got {mode!r}")


def fim_layout(prefix, middle, suffix, tokenizer: Tokenizer, *, mode: str = "psm") -> np.ndarray:
    """The FIM sequence of three pieces of token ids, as int32.

    ``mode="psm"``: ``[fim_begin, *prefix, fim_hole, *suffix, fim_end, *middle]``;
    ``mode="spm"``: ``[fim_begin, fim_hole, *suffix, fim_end, *prefix, *middle]``.
    With an empty ``middle`` this is the infilling prompt: the model then generates the middle.
    """
    _check_mode(mode)
    begin, hole, end = ([t] for t in (tokenizer.fim_begin_id, tokenizer.fim_hole_id, tokenizer.fim_end_id))
    pieces = [begin, prefix, hole, suffix, end, middle] if mode == "psm" else [begin, hole, suffix, end, prefix, middle]
    return np.concatenate([np.asarray(p, dtype=np.int32).reshape(-1) for p in pieces])


def apply_fim(
    tokens: np.ndarray, rng: np.random.Generator, *, rate: float, tokenizer: Tokenizer, spm_rate: float = 0.0
) -> np.ndarray:
    """FIM-rearranges a document's tokens with probability ``rate``; a share ``spm_rate`` of those SPM, else PSM.

    Args:
      tokens: int32 ``[n]`` document content, without BOS/EOS (those stay outside the FIM span).
      rng: the randomness; the result is a deterministic function of ``tokens`` and the generator's state.
      rate: probability in [0, 1] that the document is rearranged.
      tokenizer: supplies the sentinel ids.
      spm_rate: probability in [0, 1] that a rearranged document takes the SPM layout (0: always PSM, 1: always
        SPM). The draws are ordered coin, cut points, then the SPM coin (drawn only when ``spm_rate > 0``), so
        for a given generator the cut points do not depend on ``spm_rate``, and ``spm_rate=0`` consumes exactly
        the draws it did before SPM existed: PSM streams are bit-identical to earlier versions.

    Returns:
      ``tokens`` unchanged (the same object), or int32 ``[n + 3]`` in the layout of :func:`fim_layout`.

    Raises:
      ValueError: ``rate`` or ``spm_rate`` outside [0, 1].
    """
    _check_rate(rate, "FIM rate")
    _check_rate(spm_rate, "FIM SPM rate")
    # Draw the coin even at rate 0 or 1: then, for a given generator, the documents rearranged at rate r are a
    # subset of those rearranged at any larger rate, so changing the rate perturbs the stream as little as possible.
    if not rng.random() < rate:
        return tokens
    n = len(tokens)
    # Two independent uniform cut points in [0, n], sorted: empty prefix, middle or suffix are all possible.
    lo, hi = np.sort(rng.integers(0, n + 1, size=2))
    # Same subset argument for the layout: SPM documents at share s are a subset of those at any larger share.
    mode = "spm" if spm_rate > 0 and rng.random() < spm_rate else "psm"
    return fim_layout(tokens[:lo], tokens[lo:hi], tokens[hi:], tokenizer, mode=mode)


def is_fim(tokens: np.ndarray, tokenizer: Tokenizer) -> bool:
    """Whether ``tokens`` (content without BOS/EOS) is in FIM form (PSM or SPM)."""
    return len(tokens) > 0 and int(tokens[0]) == tokenizer.fim_begin_id


def fim_mode(tokens: np.ndarray, tokenizer: Tokenizer) -> str | None:
    """``"psm"``, ``"spm"`` or ``None`` (not FIM). A PSM sequence with an empty prefix is identical to an SPM
    one and reads as ``"spm"``."""
    if not is_fim(tokens, tokenizer):
        return None
    return "spm" if len(tokens) > 1 and int(tokens[1]) == tokenizer.fim_hole_id else "psm"


def fim_parts(tokens: np.ndarray, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits a FIM sequence of either layout into ``(prefix, middle, suffix)``.

    An SPM sequence does not record where the prefix ends and the middle begins: its prefix comes back empty and
    its middle holds prefix + middle (their concatenation, all that :func:`undo_fim` needs, is exact). A PSM
    sequence with an empty prefix is the same sequence and splits the same way.

    Raises:
      ValueError: ``tokens`` does not start with ``fim_begin`` or lacks a ``fim_hole`` / ``fim_end`` after it.
    """
    tokens = np.asarray(tokens)
    if not is_fim(tokens, tokenizer):
        raise ValueError("not a FIM sequence: it does not start with fim_begin")
    # Content has no sentinels, so the first hole and the first end after it delimit the pieces.
    holes = np.flatnonzero(tokens[1:] == tokenizer.fim_hole_id)
    if not holes.size:
        raise ValueError("malformed FIM sequence: no fim_hole after fim_begin")
    hole = 1 + int(holes[0])
    ends = np.flatnonzero(tokens[hole + 1 :] == tokenizer.fim_end_id)
    if not ends.size:
        raise ValueError("malformed FIM sequence: no fim_end after fim_hole")
    end = hole + 1 + int(ends[0])
    return tokens[1:hole], tokens[end + 1 :], tokens[hole + 1 : end]


def undo_fim(tokens: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """Inverse of :func:`apply_fim`: returns ``prefix + middle + suffix`` for a PSM or SPM sequence, else
    ``tokens``.

    Assumes the document itself contains no sentinel ids (true for :class:`~dsjax.data.tokenizer.ByteTokenizer`;
    a Hugging Face tokenizer maps the sentinel strings to their ids if they occur in raw text).

    Raises:
      ValueError: a sequence that starts with ``fim_begin`` but lacks ``fim_hole`` or ``fim_end``.
    """
    tokens = np.asarray(tokens)
    if not is_fim(tokens, tokenizer):
        return tokens
    # PSM reads (prefix, middle, suffix); SPM reads (empty, prefix + middle, suffix): one formula for both.
    prefix, middle, suffix = fim_parts(tokens, tokenizer)
    return np.concatenate([prefix, middle, suffix]).astype(tokens.dtype, copy=False)


def document_tokens(
    content: np.ndarray, rng: np.random.Generator, *, fim_rate: float, tokenizer: Tokenizer, fim_spm_rate: float = 0.0
):
    """A training document: ``[bos, *maybe_fim(content), eos]`` as int32 (``fim_spm_rate``: see :func:`apply_fim`).

    BOS/EOS wrap the FIM span as in V3's ``<fim_begin> pre <fim_hole> suf <fim_end> mid <eos>`` layout.
    """
    content = np.asarray(content, dtype=np.int32)
    body = apply_fim(content, rng, rate=fim_rate, tokenizer=tokenizer, spm_rate=fim_spm_rate)
    bos, eos = np.array([tokenizer.bos_id], np.int32), np.array([tokenizer.eos_id], np.int32)
    return np.concatenate([bos, body, eos])
