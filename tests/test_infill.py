"""dsjax.infill: prompt layouts (byte and HF tokenizers), greedy decoding over the prompt, stops, bad arguments."""

import numpy as np
import pytest
from tok_fixtures import write_tokenizer

import dsjax
from dsjax.coder.infill import infill, infill_prompt
from dsjax.data import ByteTokenizer, HFTokenizer, default_corpus
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.data.fim import fim_layout
from dsjax.infer import engine

BYTE = ByteTokenizer()
BOS, BEGIN, HOLE, END = BYTE.bos_id, BYTE.fim_begin_id, BYTE.fim_hole_id, BYTE.fim_end_id
# Equal total lengths: the prompts, and prompt + middle, batch into one forward pass (one compile).
PAIRS = [
    ("def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"),
    ("total = sum([", "])\nprint(total)  # the total is\n"),
]


@pytest.fixture(scope="module")
def model():
    return dsjax.create_model(dsjax.ModelConfig.tiny(vocab_size=BYTE.vocab_size, initializer_range=0.1), seed=2)


@pytest.fixture
def calls(monkeypatch):
    """Records what infill passes to the engine (and what the real engine returns)."""
    log = []
    real = engine.generate

    def recording(model, prompts, **kwargs):
        out = real(model, prompts, **kwargs)
        log.append((prompts, kwargs, out))
        return out

    monkeypatch.setattr(engine, "generate", recording)
    return log


def test_prompt_layouts():
    assert infill_prompt(BYTE, "ab", "cd") == [BOS, BEGIN, 97, 98, HOLE, 99, 100, END]
    assert infill_prompt(BYTE, "ab", "cd", mode="spm") == [BOS, BEGIN, HOLE, 99, 100, END, 97, 98]
    assert infill_prompt(BYTE, "", "") == [BOS, BEGIN, HOLE, END]
    # The prompt is a training document (BOS + FIM layout) cut where the middle starts, in both modes.
    pre, mid, suf = (BYTE.encode_array(t) for t in ("pré", "mid", "suf"))
    for mode in ("psm", "spm"):
        doc = [BOS, *fim_layout(pre, mid, suf, BYTE, mode=mode).tolist(), BYTE.eos_id]
        prompt = infill_prompt(BYTE, "pré", "suf", mode=mode)
        assert doc[: len(prompt)] == prompt and doc[len(prompt) : -1] == mid.tolist()
    with pytest.raises(ValueError, match="FIM mode must be one of"):
        infill_prompt(BYTE, "a", "b", mode="psm ")


def test_hf_prompt_matches_deepseek_string_prompt(tmp_path):
    tok = HFTokenizer.from_file(write_tokenizer(tmp_path / "tokenizer.json", default_corpus(48, seed=2)))
    s = tokenizer_lib
    for prefix, suffix in [*PAIRS, ("", "tail"), ("héad ", "")]:
        text = f"{s.DEEPSEEK_BOS}{s.DEEPSEEK_FIM_BEGIN}{prefix}{s.DEEPSEEK_FIM_HOLE}{suffix}{s.DEEPSEEK_FIM_END}"
        assert infill_prompt(tok, prefix, suffix) == tok.encode(text)


def test_greedy_infill_is_argmax_of_full_forward(model, calls):
    middles = infill(model, BYTE, PAIRS, max_new_tokens=6, stop_tokens=())
    (prompts, kwargs, outs), = calls  # fmt: skip
    assert prompts == [infill_prompt(BYTE, p, s) for p, s in PAIRS]
    assert kwargs["temperature"] == 0.0 and kwargs["stop_tokens"] == [] and kwargs["max_new_tokens"] == 6
    assert middles == [BYTE.decode(o) for o in outs]
    assert [len(o) for o in outs] == [6, 6] and len({len(p) for p in prompts}) == 1
    # One causal forward over prompt + middle gives every decoding step's logits.
    logits = np.asarray(model(np.asarray([p + o for p, o in zip(prompts, outs)], np.int32)))
    n = len(prompts[0])
    np.testing.assert_array_equal(np.asarray(outs), logits[:, n - 1 : -1].argmax(-1))


def test_spm_and_stops(model, calls):
    # Same batch and prompt length as the PSM test: the engine reuses its compiled functions.
    full = infill(model, BYTE, PAIRS, mode="spm", max_new_tokens=6, stop_tokens=())
    (prompts, _, outs), = calls  # fmt: skip
    assert prompts == [infill_prompt(BYTE, p, s, mode="spm") for p, s in PAIRS] and full == [
        BYTE.decode(o) for o in outs
    ]
    # A stop token ends the middle and is not part of the text.
    stop = outs[0][2]
    cut = infill(model, BYTE, PAIRS, mode="spm", max_new_tokens=6, stop_tokens=[stop])
    assert cut == [BYTE.decode(o[: o.index(stop)] if stop in o else o) for o in outs]


def test_single_pair_and_default_eos_stop(monkeypatch):
    """The single-pair form and the default stop (the tokenizer's EOS, removed from the text), on a stub engine."""
    seen = []

    def stub(model, prompts, **kwargs):
        seen.append((prompts, kwargs))
        return [[*b"42", BYTE.eos_id]]

    monkeypatch.setattr(engine, "generate", stub)
    assert infill("model", BYTE, "x = ", "\n", temperature=0.7, seed=5, top_k=3) == "42"
    assert seen == [([infill_prompt(BYTE, "x = ", "\n")], dict(max_new_tokens=64, temperature=0.7, seed=5,
                                                              stop_tokens=[BYTE.eos_id], top_k=3))]  # fmt: skip


def test_bad_arguments(model, calls):
    with pytest.raises(TypeError, match="suffix must be a string"):
        infill(model, BYTE, "a")
    with pytest.raises(TypeError, match="list of \\(prefix, suffix\\) pairs and no suffix"):
        infill(model, BYTE, PAIRS, "b")
    with pytest.raises(TypeError, match="batch item 1 must be a \\(prefix, suffix\\) pair"):
        infill(model, BYTE, [("a", "b"), "ab"])
    with pytest.raises(TypeError, match="batch item 0"):
        infill(model, BYTE, [("a", 3)])
    with pytest.raises(ValueError, match="empty"):
        infill(model, BYTE, [])
    with pytest.raises(ValueError, match="mode must be one of"):
        infill(model, BYTE, "a", "b", mode="msp")
    with pytest.raises(ValueError, match="returns text"):
        infill(model, BYTE, "a", "b", return_result=True)
    assert not calls  # all rejected before generation
    assert dsjax.infill is infill
