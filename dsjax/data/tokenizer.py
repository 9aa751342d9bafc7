"""Tokenizers for pretraining: a built-in byte-level one and Hugging Face ``tokenizer.json`` files.

Both expose the same small interface (:class:`Tokenizer`), which is all the data pipeline needs: text to ids and
back, the vocabulary size, and the ids of the special tokens it inserts itself (document boundaries, padding and
the fill-in-the-middle sentinels). ``encode`` never adds special tokens; the pipeline adds them explicitly.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import numpy as np

# DeepSeek-V2/V3 spell their special tokens with full-width bars and U+2581 ("▁") in place of spaces.
DEEPSEEK_BOS = "<｜begin▁of▁sentence｜>"
DEEPSEEK_EOS = "<｜end▁of▁sentence｜>"
DEEPSEEK_FIM_BEGIN = "<｜fim▁begin｜>"
DEEPSEEK_FIM_HOLE = "<｜fim▁hole｜>"
DEEPSEEK_FIM_END = "<｜fim▁end｜>"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer.

    Attributes:
      vocab_size: number of embedding rows the model needs (every id is below it).
      bos_id, eos_id: start and end of a document.
      pad_id: filler for the tail of the last packed row (always masked, so any valid id works).
      fim_begin_id, fim_hole_id, fim_end_id: the fill-in-the-middle sentinels (PSM and SPM layouts).
    """

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    fim_begin_id: int
    fim_hole_id: int
    fim_end_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special tokens added."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special tokens are rendered as their strings."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256..261 the special tokens.

    The specials are, in order, ``<bos> <eos> <pad> <fim_begin> <fim_hole> <fim_end>``. ``vocab_size`` is 264, the
    262 used ids rounded up to a multiple of 8 so that embedding and head matrices have accelerator-friendly
    shapes; ids 262 and 263 are never produced. Encoding cannot emit a special id, so any text round-trips and
    FIM sentinels are never ambiguous with document content.
    """

    SPECIALS = ("<bos>", "<eos>", "<pad>", "<fim_begin>", "<fim_hole>", "<fim_end>")
    vocab_size = 264
    bos_id, eos_id, pad_id, fim_begin_id, fim_hole_id, fim_end_id = range(256, 262)

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` as ids in [0, 256)."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Like :meth:`encode` but returns int32 numpy directly (the pipeline's fast path, no Python list)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``: byte runs decoded as UTF-8 (invalid bytes become U+FFFD), specials as ``<name>``."""
        parts, run = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            # Ids past the specials are padding rows of the vocabulary; name them rather than fail on model output.
            parts.append(self.SPECIALS[i - 256] if i < 262 else f"<unused_{i}>")
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` (a ``tokenizer.json`` file) behind the :class:`Tokenizer` interface.

    Build it with :meth:`from_file`. Special-token ids are looked up by their strings, which default to
    DeepSeek-V2/V3's; every one must be in the vocabulary.
    """

    def __init__(
        self,
        tokenizer,
        *,
        bos_token: str = DEEPSEEK_BOS,
        eos_token: str = DEEPSEEK_EOS,
        pad_token: str | None = None,
        fim_begin_token: str = DEEPSEEK_FIM_BEGIN,
        fim_hole_token: str = DEEPSEEK_FIM_HOLE,
        fim_end_token: str = DEEPSEEK_FIM_END,
    ):
        """Wraps an already loaded ``tokenizers.Tokenizer``; see :meth:`from_file` for the arguments."""
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._require(bos_token, "bos_token")
        self.eos_id = self._require(eos_token, "eos_token")
        # DeepSeek's configs pad with the EOS token; padding is always masked, so reusing it is harmless.
        self.pad_id = self.eos_id if pad_token is None else self._require(pad_token, "pad_token")
        self.fim_begin_id = self._require(fim_begin_token, "fim_begin_token")
        self.fim_hole_id = self._require(fim_hole_token, "fim_hole_token")
        self.fim_end_id = self._require(fim_end_token, "fim_end_token")
        # Added tokens may sit past get_vocab_size() in malformed files; make sure every id fits the embedding.
        top = max(self.bos_id, self.eos_id, self.pad_id, self.fim_begin_id, self.fim_hole_id, self.fim_end_id)
        self.vocab_size = max(self.vocab_size, top + 1)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **special_tokens: str | None) -> HFTokenizer:
        """Loads a ``tokenizer.json``.

        Args:
          path: the ``tokenizer.json`` file (a DeepSeek checkpoint directory holds one).
          special_tokens: as for the constructor:
          bos_token, eos_token: document boundary token strings.
          pad_token: padding token string; ``None`` pads with ``eos_token``'s id.
          fim_begin_token, fim_hole_token, fim_end_token: the FIM sentinel strings.

        Raises:
          ValueError: a required special token is not in the vocabulary (the message names it and the argument).
        """
        from tokenizers import Tokenizer as _HFTok  # imported lazily: only needed for real tokenizers

        return cls(_HFTok.from_file(os.fspath(path)), **special_tokens)

    def _require(self, token: str, arg: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"special token {token!r} ({arg}) is not in the tokenizer's vocabulary; "
                f"add it to tokenizer.json or pass {arg}=... with a token the vocabulary has"
            )
        return token_id

    def token_id(self, token: str) -> int | None:
        """The id of a token string (e.g. a special token), or None if the vocabulary lacks it."""
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS (post-processor templates are skipped). Special tokens written in
        the text (e.g. a chat template's) are encoded as their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """Like :meth:`encode`, as int32 numpy."""
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, keeping special tokens so that FIM-formatted sequences stay readable."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size})"


def encode_array(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """``tokenizer.encode(text)`` as int32 numpy, using the tokenizer's fast path when it has one."""
    fast = getattr(tokenizer, "encode_array", None)
    return fast(text) if fast is not None else np.asarray(tokenizer.encode(text), dtype=np.int32)
