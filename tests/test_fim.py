"""Fill-in-the-middle in PSM and SPM form: layouts, exact inversion, rates and shares, HF sentinels, config."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tok_fixtures import write_tokenizer

from dsjax.config import ConfigError
from dsjax.data import ROW_KEYS, ByteTokenizer, HFTokenizer, default_corpus, make_pretrain_iterator
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.data.fim import apply_fim, document_tokens, fim_layout, fim_mode, fim_parts, is_fim, undo_fim
from dsjax.train.config import DataConfig, load_run_config

BYTE = ByteTokenizer()
BEGIN, HOLE, END = BYTE.fim_begin_id, BYTE.fim_hole_id, BYTE.fim_end_id
DOCS = default_corpus(48, seed=2)


def _fim(content, seed, **kw):
    return apply_fim(content, np.random.default_rng(seed), tokenizer=BYTE, **kw)


def test_psm_stream_is_unchanged():
    """PSM output at a given generator state is pinned: recorded before SPM existed, so runs and figures keep."""
    rng = np.random.default_rng(2)
    content = np.arange(10, 22, dtype=np.int32)
    outs = [apply_fim(content, rng, rate=0.5, tokenizer=BYTE).tolist() for _ in range(3)]
    assert outs == [
        [BEGIN, 10, HOLE, 13, 14, 15, 16, 17, 18, 19, 20, 21, END, 11, 12],
        list(range(10, 22)),
        [BEGIN, 10, 11, 12, 13, HOLE, 17, 18, 19, 20, 21, END, 14, 15, 16],
    ]


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60), st.integers(0, 2**32 - 1))
def test_spm_invariants_and_exact_inversion(text, seed):
    content = BYTE.encode_array(text)
    psm = _fim(content, seed, rate=1.0)
    spm = _fim(content, seed, rate=1.0, spm_rate=1.0)
    for out in (psm, spm):
        assert is_fim(out, BYTE) and len(out) == len(content) + 3
        assert Counter(out.tolist()) - Counter(content.tolist()) == Counter([BEGIN, HOLE, END])
        np.testing.assert_array_equal(undo_fim(out, BYTE), content)
    # The same cut points in both layouts; SPM is [begin, hole, *suffix, end, *prefix, *middle].
    prefix, middle, suffix = fim_parts(psm, BYTE)
    np.testing.assert_array_equal(np.concatenate([prefix, middle, suffix]), content)
    np.testing.assert_array_equal(spm, [BEGIN, HOLE, *suffix, END, *prefix, *middle])
    assert fim_mode(spm, BYTE) == "spm" and fim_mode(psm, BYTE) == ("spm" if len(prefix) == 0 else "psm")
    # spm_rate=0 consumes exactly the draws plain PSM does; rate 0 returns the input object in any layout share.
    rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
    plain = apply_fim(content, rng_b, rate=1.0, tokenizer=BYTE)
    np.testing.assert_array_equal(apply_fim(content, rng_a, rate=1.0, tokenizer=BYTE, spm_rate=0.0), plain)
    assert rng_a.random() == rng_b.random()
    assert _fim(content, seed, rate=0.0, spm_rate=1.0) is content
    doc = document_tokens(content, np.random.default_rng(seed), fim_rate=1.0, tokenizer=BYTE, fim_spm_rate=1.0)
    assert doc[0] == BYTE.bos_id and doc[-1] == BYTE.eos_id
    np.testing.assert_array_equal(doc[1:-1], spm)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 255), max_size=40), st.data())
def test_layouts_invert_at_every_cut(tokens, data):
    content = np.asarray(tokens, np.int32)
    lo = data.draw(st.integers(0, len(content)))
    hi = data.draw(st.integers(lo, len(content)))
    for mode in ("psm", "spm"):
        out = fim_layout(content[:lo], content[lo:hi], content[hi:], BYTE, mode=mode)
        assert out.dtype == np.int32
        np.testing.assert_array_equal(undo_fim(out, BYTE), content)
        assert fim_mode(out, BYTE) == ("spm" if mode == "spm" or lo == 0 else "psm")
    assert fim_mode(content, BYTE) is None and undo_fim(content, BYTE) is content


def test_rate_and_mode_share_statistics():
    """Fresh generator per document (as the pipeline does): the FIM share follows ``rate``, the SPM share among
    FIM documents follows ``spm_rate``, and the cut points do not depend on ``spm_rate``."""
    content = np.arange(20, dtype=np.int32)
    n = 4000
    runs = {s: [_fim(content, seed, rate=0.5, spm_rate=s) for seed in range(n)] for s in (0.0, 0.3, 0.6, 1.0)}
    fimmed = [is_fim(o, BYTE) for o in runs[0.0]]
    assert abs(np.mean(fimmed) - 0.5) < 4 * np.sqrt(0.25 / n)
    for outs in runs.values():
        assert [is_fim(o, BYTE) for o in outs] == fimmed  # the same documents are rearranged...
        for psm, out in zip(runs[0.0], outs):
            np.testing.assert_array_equal(undo_fim(out, BYTE), content)  # ...and every one inverts exactly
            if is_fim(out, BYTE) and fim_mode(out, BYTE) == "spm":
                np.testing.assert_array_equal(out, _to_spm(psm))  # with the PSM document's cut points
    # Only where the prefix is non-empty can the layouts be told apart.
    distinct = [i for i, o in enumerate(runs[0.0]) if fim_mode(o, BYTE) == "psm"]
    spm = {s: {i for i in distinct if fim_mode(runs[s][i], BYTE) == "spm"} for s in runs}
    assert not spm[0.0] and len(spm[1.0]) == len(distinct) > 1500
    for s in (0.3, 0.6):
        assert abs(len(spm[s]) / len(distinct) - s) < 4 * np.sqrt(s * (1 - s) / len(distinct))
    assert spm[0.3] <= spm[0.6]  # a larger share only adds SPM documents


def _to_spm(psm):
    prefix, middle, suffix = fim_parts(psm, BYTE)
    return fim_layout(prefix, middle, suffix, BYTE, mode="spm")


def test_bad_arguments():
    content = np.arange(5, dtype=np.int32)
    rng = np.random.default_rng(0)
    for kw in (dict(rate=-0.1), dict(rate=1.5), dict(rate=0.5, spm_rate=-0.01), dict(rate=0.5, spm_rate=1.01)):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
            apply_fim(content, rng, tokenizer=BYTE, **kw)
    with pytest.raises(ValueError, match="FIM mode must be one of"):
        fim_layout(content[:1], content[1:2], content[2:], BYTE, mode="msp")
    with pytest.raises(ValueError, match="no fim_hole"):
        undo_fim(np.array([BEGIN, 1, 2, END]), BYTE)
    with pytest.raises(ValueError, match="no fim_end"):
        undo_fim(np.array([BEGIN, HOLE, 1, 2]), BYTE)
    with pytest.raises(ValueError, match="does not start with fim_begin"):
        fim_parts(content, BYTE)
    with pytest.raises(ValueError, match=r"fim_spm_rate must be in \[0, 1\]"):
        make_pretrain_iterator(DOCS, BYTE, batch_size=2, seq_len=16, seed=0, process_count=1, fim_spm_rate=1.5)
    with pytest.raises(ConfigError, match=r"data\.fim_spm_rate: must lie in \[0, 1\]"):
        DataConfig(fim_spm_rate=-0.5)
    with pytest.raises(ConfigError, match=r"data\.fim_spm_rate"):
        load_run_config(None, ["data.fim_spm_rate=2"])
    assert load_run_config(None, ["data.fim_spm_rate=0.5", "data.fim_rate=0.5"]).data.fim_spm_rate == 0.5


def test_pipeline_spm_lossless_and_same_cuts():
    """One epoch with half of the FIM documents in SPM: every document comes back exactly, both layouts occur,
    and the stream holds the same documents, FIM decisions and length as the PSM-only stream."""
    streams = {}
    for s in (0.0, 0.5):
        batches = list(make_pretrain_iterator(DOCS, BYTE, batch_size=2, seq_len=64, seed=3, process_count=1,
                                              num_epochs=1, fim_rate=0.5, fim_spm_rate=s))  # fmt: skip
        rows = [{k: b[k][i] for k in ROW_KEYS} for b in batches for i in range(2)]
        tokens = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows])
        streams[s] = [p[1:-1] for p in np.split(tokens, np.flatnonzero(tokens == BYTE.bos_id)[1:])]
    psm, mixed = streams[0.0], streams[0.5]
    assert len(psm) == len(mixed) == len(DOCS)
    assert [len(p) for p in psm] == [len(p) for p in mixed]
    restore = lambda pieces: [BYTE.decode(undo_fim(p, BYTE).tolist()) for p in pieces]
    assert restore(mixed) == restore(psm) and sorted(restore(mixed)) == sorted(DOCS)
    modes = Counter(fim_mode(p, BYTE) for p in mixed)
    assert modes["spm"] >= 3 and modes["psm"] >= 3 and modes[None] >= 10


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    return HFTokenizer.from_file(write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", DOCS))


def test_hf_tokenizer_deepseek_sentinels(hf_tok):
    strings = (tokenizer_lib.DEEPSEEK_FIM_BEGIN, tokenizer_lib.DEEPSEEK_FIM_HOLE, tokenizer_lib.DEEPSEEK_FIM_END)
    assert [len(s) for s in strings] == [13, 12, 11]  # full-width bars and U+2581, as in the released tokenizer
    assert [hf_tok.token_id(s) for s in strings] == [hf_tok.fim_begin_id, hf_tok.fim_hole_id, hf_tok.fim_end_id]
    text = DOCS[0]
    content = hf_tok.encode_array(text)
    for seed in range(20):
        spm = apply_fim(content, np.random.default_rng(seed), rate=1.0, tokenizer=hf_tok, spm_rate=1.0)
        prefix, middle, suffix = fim_parts(apply_fim(content, np.random.default_rng(seed), rate=1.0, tokenizer=hf_tok),
                                           hf_tok)  # fmt: skip
        np.testing.assert_array_equal(undo_fim(spm, hf_tok), content)
        begin, hole, end = strings
        dec = hf_tok.decode
        assert dec(spm.tolist()) == begin + hole + dec(suffix.tolist()) + end + dec([*prefix, *middle])
    batch = next(make_pretrain_iterator(DOCS, hf_tok, batch_size=2, seq_len=64, seed=0, process_count=1,
                                        fim_rate=1.0, fim_spm_rate=1.0))  # fmt: skip
    assert batch["tokens"][0, :3].tolist() == [hf_tok.bos_id, hf_tok.fim_begin_id, hf_tok.fim_hole_id]
