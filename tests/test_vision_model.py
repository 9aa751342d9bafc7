"""DeepSeek-VL2's model level: image embeddings spliced over placeholder runs, causality, errors, processor token
counts, the VL2 checkpoint layout round trip and the text-only loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dsjax.checkpoint.safetensors_io import CheckpointError, CheckpointReader, write_safetensors
from dsjax.config import ConfigError
from dsjax.data.tokenizer import ByteTokenizer
from dsjax.vision.chat import VLProcessor, generate_greedy, pad_batch
from dsjax.vision.checkpoint import load_vl, save_vl, vl_config_from_json, vl_config_to_json
from dsjax.vision.model import VisionLanguageModel, VLConfig, batch_images, create_vl_model, text_loss, vl_loss_fn
from dsjax.vision.ops import gather_image_tokens
from dsjax.vision.processing import image_token_count, process_image

CFG = VLConfig.tiny()
IMAGE_ID = CFG.image_token_id
LENGTH = 48  # every forward below pads to this length: one compiled program serves them all


def random_image(seed: int, size=(20, 20)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    return create_vl_model(CFG, seed=1)


@pytest.fixture(scope="module")
def processor():
    return VLProcessor(ByteTokenizer(), image_token_id=IMAGE_ID, tiling=CFG.tiling)


def prompt(processor, image, text="ab<image>cd"):
    tokens, batch, _ = pad_batch([processor(text, [image])], ByteTokenizer.pad_id, LENGTH)
    return tokens, batch


def test_forward_equals_language_model_on_hand_spliced_embeddings(model, processor):
    tokens, batch = prompt(processor, random_image(0))
    logits = model(tokens, batch)
    # by hand: each image's tiles -> tower -> projector -> VL2 layout, written over the placeholder positions
    image = process_image(random_image(0), CFG.tiling)
    feats = jax.jit(lambda m, x: m.encode_tiles(x))(model, jnp.asarray(image.tiles))
    rows = gather_image_tokens(feats, model.image_newline[...], model.view_seperator[...], image.layout.source)
    emb = np.asarray(model.language.embed[...])[tokens]
    where = np.flatnonzero(tokens[0] == IMAGE_ID)
    assert len(where) == image.layout.num_tokens == 41  # 4 x 5 + 1 + 4 x 5 at 4 x 4 tokens per tile
    emb[0, where] = np.asarray(rows)
    ref = jax.jit(lambda m, t, e: m.forward(t, input_embeddings=e).logits)(model.language, tokens, emb)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)


def test_image_influences_later_logits_only(model, processor):
    """Two different images in the same prompt: positions before the run are identical (causal), after it not."""
    tokens, first = prompt(processor, random_image(1), "abc<image>de")
    _, second = prompt(processor, random_image(2), "abc<image>de")
    a, b = np.asarray(model(tokens, first)), np.asarray(model(tokens, second))
    start = int(np.flatnonzero(tokens[0] == IMAGE_ID)[0])
    assert start == 4  # bos + "abc"
    np.testing.assert_array_equal(a[:, :start], b[:, :start])
    end = start + first.num_tokens[0]
    assert np.max(np.abs(a[:, end:] - b[:, end:])) > 1e-4


def test_placeholder_and_image_errors(model, processor):
    tokens, batch = prompt(processor, random_image(0))
    with pytest.raises(ValueError, match=r"40 image placeholders \(id 262\) but the 1 image\(s\) need 41"):
        model(np.where(np.arange(LENGTH) == 3, ByteTokenizer.pad_id, tokens), batch)
    with pytest.raises(ValueError, match=r"41 image placeholders \(id 262\), no images"):
        model(tokens)
    with pytest.raises(TypeError, match="process it first"):
        model(tokens, [random_image(0)])
    with pytest.raises(TypeError, match="floating point"):
        model(tokens, batch._replace(pixels=batch.pixels.astype(np.uint8)))
    with pytest.raises(ValueError, match="1 channels, the tower expects 3"):
        model(tokens, batch._replace(pixels=batch.pixels[..., :1]))
    with pytest.raises(ValueError, match=r"tiles are \(24, 24\) pixels; this model's tiles are 28"):
        model(tokens, batch._replace(pixels=batch.pixels[:, :24, :24]))
    text_only = nnx.eval_shape(lambda: VisionLanguageModel(CFG.replace(vision=None, projector=None), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="text-only model"):
        text_only(tokens, batch)
    with pytest.raises(ValueError, match=r"2 '<image>' marker\(s\) but 1 image"):
        processor("<image><image>", [random_image(0)])
    with pytest.raises(ConfigError, match="projector.n_embed=32 does not match language.hidden_size=64"):
        VLConfig.tiny(projector=dataclasses.replace(CFG.projector, n_embed=32))


@pytest.mark.parametrize(
    ("sizes", "tiles"),
    [
        ([(20, 20)], [(1, 1)]),
        ([(70, 30)], [(3, 1)]),  # 84 x 28 keeps 65 x 28 of the 70 x 30 pixels, more than any other <= 4 tiles
        ([(30, 100), (100, 100)], [(1, 4), (2, 2)]),
        ([(70, 30), (30, 70), (100, 100)], [(1, 1)] * 3),  # more than two images: no local grid
    ],
)
def test_processor_token_counts(processor, sizes, tiles):
    images = [Image.fromarray(random_image(i, s)) for i, s in enumerate(sizes)]
    text = "x" + "".join(f"<image>{i}" for i in range(len(images)))
    out = processor(text, images)
    crop = len(images) <= 2
    counts = [image_token_count(w, h, CFG.tiling, cropping=crop) for w, h in sizes]
    assert [(i.layout.tiles_w, i.layout.tiles_h) for i in out.images] == tiles
    assert [i.layout.num_tokens for i in out.images] == counts == list(out.batch.num_tokens)
    assert len(out.tokens) == 1 + 1 + len(images) + sum(counts)  # bos, "x", one digit per image
    assert np.sum(out.tokens == IMAGE_ID) == len(out.batch.source) == sum(counts)
    assert out.tokens[0] == ByteTokenizer.bos_id
    assert len(out.batch.pixels) == sum(1 + w * h for w, h in tiles)


def test_batch_source_indexes_each_images_own_tiles():
    """Two images in one batch: the second image's source points past the first's tiles, and both images'
    newline / separator entries point at the shared table's last two rows."""
    a, b = (process_image(random_image(i, s), CFG.tiling) for i, s in enumerate([(20, 20), (70, 30)]))
    batch = batch_images([a, b])
    per_tile = 16
    total = (len(a.tiles) + len(b.tiles)) * per_tile
    tiles = np.random.default_rng(0).standard_normal((len(batch.pixels), per_tile, 3)).astype(np.float32)
    nl, sep = np.full(3, 7.0, np.float32), np.full(3, -7.0, np.float32)
    out = np.asarray(gather_image_tokens(tiles, nl, sep, batch.source))
    first = np.asarray(gather_image_tokens(tiles[: len(a.tiles)], nl, sep, a.layout.source))
    second = np.asarray(gather_image_tokens(tiles[len(a.tiles) :], nl, sep, b.layout.source))
    np.testing.assert_array_equal(out, np.concatenate([first, second]))
    assert batch.source.max() == total + 1


