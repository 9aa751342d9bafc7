"""Pretraining data pipeline: tokenizers, corpus, FIM and packing invariants, resumption, host sharding."""

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tok_fixtures import write_tokenizer

from dsjax.data import (
    ROW_KEYS,
    ByteTokenizer,
    HFTokenizer,
    PackIterDataset,
    Tokenizer,
    apply_fim,
    default_corpus,
    document_tokens,
    future_targets,
    generate_document,
    is_fim,
    make_pretrain_iterator,
    train_validation_split,
    undo_fim,
    unigram_entropy,
)
from dsjax.data import tokenizer as tokenizer_lib

BYTE = ByteTokenizer()
SENTINELS = {BYTE.fim_begin_id, BYTE.fim_hole_id, BYTE.fim_end_id}
DOCS = default_corpus(96, seed=1)


def _iterator(docs=DOCS, **kw):
    args = dict(batch_size=4, seq_len=64, seed=0, process_index=0, process_count=1) | kw
    return make_pretrain_iterator(docs, BYTE, **args)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --- tokenizers ---------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trip(text):
    ids = BYTE.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert BYTE.decode(ids) == text
    np.testing.assert_array_equal(BYTE.encode_array(text), ids)


def test_byte_tokenizer_specials():
    ids = [BYTE.bos_id, BYTE.fim_begin_id, BYTE.fim_hole_id, BYTE.fim_end_id, BYTE.eos_id, BYTE.pad_id]
    assert len(set(ids)) == 6 and all(256 <= i < BYTE.vocab_size for i in ids)
    assert BYTE.vocab_size % 8 == 0
    assert BYTE.decode([BYTE.bos_id, *b"h\xc3\xa9", BYTE.eos_id]) == "<bos>hé<eos>"
    assert isinstance(BYTE, Tokenizer)


