"""DeepSeek chat templates, tokenizer.json loading and text-level generation."""

import numpy as np
import pytest
from tok_fixtures import CHAT_SPECIALS, write_tokenizer

import dsjax
from dsjax.data import ByteTokenizer, HFTokenizer, default_corpus
from dsjax.infer import generate
from dsjax.infer.chat import DEEPSEEK_ASSISTANT, DEEPSEEK_USER, encode_prompts, generate_text, render_chat

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nadd\n</think>\n4"},
    {"role": "user", "content": "and 3+3?"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", default_corpus(64), CHAT_SPECIALS)
    return HFTokenizer.from_file(path)


def test_v3_template():
    assert render_chat(CONVERSATION) == (
        f"{BOS}Be brief.<｜User｜>2+2?<｜Assistant｜><think>\nadd\n</think>\n4{EOS}<｜User｜>and 3+3?<｜Assistant｜>"
    )
    # R1 style: past reasoning dropped, the answer opens a thought.
    assert render_chat(CONVERSATION, think=True) == (
        f"{BOS}Be brief.<｜User｜>2+2?<｜Assistant｜>4{EOS}<｜User｜>and 3+3?<｜Assistant｜><think>\n"
    )
    assert render_chat(CONVERSATION[1:2], add_generation_prompt=False) == f"{BOS}<｜User｜>2+2?"


def test_v2_template():
    assert render_chat(CONVERSATION[:3], style="v2") == (
        f"{BOS}Be brief.\n\nUser: 2+2?\n\nAssistant: <think>\nadd\n</think>\n4{EOS}Assistant:"
    )


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "robot", "content": "x"}], "role"),
        ([{"role": "user", "content": None}], "content"),
        ([{"role": "system", "content": "only a system prompt"}], "at least one"),
        (["hello"], "mapping"),
    ],
)
def test_bad_conversations(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(messages)


def test_chat_tokens_are_single_ids(tokenizer):
    ids = encode_prompts(tokenizer, [CONVERSATION])[0]
    user, assistant = tokenizer.token_id(DEEPSEEK_USER), tokenizer.token_id(DEEPSEEK_ASSISTANT)
    assert ids[0] == tokenizer.bos_id
    assert ids.count(user) == 2 and ids[-1] == assistant and ids.count(tokenizer.eos_id) == 1
    assert tokenizer.decode(ids) == render_chat(CONVERSATION)  # byte-level BPE round-trips the whole prompt


def test_chat_needs_chat_tokens(tmp_path):
    plain = HFTokenizer.from_file(write_tokenizer(tmp_path / "t.json", default_corpus(16)))
    with pytest.raises(ValueError, match="lacks the chat tokens"):
        encode_prompts(plain, [CONVERSATION])
    with pytest.raises(ValueError, match="no DeepSeek chat tokens"):
        encode_prompts(ByteTokenizer(), [CONVERSATION])


def test_generate_text_decodes_what_generate_returns(tokenizer):
    cfg = dsjax.ModelConfig.tiny(vocab_size=tokenizer.vocab_size, initializer_range=0.1)
    model = dsjax.create_model(cfg, seed=0)
    prompts = ["count up: 1 2 3", CONVERSATION]
    texts = generate_text(model, tokenizer, prompts, max_new_tokens=6)
    ids = generate(model, encode_prompts(tokenizer, prompts), max_new_tokens=6, stop_tokens=[tokenizer.eos_id])
    for text, row in zip(texts, ids):
        assert text == tokenizer.decode([t for t in row if t != tokenizer.eos_id])
    assert np.all([isinstance(t, str) for t in texts])


def _load_script(name):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_script_streams_text(tmp_path, capsys):
    script = _load_script("generate")
    cfg = dsjax.ModelConfig.tiny(vocab_size=ByteTokenizer.vocab_size, initializer_range=0.1)
    model = dsjax.create_model(cfg, seed=0)
    dsjax.save_pretrained(model, tmp_path / "hf")  # a training run directory holds its export under hf/
    args = ["--checkpoint", str(tmp_path), "--prompt", "count up: 1", "--max-new-tokens", "7"]
    assert script.main(args) == 0
    out, err = capsys.readouterr()
    ids = [ByteTokenizer.bos_id, *ByteTokenizer().encode("count up: 1")]
    expected = generate(model, [ids], max_new_tokens=7, stop_tokens=[ByteTokenizer.eos_id])[0]
    assert out == ByteTokenizer().decode([t for t in expected if t != ByteTokenizer.eos_id]) + "\n"
    assert "tokens in" in err
    with pytest.raises(SystemExit, match="temperature"):
        script.main([*args, "--temperature", "-1"])
    with pytest.raises(SystemExit, match="no config.json"):
        script.main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"])
