"""The pretraining input pipeline: documents to packed, host-sharded, checkpointable batches (Grain).

Stages, in order: source list -> shuffle (seeded, reshuffled every epoch) -> repeat -> tokenize and wrap in
BOS/EOS -> document-level FIM (PSM/SPM, :mod:`dsjax.data.fim`) -> pack into rows of ``seq_len`` tokens
(:mod:`dsjax.data.packing`, lossless) -> global batch -> this host's rows.

Host sharding: every process runs the same global stream and keeps its contiguous block of rows of each global
batch. Packing is sequential (where a row starts depends on every document before it), so sharding the source
instead would change the rows with the process count; this way the global batch is bit-identical for any
number of processes, and a checkpointed state restores on a different process count. The cost is that every
host tokenizes and packs the whole stream, which is negligible next to a training step at the scale this
pipeline serves (a dedicated input service or pre-tokenized shards would replace it at real scale).

Randomness is fixed by ``seed`` and the element index (Grain's ``random_map`` derives a generator per element),
so the stream is independent of threading, and the iterator state is a handful of integers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from dsjax.data.fim import document_tokens
from dsjax.data.packing import ROW_KEYS, PackIterDataset, empty_row
from dsjax.data.tokenizer import Tokenizer, encode_array

Batch = dict[str, np.ndarray]
# A document: text, or pre-tokenised content (token ids without BOS/EOS, which the pipeline adds).
Document = str | np.ndarray

SKIP_REASONS = {
    "corrupt": "unparseable or without a text/ids field",
    "empty": "empty or whitespace only",
    "non_utf8": "text that is not valid UTF-8",
    "too_long": "longer than train.max_doc_tokens",
    "bad_ids": "token ids outside the vocabulary",
}


@dataclasses.dataclass
class SkippedDocuments:
    """Counts (and the first few locations) of the documents left out of a corpus, by reason (``SKIP_REASONS``)."""

    counts: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        """Count one document left out for ``reason`` (a key of ``SKIP_REASONS``), found at ``where``."""
        self.counts[reason] += 1
        found = self.examples.setdefault(reason, [])
        if len(found) < 5:
            found.append(where)

    @property
    def total(self) -> int:
        """Documents left out, for all reasons."""
        return sum(self.counts.values())

    def metrics(self) -> dict[str, int]:
        """``data/skipped_<reason>`` counts, as logged with every metrics record."""
        return {f"data/skipped_{k}": v for k, v in self.counts.items()}

    def describe(self) -> str:
        """One line for logs: count, reason and first locations of each kind left out."""
        parts = [f"{n} {SKIP_REASONS[k]} ({', '.join(self.examples[k])}{', ...' if n > 5 else ''})"
                 for k, n in self.counts.items() if n]  # fmt: skip
        return "; ".join(parts) or "none skipped"


def screen_documents(
    docs: Sequence[Any], tokenizer: Tokenizer, *, max_doc_tokens: int = 0, skipped: SkippedDocuments | None = None,
    where: Sequence[str] | None = None,
) -> list[Document]:  # fmt: skip
    """The documents that can be trained on, in order; the others are counted in ``skipped`` by reason.

    Left out: empty or whitespace-only text; text that cannot be encoded as UTF-8 (lone surrogates, as from
    undecodable bytes read with ``errors="surrogateescape"`` or ``"\\udc80"`` JSON escapes, which would make the
    tokenizer raise halfway through a run); pre-tokenised documents that are not 1-D integer sequences, are
    empty or hold ids outside ``[0, tokenizer.vocab_size)``; and, with ``max_doc_tokens > 0``, documents with more
    tokens than that (text is tokenized once here for it). Without a limit long documents are kept whole: packing
    continues them across rows, nothing is truncated.

    Args:
      docs: texts (``str``) or token-id sequences.
      tokenizer: the run's tokenizer (its ``vocab_size`` bounds pre-tokenised ids).
      max_doc_tokens: longest document kept, in tokens (0: no limit).
      skipped: accumulates the counts (a fresh one if None).
      where: a location per document for the messages (default ``document <n>``, counting from 1).
    """
    skipped = SkippedDocuments() if skipped is None else skipped
    kept: list[Document] = []
    for i, doc in enumerate(docs):
        loc = where[i] if where is not None else f"document {i + 1}"
        if isinstance(doc, str):
            if not doc.strip():
                skipped.add("empty", loc)
                continue
            try:
                doc.encode("utf-8")
            except UnicodeEncodeError:
                skipped.add("non_utf8", loc)
                continue
            if max_doc_tokens and len(encode_array(tokenizer, doc)) > max_doc_tokens:
                skipped.add("too_long", loc)
                continue
            kept.append(doc)
            continue
        ids = np.asarray(doc) if isinstance(doc, list | tuple | np.ndarray) else None
        if ids is None or ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            skipped.add("corrupt", loc)
        elif ids.size == 0:
            skipped.add("empty", loc)
        elif ids.min() < 0 or ids.max() >= tokenizer.vocab_size:
            skipped.add("bad_ids", loc)
        elif max_doc_tokens and ids.size > max_doc_tokens:
            skipped.add("too_long", loc)
        else:
            kept.append(ids.astype(np.int32))
    return kept


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when not given: keeps the pipeline usable (and testable) without initialising JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    return process_index, process_count


def _stack_rows(rows: Sequence[Batch], *, batch_size: int, seq_len: int, pad_id: int) -> Batch:
    # The last global batch of a finite stream is filled with padding rows: shapes stay static (no recompile)
    # and every host still gets the same number of rows.
    rows = list(rows) + [empty_row(seq_len, pad_id)] * (batch_size - len(rows))
    return {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}


def _host_rows(batch: Batch, *, process_index: int, per_host: int) -> Batch:
    lo = process_index * per_host
    return {k: v[lo : lo + per_host] for k, v in batch.items()}


def make_pretrain_dataset(
    docs: Sequence[Document],
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    fim_rate: float = 0.1,
    fim_spm_rate: float = 0.0,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    read_threads: int = 0,
) -> grain.IterDataset:
    """The pipeline as a Grain ``IterDataset`` (arguments as :func:`make_pretrain_iterator`).

    Useful to add stages such as ``.mp_prefetch()`` before iterating.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    if not docs:
        raise ValueError("docs is empty")
    # Checked here, not first inside a Grain worker halfway through the stream.
    for name, rate in (("fim_rate", fim_rate), ("fim_spm_rate", fim_spm_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    # Pre-tokenised documents are checked here, before the run, not when the stream reaches them.
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            ids = np.asarray(doc)
            if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"docs[{i}]: expected text or a non-empty 1-D sequence of token ids")
            if ids.min() < 0 or ids.max() >= tokenizer.vocab_size:
                raise ValueError(f"docs[{i}]: token ids outside [0, {tokenizer.vocab_size}) (screen_documents skips "
                                 "such documents)")  # fmt: skip
    process_index, process_count = _process_info(process_index, process_count)
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by process_count {process_count}")

    def tokenize(text: Document, rng: np.random.Generator) -> np.ndarray:
        content = encode_array(tokenizer, text) if isinstance(text, str) else np.asarray(text, np.int32)
        return document_tokens(content, rng, fim_rate=fim_rate, tokenizer=tokenizer, fim_spm_rate=fim_spm_rate)

    ds = grain.MapDataset.source(list(docs)).seed(seed)
    # Shuffle before repeat: Grain folds the epoch into the shuffle seed, so every epoch has its own order and
    # epochs never mix. random_map seeds each element's generator from (seed, global index): FIM cuts differ
    # per epoch too, and do not depend on which thread computes them.
    ds = ds.shuffle().repeat(num_epochs).random_map(tokenize)
    # Inline by default: byte tokenization is cheap and Python threads only add GIL contention (measured 860
    # batches/s of 16 x 256 inline, 540 with one thread, 370 with 16). Threads may pay off for slow tokenizers.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64))
    it = PackIterDataset(it, seq_len=seq_len, pad_id=tokenizer.pad_id)
    stack = functools.partial(_stack_rows, batch_size=batch_size, seq_len=seq_len, pad_id=tokenizer.pad_id)
    it = it.batch(batch_size, batch_fn=stack)
    if process_count > 1:
        it = it.map(functools.partial(_host_rows, process_index=process_index, per_host=batch_size // process_count))
    return it


def make_pretrain_iterator(docs: Sequence[Document], tokenizer: Tokenizer, **options: Any) -> grain.DatasetIterator:
    """Packed pretraining batches for this process, resumable via ``get_state()``/``set_state()``.

    Each element is a dict of numpy arrays of shape ``[batch_size // process_count, seq_len]``:
    ``tokens``, ``targets``, ``segment_ids``, ``positions`` (int32) and ``loss_mask`` (bool); see
    :mod:`dsjax.data.packing` for their exact meaning. In short: train ``logits(tokens)`` against ``targets``
    where ``loss_mask``; pass ``segment_ids`` and ``positions`` to the model so attention stays within a document.

    Args (keyword-only after ``tokenizer``, as for :func:`make_pretrain_dataset`):
      docs: the training documents (e.g. :func:`dsjax.data.corpus.default_corpus`): texts, or pre-tokenised
        content as 1-D integer arrays (no BOS/EOS; ids within the tokenizer's vocabulary, else ValueError).
        :func:`screen_documents` drops (and counts) the documents that would fail.
      tokenizer: a :class:`~dsjax.data.tokenizer.Tokenizer`.
      batch_size: the global batch size, over all processes.
      seq_len: tokens per row.
      seed: fixes the shuffle and the FIM decisions.
      fim_rate: probability that a document is FIM-rearranged (DeepSeek-V3: 0.1, DeepSeek-Coder: 0.5).
      fim_spm_rate: share of the rearranged documents laid out SPM instead of PSM (default 0: PSM only).
      num_epochs: passes over ``docs``; ``None`` repeats forever. A finite stream ends with a batch whose last
        row is padded at the tail and, if the rows run out, completed with all-padding rows.
      process_index, process_count: this host's slot; default ``jax.process_index()``/``jax.process_count()``.
      read_threads: Grain threads tokenizing ahead of the packer; 0 (the default, fastest for the byte
        tokenizer) tokenizes inline. The stream is the same for any value.

    Returns:
      A ``grain.DatasetIterator``. ``get_state()`` returns a small JSON-serialisable dict (store it next to the
      model checkpoint); ``set_state(state)`` on an iterator built with the same arguments continues exactly
      where the saved one stood, even if ``process_count`` changed in between.
    """
    return iter(make_pretrain_dataset(docs, tokenizer, **options))


def future_targets(batch: Batch, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Targets and mask for predicting the token ``depth + 1`` places ahead (``depth=0``: next token; MTP uses
    ``depth=k`` at MTP depth k).

    ``targets[:, i + depth]`` is that token; it counts only if it is a real target (``loss_mask``) of the same
    document piece as position ``i``. Positions whose token lies past the row end are masked. Works on host
    numpy batches and, unchanged, on ``jax.numpy`` arrays.
    """
    targets, mask, seg = batch["targets"], batch["loss_mask"], batch["segment_ids"]
    if depth == 0:
        return targets, mask
    t = targets.shape[-1]
    xp = np if isinstance(targets, np.ndarray) else _jnp()
    pad = lambda x, value: xp.concatenate([x[:, depth:], xp.full((x.shape[0], min(depth, t)), value, x.dtype)], 1)
    shifted_mask = pad(mask, False) & (pad(seg, 0) == seg)
    return pad(targets, 0), shifted_mask


def _jnp() -> Any:
    import jax.numpy as jnp

    return jnp