@pytest.fixture(scope="module")
def hf_tokenizer_file(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", DOCS)


def test_hf_tokenizer(hf_tokenizer_file):
    tok = HFTokenizer.from_file(hf_tokenizer_file)
    assert isinstance(tok, Tokenizer)
    ids = [tok.bos_id, tok.eos_id, tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id]
    assert len(set(ids)) == 5 and max(ids) < tok.vocab_size and tok.pad_id == tok.eos_id
    text = DOCS[0] + "unseen wörds ✓"
    enc = tok.encode(text)
    assert tok.decode(enc) == text
    assert len(enc) < len(text.encode())  # BPE merges happened
    assert not set(enc) & set(ids)  # encode adds no special tokens
    assert tok.decode([tok.fim_hole_id]) == tokenizer_lib.DEEPSEEK_FIM_HOLE
    batch = next(make_pretrain_iterator(DOCS, tok, batch_size=2, seq_len=32, seed=0, process_count=1))
    assert batch["tokens"].max() < tok.vocab_size and batch["tokens"][0, 0] == tok.bos_id


def test_hf_tokenizer_missing_special(hf_tokenizer_file):
    with pytest.raises(ValueError, match=r"'<pad>' \(pad_token\) is not in the tokenizer's vocabulary"):
        HFTokenizer.from_file(hf_tokenizer_file, pad_token="<pad>")


# --- corpus -------------------------------------------------------------------------------------------------


def test_corpus_deterministic():
    assert default_corpus(40, seed=3) == default_corpus(40, seed=3)
    assert default_corpus(40, seed=3)[:10] == default_corpus(10, seed=3)  # document i depends only on (seed, i)
    assert default_corpus(10, seed=3) != default_corpus(10, seed=4)
    assert generate_document(7, 3) == default_corpus(8, seed=3)[7]
    assert len(set(default_corpus(200))) == 200
    train, val = train_validation_split(DOCS, 0.1)
    assert train + val == DOCS and len(val) == round(0.1 * len(DOCS))


def test_corpus_has_learnable_structure():
    docs = default_corpus(300)
    text = "".join(docs)
    for marker in ("def ", " = ", "count up: ", "spell ", " gives ", "the "):
        assert marker in text
    # Arithmetic answers are right, so they can be learnt rather than memorised as noise.
    facts = [line.split() for doc in docs for line in doc.splitlines() if line.count(" ") == 4 and " = " in line]
    assert len(facts) > 300
    for a, op, b, _, c in facts:
        assert eval(f"{int(a)} {op} {int(b)}") == int(c), (a, op, b, c)


def test_unigram_entropy():
    assert unigram_entropy([[0, 1], [2, 3]]) == pytest.approx(math.log(4))
    assert unigram_entropy([[5, 5, 5, 9]]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert unigram_entropy([[1, 1, 1]]) == 0.0
    h = unigram_entropy(BYTE.encode(d) for d in default_corpus(200))
    assert 2.5 < h < 4.0  # well below log(vocab) = 5.6: English-like text over a small alphabet
    with pytest.raises(ValueError):
        unigram_entropy([[]])


# --- fill-in-the-middle -------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.integers(0, 2**32 - 1))
def test_fim_invariants(text, seed):
    content = BYTE.encode_array(text)
    out = apply_fim(content, np.random.default_rng(seed), rate=1.0, tokenizer=BYTE)
    assert is_fim(out, BYTE) and len(out) == len(content) + 3
    assert Counter(out.tolist()) - Counter(content.tolist()) == Counter(sorted(SENTINELS))
    np.testing.assert_array_equal(undo_fim(out, BYTE), content)
    # Deterministic in the generator, and identity at rate 0.
    np.testing.assert_array_equal(out, apply_fim(content, np.random.default_rng(seed), rate=1.0, tokenizer=BYTE))
    assert apply_fim(content, np.random.default_rng(seed), rate=0.0, tokenizer=BYTE) is content
    doc = document_tokens(content, np.random.default_rng(seed), fim_rate=1.0, tokenizer=BYTE)
    assert doc[0] == BYTE.bos_id and doc[-1] == BYTE.eos_id and doc[1] == BYTE.fim_begin_id


def test_fim_rate_and_cut_points():
    rng = np.random.default_rng(0)
    content = np.arange(20, dtype=np.int32)
    outs = [apply_fim(content, rng, rate=0.1, tokenizer=BYTE) for _ in range(4000)]
    fimmed = [o for o in outs if is_fim(o, BYTE)]
    assert abs(len(fimmed) / len(outs) - 0.1) < 0.02  # 4 standard deviations
    middles = [len(o) - 1 - int(np.flatnonzero(o == BYTE.fim_end_id)[0]) for o in fimmed]
    assert min(middles) == 0 and max(middles) >= 15  # two uniform cuts: empty and long middles both occur


# --- packing ------------------------------------------------------------------------------------------------


def _check_rows(rows, docs, seq_len, pad_id):
    """Every token of every document exactly once, in order; segment ids, positions, targets and mask exact."""
    stream = np.concatenate([np.zeros(0, np.int32), *docs])
    doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    last_in_doc = set((np.cumsum([len(d) for d in docs]) - 1).tolist())
    g = 0  # index into the concatenated stream
    for r, row in enumerate(rows):
        assert set(row) == set(ROW_KEYS) and all(v.shape == (seq_len,) for v in row.values())
        real = row["segment_ids"] > 0
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any()  # padding only at the tail...
        assert n == seq_len or r == len(rows) - 1  # ...of the final row
        np.testing.assert_array_equal(row["tokens"][:n], stream[g : g + n])
        assert (row["tokens"][n:] == pad_id).all() and not row["loss_mask"][n:].any()
        # A new segment starts exactly at the row start and at each document start; ids count 1, 2, ...
        starts = np.array([i == 0 or doc_of[g + i] != doc_of[g + i - 1] for i in range(n)], bool)
        np.testing.assert_array_equal(row["segment_ids"][:n], np.cumsum(starts))
        seg_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        np.testing.assert_array_equal(row["positions"][:n], np.arange(n) - seg_start)
        # A target is valid iff the next stream token belongs to the same document (it may be in the next row).
        valid = np.array([g + i not in last_in_doc for i in range(n)], bool)
        np.testing.assert_array_equal(row["loss_mask"][:n], valid)
        np.testing.assert_array_equal(row["targets"][:n][valid], stream[g + np.flatnonzero(valid) + 1])
        g += n
    assert g == len(stream)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=12), st.integers(1, 16))