def test_checkpoint_round_trip(model, processor, tmp_path):
    files = save_vl(model, tmp_path, max_shard_bytes=200_000)
    assert len(files) > 1
    keys = CheckpointReader(tmp_path).keys()
    assert {"image_newline", "view_seperator", "projector.layers.2.weight", "vision.blocks.1.attn.qkv.weight",
            "vision.pos_embed", "language.model.embed_tokens.weight", "language.lm_head.weight"} <= keys  # fmt: skip
    loaded = load_vl(tmp_path)
    assert loaded.config == model.config
    ours = nnx.to_flat_state(nnx.state(model))
    theirs = dict(nnx.to_flat_state(nnx.state(loaded)))
    assert len(ours) == len(theirs)
    for path, var in ours:
        np.testing.assert_array_equal(var.get_value(), theirs[path].get_value(), err_msg=str(path))
    tokens, batch = prompt(processor, random_image(3))
    np.testing.assert_array_equal(model(tokens, batch), loaded(tokens, batch))


def test_checkpoint_bf16(model, tmp_path):
    save_vl(model, tmp_path, dtype=jnp.bfloat16)
    reader = CheckpointReader(tmp_path)
    assert reader.dtype("language.model.embed_tokens.weight") == jnp.bfloat16
    assert reader.dtype("vision.blocks.0.attn.qkv.weight") == jnp.bfloat16
    assert reader.dtype("language.model.layers.1.mlp.gate.weight") == np.float32  # the router stays fp32
    loaded = load_vl(tmp_path, dtype=jnp.bfloat16)
    assert loaded.vision.patch_w.get_value().dtype == jnp.bfloat16
    assert loaded.language.moe_layers.ffn.router.get_value().dtype == np.float32
    np.testing.assert_array_equal(
        loaded.image_newline.get_value(), model.image_newline.get_value().astype(jnp.bfloat16)
    )


