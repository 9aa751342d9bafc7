"""Training and generation with images: the VL train step (text-only loss, freezing, bias balancing), the
generation engine's image prefill against the uncached forward, VL2's chat format, ``scripts/generate.py
--image`` and clear errors for mismatched image inputs."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dsjax.config import ModelConfig
from dsjax.data.tokenizer import ByteTokenizer
from dsjax.infer import generate
from dsjax.model import create_model
from dsjax.train.config import TrainConfig
from dsjax.train.step import jit_train_step
from dsjax.vision.chat import VLProcessor, encode_vl_chat, render_vl_chat
from dsjax.vision.checkpoint import save_vl
from dsjax.vision.config import VisionConfig
from dsjax.vision.job import KINDS, draw_scene, make_examples
from dsjax.vision.model import ImageBatch, VLConfig, create_vl_model
from dsjax.vision.train import ADAPTER, chat_example, init_vl_train_state, make_vl_batch, make_vl_train_step

# one MoE layer with sigmoid routing and a routing bias (V3), no MTP, a one-layer tower: small compiles
CFG = VLConfig.tiny(
    language=ModelConfig.tiny(vocab_size=264, num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0),
    vision=VisionConfig.tiny(num_hidden_layers=1),
)
IMAGE_ID = CFG.image_token_id
TOK = ByteTokenizer()
LENGTH = 112  # every uncached forward below pads to this length: one compiled program


def image(seed: int, size=(20, 20)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    return create_vl_model(CFG, seed=3)


@pytest.fixture(scope="module")
def processor():
    return VLProcessor(TOK, image_token_id=IMAGE_ID, tiling=CFG.tiling)


@pytest.fixture(scope="module")
def examples(processor):
    """Two chat examples ``(VLInputs, prompt length)``; the second has its marker inside the text."""
    return [
        chat_example(processor, [{"role": "user", "content": "color?", "images": [image(0)]}], "red"),
        chat_example(processor, [{"role": "user", "content": "where<image>?", "images": [image(1)]}], "top left"),
    ]


@pytest.fixture(scope="module")
def batch(examples):
    return make_vl_batch([e[0] for e in examples], [e[1] for e in examples], pad_id=TOK.pad_id, image_token_id=IMAGE_ID)


def flat_params(tree) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(tree)}


def bias(rest) -> np.ndarray:
    return np.asarray(rest["language"]["moe_layers"]["ffn"]["routing_bias"].get_value())


def test_batch_masks_prompt_and_image_tokens(batch):
    mask, targets = batch["loss_mask"], batch["targets"]
    assert mask.sum(1).tolist() == [len(" red") + 1, len(" top left") + 1]  # answer + EOS only
    assert not (mask & (targets == IMAGE_ID)).any()
    for row in range(2):
        answer = targets[row][mask[row]]
        assert TOK.decode(answer[:-1].tolist()) in (" red", " top left") and answer[-1] == TOK.eos_id


def test_adapter_step_text_loss_freezing_and_bias_update(model, examples, batch):
    """Adapter-only training (tower and language model frozen) with the bias update forced on: the step's
    cross-entropy equals a hand-rolled loss on the answer tokens of the uncached VL forward and falls; frozen
    weights stay bit-identical while the routing bias moves (balancing through ``language``)."""
    images = ImageBatch(batch["pixels"], batch["source"], (41, 41))
    logp = np.asarray(jax.nn.log_softmax(model(_pad(batch["tokens"]), images), axis=-1), np.float64)
    total, count = 0.0, 0
    for row, (inputs, prompt_len) in enumerate(examples):
        for i in range(prompt_len, len(inputs.tokens)):  # answer token i, predicted at position i - 1
            total -= logp[row, i - 1, inputs.tokens[i]]
            count += 1
    tc = TrainConfig(steps=8, lr=3e-2, warmup_steps=1, balance_alpha=0.0, bias_gamma=1e-2)
    graphdef, state, tx = init_vl_train_state(create_vl_model(CFG, seed=3), tc, trainable=ADAPTER)
    assert set(state.params.keys()) == set(ADAPTER)
    frozen = {k: flat_params(state.rest[k]) for k in ("vision", "language")}
    adapter = flat_params(state.params)
    step = jit_train_step(make_vl_train_step(graphdef, CFG, tc, tx, trainable=ADAPTER, update_bias=True))
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["ce"]))
    np.testing.assert_allclose(losses[0], total / count, rtol=1e-4)
    assert int(metrics["tokens"]) == count == 4 + 9 + 2  # " red" + EOS, " top left" + EOS
    assert losses[-1] < losses[0] - 0.05, losses
    for part, before in frozen.items():
        for path, value in flat_params(state.rest[part]).items():
            if path[-1] == "routing_bias":
                assert np.abs(value).max() > 0  # starts at zero
            else:
                np.testing.assert_array_equal(value, before[path], err_msg=f"{part} {path}")
    moved = [path for path, value in flat_params(state.params).items() if not np.array_equal(value, adapter[path])]
    assert len(moved) == len(adapter)
    with pytest.raises(ValueError, match="trainable parts"):
        init_vl_train_state(model, tc, trainable=("tower",))


@pytest.mark.slow  # a second train-step compile (every part's gradient)
def test_full_step_trains_every_part(batch):
    tc = TrainConfig(steps=3, lr=1e-2, warmup_steps=1, balance_alpha=0.0, bias_gamma=1e-2)
    graphdef, state, tx = init_vl_train_state(create_vl_model(CFG, seed=3), tc)
    before = flat_params(state.params)
    step = jit_train_step(make_vl_train_step(graphdef, CFG, tc, tx))
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["ce"]))
    assert losses[-1] < losses[0], losses
    after = flat_params(state.params)
    for part in ("vision", "projector", "image_newline", "view_seperator", "language"):
        assert any(not np.array_equal(v, before[p]) for p, v in after.items() if p[0] == part), part
    assert np.abs(bias(state.rest)).max() > 0  # on by default when the language model trains


def uncached_greedy(model, tokens, images, steps: int) -> list[int]:
    padded = _pad(tokens)
    out = []
    for k in range(steps):
        out.append(int(np.argmax(np.asarray(model(padded, images))[0, len(tokens) + k - 1])))
        padded[0, len(tokens) + k] = out[-1]
    return out


def test_engine_generation_with_images(model, processor):
    """A batch of two prompts (one and two images, different lengths) through ``dsjax.infer.generate``: the same
    ids twice at temperature 0, and token by token the argmax of the uncached forward on the growing sequence."""
    inputs = [
        encode_vl_chat(processor, [{"role": "user", "content": "hi", "images": [image(5)]}]),
        processor("a<image>b<image>c", [image(6), image(7, (40, 20))]),
    ]
    kw = dict(images=[x.images for x in inputs], max_new_tokens=3, temperature=0.0, stop_tokens=())
    first = generate(model, [x.tokens for x in inputs], **kw)
    assert first == generate(model, [x.tokens for x in inputs], **kw)
    for x, got in zip(inputs, first):
        assert got == uncached_greedy(model, x.tokens, x.batch, 3)
    # the images matter: another image changes the logits the greedy choice reads
    other = encode_vl_chat(processor, [{"role": "user", "content": "hi", "images": [image(8)]}])
    a = np.asarray(model(_pad(inputs[0].tokens), inputs[0].batch))[0, len(inputs[0].tokens) - 1]
    b = np.asarray(model(_pad(other.tokens), other.batch))[0, len(other.tokens) - 1]
    assert np.abs(a - b).max() > 1e-4


def _pad(tokens):
    tokens = np.atleast_2d(tokens)
    padded = np.full((len(tokens), LENGTH), TOK.pad_id, np.int32)
    padded[:, : tokens.shape[1]] = tokens
    return padded


def test_image_input_errors(model, processor):
    one = processor("x<image>", [image(0)])
    two = processor("<image>y<image>", [image(1), image(2)])
    with pytest.raises(ValueError, match=r"prompt 1: tokens hold 82 image placeholders .* 1 image\(s\) need 41"):
        generate(model, [one.tokens, two.tokens], images=[one.images, two.images[:1]], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"prompt 0: tokens hold 41 image placeholders \(id 262\), no images"):
        generate(model, [one.tokens], max_new_tokens=1)
    with pytest.raises(ValueError, match="1 image lists for 2 prompts"):
        generate(model, [one.tokens, two.tokens], images=[one.images], max_new_tokens=1)
    with pytest.raises(TypeError, match="prompt 0: .*process it first"):
        generate(model, [one.tokens], images=[[image(0)]], max_new_tokens=1)
    with pytest.raises(ValueError, match="need a vision-language model"):
        generate(create_model(CFG.language, seed=0), [[1, 2]], images=[[]], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"2 '<image>' marker\(s\) but 1 image"):
        processor("<image><image>", [image(0)])
    with pytest.raises(ValueError, match=r"message 0 has 2 '<image>' marker\(s\) but 1 image"):
        render_vl_chat([{"role": "user", "content": "<image><image>", "images": [image(0)]}])


def test_vl2_chat_format():
    text, images = render_vl_chat(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is it?", "images": ["A"]},
            {"role": "assistant", "content": "a cat"},
            {"role": "user", "content": "<image> vs <image>", "images": ["B", "C"]},
        ],
        eos="</s>",
    )
    assert text == (
        "Be brief.\n\n<|User|>: <image>\nWhat is it?\n\n<|Assistant|>: a cat</s>"
        "<|User|>: <image> vs <image>\n\n<|Assistant|>:"
    )
    assert images == ["A", "B", "C"]


def test_generate_script_with_image(model, tmp_path, capsys):
    save_vl(model, tmp_path / "vl")
    picture = tmp_path / "pic.png"
    Image.fromarray(image(9, (30, 20))).save(picture)
    spec = importlib.util.spec_from_file_location("generate_script", pathlib.Path("scripts/generate.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--checkpoint", str(tmp_path / "vl"), "--prompt", "hi", "--image", str(picture), "--max-new-tokens", "3"]
    assert script.main([*argv, "--tokenizer", "byte"]) == 0
    printed = capsys.readouterr().out
    # the engine on the same processed prompt gives the same text
    proc = VLProcessor(TOK, image_token_id=IMAGE_ID, tiling=CFG.tiling)
    inputs = proc("<image>\nhi", [Image.open(picture).convert("RGB")])
    ids = generate(model, [inputs.tokens], images=[inputs.images], max_new_tokens=3, stop_tokens=[TOK.eos_id])[0]
    assert printed.strip() == TOK.decode([t for t in ids if t != TOK.eos_id]).strip()
    with pytest.raises(SystemExit, match="cannot read image"):
        script.main([*argv[:-4], "--image", str(tmp_path / "missing.png")])
    with pytest.raises(SystemExit, match=r"1 '<image>' marker\(s\) but 2 image"):
        script.main(["--checkpoint", str(tmp_path / "vl"), "--prompt", "<image>", "--image", str(picture),
                     "--image", str(picture)])  # fmt: skip


def test_job_scenes_are_seeded_and_answers_consistent():
    a = make_examples(np.random.default_rng(0), 12)
    b = make_examples(np.random.default_rng(0), 12)
    assert a == b and [e.kind for e in a] == list(KINDS) * 4
    for ex in a:
        if ex.kind == "count":
            assert ex.answer == ("one", "two", "three")[len(ex.scene.shapes) - 1]
    held = frozenset(e.scene for e in a)
    assert not held & {e.scene for e in make_examples(np.random.default_rng(0), 12, exclude=held)}
    pixels = np.asarray(draw_scene(a[0].scene))
    assert pixels.shape == (32, 32, 3) and (pixels < 250).any()