def test_packing_invariants_and_resume(lengths, seq_len):
    import grain

    offsets = np.cumsum([0, *lengths])
    docs = [np.arange(a, b, dtype=np.int32) + 1 for a, b in itertools.pairwise(offsets)]  # every token unique
    ds = PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), seq_len=seq_len, pad_id=-1)
    rows = list(ds)
    _check_rows(rows, [d for d in docs if len(d)], seq_len, pad_id=-1)
    # Resuming from the state after a prefix yields exactly the remaining rows (a spread of prefixes: all of
    # them would make the test quadratic in the number of rows).
    for k in sorted({0, 1, 2, 3, len(rows) // 3, len(rows) // 2, len(rows) - 1, len(rows)} & set(range(len(rows) + 1))):
        it = iter(ds)
        _take(it, k)
        fresh = iter(ds)
        fresh.set_state(json.loads(json.dumps(it.get_state())))
        _assert_batches_equal(list(fresh), rows[k:])


def test_pipeline_keeps_every_document_once():
    """One epoch through the full pipeline: the packed stream is the shuffled documents, FIM undone."""
    it = _iterator(num_epochs=1, fim_rate=0.5, batch_size=3, seq_len=50)
    batches = list(it)
    rows = [{k: b[k][i] for k in ROW_KEYS} for b in batches for i in range(3)]
    tokens = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows])
    pieces = np.split(tokens, np.flatnonzero(tokens == BYTE.bos_id)[1:])
    assert all(p[0] == BYTE.bos_id and p[-1] == BYTE.eos_id for p in pieces)
    fim_count = sum(is_fim(p[1:-1], BYTE) for p in pieces)
    assert len(tokens) == sum(len(d.encode()) + 2 for d in DOCS) + 3 * fim_count
    assert 0.25 < fim_count / len(DOCS) < 0.75
    restored = [BYTE.decode(undo_fim(p[1:-1], BYTE).tolist()) for p in pieces]
    assert sorted(restored) == sorted(DOCS) and restored != DOCS  # all kept, in shuffled order
    # The last batch is completed with all-padding rows (fewer than a batch of them).
    n_real = sum(bool(r["segment_ids"].any()) for r in rows)
    assert all(r["segment_ids"].any() for r in rows[:n_real]) and len(rows) - n_real < 3
    _check_rows(rows[:n_real], pieces, 50, BYTE.pad_id)


def test_future_targets():
    batch = next(_iterator(seq_len=128))
    t0, m0 = future_targets(batch, 0)
    assert t0 is batch["targets"] and m0 is batch["loss_mask"]
    t2, m2 = future_targets(batch, 2)
    for b, i in itertools.product(range(4), range(128)):
        ok = (
            i + 2 < 128
            and batch["segment_ids"][b, i + 2] == batch["segment_ids"][b, i]
            and batch["loss_mask"][b, i + 2]
        )
        assert m2[b, i] == ok
        if ok:
            assert t2[b, i] == batch["targets"][b, i + 2]
    # The trainer calls it inside jit on device arrays: same result.
    import jax

    jt2, jm2 = jax.jit(lambda b: future_targets(b, 2))(jax.tree.map(jax.numpy.asarray, batch))
    np.testing.assert_array_equal(jt2, t2)
    np.testing.assert_array_equal(jm2, m2)


# --- iterator state and host sharding ----------------------------------------------------------------------


def test_iterator_resume_exact():
    """Take N batches, save the state, take M more; a fresh iterator restored from the state yields the same M."""
    it = _iterator(seq_len=96)  # 96 docs of ~430 bytes at 4 x 96 tokens: crosses epoch boundaries
    _take(it, 30)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 150)
    fresh = _iterator(seq_len=96)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 150), expected)
    # Same seed, same stream; another seed, another stream.
    _assert_batches_equal(_take(_iterator(seq_len=96), 5), _take(_iterator(seq_len=96), 5))
    assert not np.array_equal(next(_iterator(seed=1))["tokens"], next(_iterator())["tokens"])
    # Tokenizing ahead in threads changes nothing (FIM randomness is per element, not per thread).
    _assert_batches_equal(_take(_iterator(read_threads=3), 20), _take(_iterator(), 20))


def test_host_sharding_matches_single_process():
    single = _take(_iterator(batch_size=4), 6)
    shards = [_take(_iterator(batch_size=4, process_index=p, process_count=2), 6) for p in range(2)]
    joined = [{k: np.concatenate([s[k] for s in step]) for k in ROW_KEYS} for step in zip(*shards, strict=True)]
    _assert_batches_equal(joined, single)
    assert shards[0][0]["tokens"].shape == (2, 64)
    # A state saved with one process restores with two (the state is the global stream position).
    it = _iterator(batch_size=4)
    _take(it, 3)
    state, nxt = it.get_state(), next(it)
    half = _iterator(batch_size=4, process_index=1, process_count=2)
    half.set_state(state)
    np.testing.assert_array_equal(next(half)["tokens"], nxt["tokens"][2:])
    with pytest.raises(ValueError, match="divisible"):
        _iterator(batch_size=3, process_count=2, process_index=0)
