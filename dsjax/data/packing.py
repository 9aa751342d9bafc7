"""Lossless sequence packing as a checkpointable Grain transformation.

Documents (int32 token arrays, BOS/EOS already added) are concatenated in stream order and cut into rows of
``seq_len`` tokens. Every token lands in exactly one row, once, in order: a document that does not fit in the room
left in a row fills it and continues at the start of the next. Only the final row of a finite stream is padded.

Why not Grain's own packers: ``FirstFitPackIterDataset``/``BestFitPackIterDataset`` raise on documents longer
than the row (they expect callers to truncate, which drops tokens) and reorder documents;
``ConcatThenSplitIterDataset`` is lossless too, but it cannot give the last token of a row its real target (the
first token of the next row), and it checkpoints by replaying from its last empty-buffer point. This packer
stores just (where the current document started in the parent stream, how much of it was emitted) and restores
in O(1).

Each row is a dict of ``[seq_len]`` arrays:

* ``tokens`` (int32): model inputs.
* ``targets`` (int32): the next token of the same document, ``tokens[i + 1]`` within the row and, for the last
  position of a document that continues in the next row, that row's first token. ``pad_id`` where there is none.
* ``loss_mask`` (bool): ``targets[i]`` is a real next token of the same document, i.e. ``tokens[i]`` is neither
  padding nor its document's last token (EOS). Predictions never cross a document boundary.
* ``segment_ids`` (int32): 1, 2, ... for the pieces of documents in the row, in order; 0 only for padding. The
  continuation of a split document gets a fresh id in its new row (ids are local to a row).
* ``positions`` (int32): 0, 1, ... from the start of each piece. A continuation restarts at 0: attention cannot
  see the earlier rows anyway, so the piece is a fresh context, and positions stay within [0, seq_len) like
  everything the model sees at this length (DeepSeek-V3 likewise positions every packed sample from 0).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

ROW_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A row of padding only (what the padded tail of a row looks like, everywhere)."""
    return {
        "tokens": np.full(seq_len, pad_id, np.int32),
        "targets": np.full(seq_len, pad_id, np.int32),
        "loss_mask": np.zeros(seq_len, bool),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
    }


class PackIterDataset(grain.IterDataset):
    """Packs a stream of 1-D int32 documents into rows of ``seq_len`` tokens (see the module docstring).

    Args:
      parent: yields one document (int32 ``[n]``, ``n >= 1``) per element; empty documents are skipped.
      seq_len: tokens per row.
      pad_id: id written into padding (it is masked; any valid id works).
    """

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int):
        super().__init__(parent)
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self._seq_len = seq_len
        self._pad_id = pad_id

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), seq_len=self._seq_len, pad_id=self._pad_id)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len}, pad_id={self._pad_id})"


class _PackIterator(grain.DatasetIterator):
    """State: the parent's state just before the current document, and how many of its tokens were emitted."""

    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, pad_id: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._doc: np.ndarray | None = None  # the partly emitted document, if any
        self._doc_state: Any = None  # parent state from which next(parent) yields self._doc again
        self._offset = 0  # tokens of self._doc already emitted

    def _next_doc(self) -> bool:
        """Pulls the next non-empty document into ``self._doc``; False at the end of the stream."""
        while True:
            self._doc_state = self._parent.get_state()
            try:
                doc = next(self._parent)
            except StopIteration:
                self._doc = None
                return False
            if len(doc):
                self._doc, self._offset = np.asarray(doc, dtype=np.int32), 0
                return True

    def __next__(self) -> dict[str, np.ndarray]:
        t = self._seq_len
        row = empty_row(t, self._pad_id)
        filled, segment = 0, 0
        while filled < t:
            if self._doc is None and not self._next_doc():
                break
            doc, start = self._doc, self._offset
            n = len(doc)
            take = min(t - filled, n - start)
            end = start + take
            segment += 1
            sl = slice(filled, filled + take)
            row["tokens"][sl] = doc[start:end]
            # Targets come from the whole document, so a piece's last target may be the next row's first token.
            tgt = doc[start + 1 : end + 1]
            row["targets"][filled : filled + len(tgt)] = tgt
            row["loss_mask"][filled : filled + len(tgt)] = True
            row["segment_ids"][sl] = segment
            row["positions"][sl] = np.arange(take, dtype=np.int32)
            filled += take
            self._offset = end
            if end == n:
                self._doc = None
        if filled == 0:
            raise StopIteration
        return row

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable: the parent's state plus an offset (ints)."""
        if self._doc is None:
            return {"parent": self._parent.get_state(), "offset": 0}
        return {"parent": self._doc_state, "offset": int(self._offset)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores the position saved by :meth:`get_state`, re-reading at most one document."""
        self._parent.set_state(state["parent"])
        self._doc = None
        self._offset = 0
        if state["offset"]:
            if not self._next_doc():
                raise ValueError("packing state points into a document that the parent stream no longer yields")
            self._offset = int(state["offset"])

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len})"