def test_checkpoint_errors(model, tmp_path):
    save_vl(model, tmp_path)
    reader = CheckpointReader(tmp_path)
    tensors = {k: np.array(reader.get(k)) for k in reader.keys()}
    del reader
    write_safetensors(tmp_path / "model.safetensors", {**tensors, "stray.weight": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected tensors stray.weight"):
        load_vl(tmp_path)
    write_safetensors(tmp_path / "model.safetensors", {k: v for k, v in tensors.items() if k != "view_seperator"})
    with pytest.raises(CheckpointError, match="missing tensors: view_seperator"):
        load_vl(tmp_path)
    d = vl_config_to_json(CFG)
    assert vl_config_from_json(d) == CFG
    with pytest.raises(ConfigError, match="use_mla=false"):
        vl_config_from_json({**d, "language_config": {**d["language_config"], "use_mla": False}})
    with pytest.raises(ConfigError, match="candidate_resolutions"):
        vl_config_from_json({**d, "candidate_resolutions": [[28, 28], [56, 56]]})


def test_text_loss_masks_image_targets():
    rng = np.random.default_rng(0)
    tokens = np.array([[1, 2, IMAGE_ID, IMAGE_ID, 3, 4]], np.int32)
    logits = rng.standard_normal((1, 6, CFG.language.vocab_size)).astype(np.float32)
    total, count = text_loss(jnp.asarray(logits), jnp.asarray(tokens), IMAGE_ID)
    logp = jax.nn.log_softmax(logits[0], axis=-1)
    # targets 2, 3, 4 (at positions 1, 4, 5) count; the two placeholders do not
    expected = -(logp[0, 2] + logp[3, 3] + logp[4, 4])
    assert int(count) == 3
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    prompt_mask = np.array([[0, 0, 0, 0, 0, 1]], bool)  # only the last target
    total, count = text_loss(jnp.asarray(logits), jnp.asarray(tokens), IMAGE_ID, prompt_mask)
    assert int(count) == 1
    np.testing.assert_allclose(total, -logp[4, 4], rtol=1e-6)


def test_greedy_generation_with_image_matches_uncached_forward(model, processor):
    """Cached prefill (image spliced) + cached decode == argmax of the full forward recomputed per token (the
    padded tail of the fixed-length forward cannot reach earlier positions)."""
    inputs = processor("ab<image>cd", [random_image(4)])
    new = generate_greedy(model, inputs.tokens, inputs.images, max_new_tokens=2, stop_tokens=())
    t = len(inputs.tokens)
    tokens = np.full((1, LENGTH), ByteTokenizer.pad_id, np.int32)
    tokens[0, :t] = inputs.tokens
    expected = []
    for k in range(2):
        expected.append(int(np.argmax(np.asarray(model(tokens, inputs.batch))[0, t + k - 1])))
        tokens[0, t + k] = expected[-1]
    assert new == expected


@pytest.mark.slow  # one backward compile: about 20 s alone, more on a loaded machine
def test_loss_fn_trains_every_part(model, processor):
    """``vl_loss_fn`` under ``value_and_grad``: the text loss reaches the tower, projector, both special
    embeddings and the language model."""
    tokens, batch = prompt(processor, random_image(5))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    data = dict(tokens=jnp.asarray(tokens), pixels=jnp.asarray(batch.pixels), source=jnp.asarray(batch.source))
    (loss, aux), grads = jax.jit(jax.value_and_grad(vl_loss_fn(graphdef), has_aux=True))(params, rest, data)
    assert np.isfinite(loss) and int(aux["tokens"]) == LENGTH - 1 - 41
    for part in ("vision", "projector", "image_newline", "view_seperator", "language"):
        norm = sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads[part]))
        assert norm > 0, part
