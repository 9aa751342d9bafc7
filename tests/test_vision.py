"""DeepSeek-VL2's vision side: SigLIP tower and projector parity with transformers / VL2's code, tiling, layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image, ImageOps
from transformers import DeepseekVLConfig, DeepseekVLModel, SiglipVisionConfig, SiglipVisionModel

from dsjax.checkpoint.safetensors_io import CheckpointError
from dsjax.config import ConfigError
from dsjax.sharding import FSDP_RULES, logical_to_spec, make_mesh
from dsjax.vision import ops
from dsjax.vision.config import ProjectorConfig, TilingConfig, VisionConfig
from dsjax.vision.hf_map import load_projector, load_tower
from dsjax.vision.processing import (
    as_pil_rgb,
    image_layout,
    image_token_count,
    process_image,
    select_best_resolution,
    tile_grid,
)
from dsjax.vision.tower import Projector, SiglipVisionTower

TOL = 1e-5  # float32 parity: max |error| / max |reference|
# the rules proposed for dsjax/sharding.py's FSDP table (the tower's other axes stay replicated)
VISION_FSDP_RULES = (*FSDP_RULES, ("vit_embed", "data"), ("proj_in", "data"))


def rel_err(out, ref) -> float:
    ref = np.asarray(ref)
    return float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))


def hf_siglip_config(cfg: VisionConfig) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        layer_norm_eps=cfg.layer_norm_eps,
        attn_implementation="eager",
    )


def perturb(module: torch.nn.Module, seed: int) -> None:
    """HF's init zeroes biases and sets LayerNorms to 1/0: add noise so every weight matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def siglip():
    cfg = VisionConfig.tiny()
    torch.manual_seed(0)
    hf = SiglipVisionModel(hf_siglip_config(cfg)).eval()
    perturb(hf, 0)
    tower = SiglipVisionTower(cfg, rngs=nnx.Rngs(0))
    load_tower(tower, hf.state_dict())
    return cfg, hf, tower


def run_hf(hf, pixels_byxc, **kw):
    with torch.no_grad():
        return hf(torch.from_numpy(pixels_byxc).permute(0, 3, 1, 2), output_hidden_states=True, **kw)


# ---- tower parity ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(28, 28), (36, 20), (31, 30)], ids=["native", "interpolated", "cropped"])
def test_tower_matches_hf_siglip(siglip, size):
    """Last hidden state (post-norm) at the native 7x7 grid, with bicubic position resizing to 9x5, and with
    pixels past the last whole patch (as 384 px at patch 14); and the pre-norm penultimate hidden state
    (LLaVA-style ``select_layer=-2``) and the embeddings."""
    _, hf, tower = siglip
    x = np.random.default_rng(1).standard_normal((2, *size, 3)).astype(np.float32)
    ref = run_hf(hf, x, interpolate_pos_encoding=size != (28, 28))
    assert rel_err(tower(jnp.asarray(x)), ref.last_hidden_state) < TOL
    assert rel_err(tower(jnp.asarray(x), select_layer=-2, post_norm=False), ref.hidden_states[-2]) < TOL
    assert rel_err(tower.embed(jnp.asarray(x)), ref.hidden_states[0]) < TOL


def test_tower_jit_scan_sharded(siglip):
    """Jitted, layers under ``lax.scan``, on a 4 x 2 mesh (2 images: the batch does not divide the devices)
    == eager, unrolled, one device."""
    _, _, tower = siglip
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 28, 28, 3)), jnp.float32)
    graphdef, state = nnx.split(tower)
    with jax.set_mesh(make_mesh(data=4, expert=2)):
        scanned = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, layers="scan"))(state, x)
    assert rel_err(scanned, tower(x, layers="unroll")) < TOL


@pytest.mark.parametrize(("n_in", "n_out"), [(7, 9), (7, 5), (27, 32), (4, 4)])
def test_bicubic_matrix_matches_torch(n_in, n_out):
    x = torch.randn(1, 1, n_in, n_in, generator=torch.Generator().manual_seed(n_out))
    ref = torch.nn.functional.interpolate(x, size=(n_out, n_in), mode="bicubic", align_corners=False)[0, 0]
    ours = ops.bicubic_matrix(n_in, n_out) @ x[0, 0].numpy()
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-6)


def to_vl2_layout(hf_state: dict) -> dict:
    """HF SigLIP names -> DeepSeek-VL2's timm names (fused qkv, pos_embed [1, n, d]), written independently."""
    out = {
        "vision.patch_embed.proj.weight": hf_state["embeddings.patch_embedding.weight"],
        "vision.patch_embed.proj.bias": hf_state["embeddings.patch_embedding.bias"],
        "vision.pos_embed": hf_state["embeddings.position_embedding.weight"][None],
        "vision.norm.weight": hf_state["post_layernorm.weight"],
        "vision.norm.bias": hf_state["post_layernorm.bias"],
        "vision.attn_pool.latent": torch.zeros(1, 1, 4),  # VL2 keeps the unused pooling head
    }
    i = 0
    while f"encoder.layers.{i}.layer_norm1.weight" in hf_state:
        src, dst = f"encoder.layers.{i}.", f"vision.blocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.qkv.{kind}"] = torch.cat([hf_state[src + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
            out[dst + f"attn.proj.{kind}"] = hf_state[src + f"self_attn.out_proj.{kind}"]
            for a, b in (
                ("norm1", "layer_norm1"),
                ("norm2", "layer_norm2"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                out[dst + f"{a}.{kind}"] = hf_state[src + f"{b}.{kind}"]
        i += 1
    return out


def test_vl2_checkpoint_layout_loads_the_same_tower(siglip):
    cfg, hf, tower = siglip
    other = SiglipVisionTower(cfg, rngs=nnx.Rngs(5))
    load_tower(other, {"language.x": 0, **to_vl2_layout(hf.state_dict())}, layout="vl2")
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(tower)), nnx.to_flat_state(nnx.state(other))):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))


def test_load_errors(siglip):
    cfg, hf, _ = siglip
    tower = SiglipVisionTower(cfg, rngs=nnx.Rngs(0))
    state = dict(hf.state_dict())
    with pytest.raises(CheckpointError, match=r"missing tensors: .*q_proj\.weight"):
        load_tower(tower, {k: v for k, v in state.items() if "layers.1.self_attn.q_proj.weight" not in k})
    with pytest.raises(CheckpointError, match="unexpected tensors: encoder.layers.2.mlp.fc1.weight"):
        load_tower(tower, {**state, "encoder.layers.2.mlp.fc1.weight": state["encoder.layers.1.mlp.fc1.weight"]})
    with pytest.raises(CheckpointError, match=r"post_layernorm\.weight has \(16,\)"):
        load_tower(tower, {**state, "post_layernorm.weight": torch.zeros(16)})
    with pytest.raises(ValueError, match="layout"):
        load_tower(tower, state, layout="timm")


# ---- projector ------------------------------------------------------------------------------------------------


def unfold_reference(x_bgwd: np.ndarray, r: int) -> np.ndarray:
    """DeepSeek-VL2's ``F.pad`` + ``F.unfold(kernel=stride=r)`` written out with loops: output channel
    ``c * r * r + i * r + j`` of block (I, J) is channel c of token (r I + i, r J + j), zeros past the edge."""
    b, g, w, d = x_bgwd.shape
    g2, w2 = -(-g // r), -(-w // r)
    out = np.zeros((b, g2 * w2, d * r * r), x_bgwd.dtype)
    for bi in range(b):
        for bg in range(g2):
            for bw in range(w2):
                for c in range(d):
                    for i in range(r):
                        for j in range(r):
                            y, x = r * bg + i, r * bw + j
                            if y < g and x < w:
                                out[bi, bg * w2 + bw, c * r * r + i * r + j] = x_bgwd[bi, y, x, c]
    return out


@pytest.mark.parametrize(("grid", "r"), [(7, 2), (4, 2), (6, 3)])
def test_pixel_shuffle_matches_vl2_unfold(grid, r):
    x = np.random.default_rng(grid).standard_normal((2, grid, grid, 3)).astype(np.float32)
    ours = np.asarray(ops.pixel_shuffle(jnp.asarray(x), r)).reshape(2, -1, 3 * r * r)
    np.testing.assert_array_equal(ours, unfold_reference(x, r))
    # and torch's own unfold, as VL2 calls it
    pad = -grid % r
    t = torch.nn.functional.pad(torch.from_numpy(x), (0, 0, 0, pad, 0, pad)).permute(0, 3, 1, 2)
    np.testing.assert_array_equal(ours, torch.nn.functional.unfold(t, kernel_size=r, stride=r).permute(0, 2, 1))


def test_projector_matches_vl2_mlp_projector():
    """VL2's ``MlpProjector`` (downsample_mlp_gelu, depth 2) written in torch from its source."""
    cfg = ProjectorConfig.tiny()
    torch.manual_seed(3)
    layers = torch.nn.Sequential(
        torch.nn.Linear(cfg.input_dim * 4, cfg.n_embed), torch.nn.GELU(), torch.nn.Linear(cfg.n_embed, cfg.n_embed)
    )
    proj = Projector(cfg, rngs=nnx.Rngs(0))
    load_projector(proj, {f"projector.layers.{k}": v for k, v in layers.state_dict().items()})
    x = np.random.default_rng(3).standard_normal((3, 49, cfg.input_dim)).astype(np.float32)
    with torch.no_grad():
        t = torch.nn.functional.pad(torch.from_numpy(x).reshape(3, 7, 7, -1), (0, 0, 0, 1, 0, 1)).permute(0, 3, 1, 2)
        ref = layers(torch.nn.functional.unfold(t, kernel_size=2, stride=2).permute(0, 2, 1))
    out = proj(jnp.asarray(x))
    assert out.shape == (3, 16, cfg.n_embed)
    assert rel_err(out, ref) < TOL
    with pytest.raises(ValueError, match="square token grid"):
        proj(jnp.zeros((1, 12, cfg.input_dim)))
    with pytest.raises(ValueError, match=r"\[batch, tokens, 32\]"):
        proj(jnp.zeros((1, 16, 8)))


def test_deepseek_vl_v1_image_features():
    """transformers' DeepSeek-VL (v1): SigLIP tower + aligner (Linear, GELU, Linear) = our tower + ``mlp_gelu``."""
    vcfg = VisionConfig.tiny()
    text = dict(
        model_type="llama",
        hidden_size=24,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
    )
    torch.manual_seed(4)
    hf = DeepseekVLModel(DeepseekVLConfig(vision_config=hf_siglip_config(vcfg).to_dict(), text_config=text)).eval()
    perturb(hf, 4)
    tower = SiglipVisionTower(vcfg, rngs=nnx.Rngs(0))
    load_tower(tower, hf.state_dict(), prefix="vision_model.")
    pcfg = ProjectorConfig(projector_type="mlp_gelu", input_dim=vcfg.hidden_size, n_embed=24, downsample_ratio=1)
    proj = Projector(pcfg, rngs=nnx.Rngs(0))
    load_projector(proj, hf.state_dict(), layout="hf")
    x = np.random.default_rng(4).standard_normal((2, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        ref = hf.get_image_features(torch.from_numpy(x).permute(0, 3, 1, 2)).pooler_output
    assert rel_err(proj(tower(jnp.asarray(x))), ref) < TOL


# ---- shapes and sharding --------------------------------------------------------------------------------------


def test_so400m_shapes_and_axes():
    cfg = VisionConfig.siglip_so400m_384()
    assert (cfg.grid_size, cfg.num_positions, cfg.head_dim) == (27, 729, 72)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: SiglipVisionTower(cfg, rngs=nnx.Rngs(0))))
    flat = nnx.to_flat_state(state)
    per_layer = 4 * (1152 * 1152 + 1152) + 2 * 1152 * 4304 + 4304 + 1152 + 4 * 1152
    expected = 14 * 14 * 3 * 1152 + 1152 + 729 * 1152 + 27 * per_layer + 2 * 1152  # 412,987,248
    assert sum(v.get_value().size for _, v in flat) == expected
    for path, var in flat:
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) == var.get_value().ndim, path
        logical_to_spec(axes, VISION_FSDP_RULES)  # no mesh axis used twice
    pixels = jax.ShapeDtypeStruct((2, 384, 384, 3), jnp.float32)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, pixels)
    assert out.shape == (2, 729, 1152)
    p_graphdef, p_state = nnx.split(
        nnx.eval_shape(lambda: Projector(ProjectorConfig.deepseek_vl2(1280), rngs=nnx.Rngs(0)))
    )
    assert jax.eval_shape(lambda s, x: nnx.merge(p_graphdef, s)(x), p_state, out).shape == (2, 196, 1280)
    for _, var in nnx.to_flat_state(p_state):
        logical_to_spec(var.get_metadata()["logical_axes"], VISION_FSDP_RULES)


# ---- tiling and layout ----------------------------------------------------------------------------------------

# deepseek-vl2(-tiny/-small) config.json ``candidate_resolutions``
RELEASED_CANDIDATES = [
    [384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384], [768, 768],
    [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768], [384, 2688], [2688, 384],
    [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456], [3456, 384], [1152, 1152],
]  # fmt: skip


def test_candidate_resolutions_match_released_config():
    assert [list(c) for c in TilingConfig().candidate_resolutions] == RELEASED_CANDIDATES
    assert TilingConfig().tokens_per_side == 14  # ceil((384 // 14) / 2) = ceil(27 / 2)


@pytest.mark.parametrize(
    ("size", "grid", "tokens"),
    [
        ((384, 384), (1, 1), 421),  # 14 * 15 + 1 + 14 * 15
        ((1, 1), (1, 1), 421),  # upscaling gains nothing: the smallest candidate
        ((800, 600), (3, 2), 1415),  # 1152 x 768 holds all 480,000 pixels with the least waste
        ((300, 1000), (1, 3), 841),  # 384 x 1152
        ((1000, 1000), (3, 3), 211 + 42 * 43),
        ((4000, 10), (9, 1), 211 + 14 * 127),  # extreme: 3456 x 384 keeps 3456 x 8 pixels
        ((10, 4000), (1, 9), 211 + 126 * 15),
    ],
)
def test_tile_grid_and_token_count(size, grid, tokens):
    assert tile_grid(*size) == grid
    assert image_token_count(*size) == tokens
    assert image_layout(*grid).num_tokens == tokens
    assert image_token_count(*size, cropping=False) == 421


def test_select_best_resolution_tie_keeps_first():
    # a 100 x 100 image fits both whole with the same waste: the earlier candidate wins
    assert select_best_resolution(100, 100, [(384, 768), (768, 384)]) == (384, 768)
    assert select_best_resolution(100, 100, [(768, 384), (384, 768)]) == (768, 384)
    # equal effective resolution, less waste wins even when listed later
    assert select_best_resolution(100, 100, [(768, 384), (384, 384)]) == (384, 384)
    assert tile_grid(10**6, 1) == (1, 1)  # nothing keeps a pixel row: least waste decides
    with pytest.raises(ValueError, match="no candidate"):
        select_best_resolution(10, 10, [])


def test_layout_hand_computed_small():
    """2 x 2 tokens per tile, 2 x 1 local tiles: ids 0-3 global, 4-7 / 8-11 the local tiles, 12 newline, 13 sep."""
    cfg = TilingConfig(image_size=8, patch_size=2, downsample_ratio=2)
    head = image_layout(2, 1, cfg)
    assert head.source.tolist() == [0, 1, 12, 2, 3, 12, 13, 4, 5, 8, 9, 12, 6, 7, 10, 11, 12]
    assert head.newline_positions.tolist() == [2, 5, 11, 16] and head.separator_position == 6
    tail = image_layout(2, 1, TilingConfig(image_size=8, patch_size=2, downsample_ratio=2, global_view_pos="tail"))
    assert tail.source.tolist() == [4, 5, 8, 9, 12, 6, 7, 10, 11, 12, 13, 0, 1, 12, 2, 3, 12]


def test_layout_vl2_sizes():
    layout = image_layout(2, 1)  # 14 x 14 tokens per tile
    assert layout.num_tokens == 210 + 1 + 14 * 29
    assert layout.newline_positions.tolist() == [14 + 15 * k for k in range(14)] + [
        211 + 28 + 29 * k for k in range(14)
    ]
    assert layout.separator_position == 210
    assert layout.source[211:225].tolist() == list(range(196, 210))  # tile 1, first row
    assert layout.source[225:239].tolist() == list(range(392, 406))  # tile 2, first row


def vl2_assemble(tiles, newline, separator, tw, th, head=True):
    """DeepSeek-VL2's ``prepare_inputs_embeds`` for one image, with numpy reshapes in place of einops."""
    _, hw, d = tiles.shape
    n = int(hw**0.5)
    glob = np.concatenate([tiles[0].reshape(n, n, d), np.broadcast_to(newline, (n, 1, d))], axis=1).reshape(-1, d)
    local = tiles[1:].reshape(th, tw, n, n, d).transpose(0, 2, 1, 3, 4).reshape(th * n, tw * n, d)
    local = np.concatenate([local, np.broadcast_to(newline, (th * n, 1, d))], axis=1).reshape(-1, d)
    parts = [glob, separator[None], local] if head else [local, separator[None], glob]
    return np.concatenate(parts)


@pytest.mark.parametrize("pos", ["head", "tail"])
def test_gather_matches_vl2_prepare_inputs_embeds(pos):
    cfg = TilingConfig(image_size=12, patch_size=2, downsample_ratio=2, global_view_pos=pos)  # 3 x 3 per tile
    rng = np.random.default_rng(5)
    tiles, newline, sep = (rng.standard_normal(shape).astype(np.float32) for shape in ((7, 9, 4), (4,), (4,)))
    out = ops.gather_image_tokens(
        jnp.asarray(tiles), jnp.asarray(newline), jnp.asarray(sep), image_layout(3, 2, cfg).source
    )
    np.testing.assert_array_equal(out, vl2_assemble(tiles, newline, sep, 3, 2, head=pos == "head"))


def test_process_image_tiles():
    cfg = TilingConfig(image_size=28, patch_size=4, downsample_ratio=2)
    rng = np.random.default_rng(6)
    img = rng.integers(0, 256, (30, 70, 3), dtype=np.uint8)
    out = process_image(img, cfg)
    tw, th = out.layout.tiles_w, out.layout.tiles_h
    assert (tw, th) == tile_grid(70, 30, cfg) == (3, 2)  # 84 x 56 holds all 2,100 pixels
    assert out.tiles.shape == (1 + tw * th, 28, 28, 3) and out.tiles.dtype == np.float32
    pad = (127 / 255 - 0.5) / 0.5  # VL2 pads with int(0.5 * 255)
    glob = out.tiles[0]
    assert np.allclose(glob[:7], pad) and np.allclose(glob[-7:], pad)  # 70 x 30 -> 28 x 12, centred
    local = np.asarray(ImageOps.pad(Image.fromarray(img), (84, 56), color=(127, 127, 127)), np.float32)
    grid = out.tiles[1:].reshape(2, 3, 28, 28, 3).transpose(0, 2, 1, 3, 4).reshape(56, 84, 3)  # row-major tiles
    np.testing.assert_allclose(grid, (local / 255 - 0.5) / 0.5, atol=1e-6)
    one = process_image(np.array([[[255, 0, 51]]], np.uint8), cfg)  # 1 x 1: every pixel of every tile alike
    assert one.tiles.shape == (2, 28, 28, 3)
    np.testing.assert_allclose(one.tiles, np.broadcast_to([1.0, -1.0, -0.6], one.tiles.shape), atol=1e-6)


def test_vl2_pipeline_end_to_end(siglip):
    """process -> tower -> projector -> layout on the tiny sizes: one token per layout slot. (A square image:
    global + one local tile, the batch shape the other tests already compiled.)"""
    vcfg, _, tower = siglip
    cfg = TilingConfig(image_size=vcfg.image_size, patch_size=vcfg.patch_size, downsample_ratio=2)
    image = process_image(Image.new("RGB", (20, 20), (10, 200, 30)), cfg)
    assert image.tiles.shape[0] == 2
    feats = Projector(ProjectorConfig.tiny(), rngs=nnx.Rngs(1))(tower(jnp.asarray(image.tiles)))
    assert feats.shape == (image.tiles.shape[0], cfg.tokens_per_side**2, 64)
    embeds = ops.gather_image_tokens(feats, jnp.ones(64), -jnp.ones(64), image.layout.source)
    assert embeds.shape == (image.layout.num_tokens, 64)
    np.testing.assert_array_equal(embeds[image.layout.newline_positions], 1.0)


# ---- bad inputs -----------------------------------------------------------------------------------------------


def test_bad_images():
    with pytest.raises(TypeError, match="PIL.Image.Image or a uint8 array"):
        as_pil_rgb("cat.png")
    with pytest.raises(TypeError, match="dtype float32"):
        as_pil_rgb(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \(8, 8, 4\)"):
        as_pil_rgb(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(8, 8\)"):
        as_pil_rgb(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"mode is 'RGBA'.*convert\('RGB'\)"):
        as_pil_rgb(Image.new("RGBA", (4, 4)))
    with pytest.raises(ValueError, match="0 x 5 pixels"):
        process_image(np.zeros((5, 0, 3), np.uint8))
    with pytest.raises(ValueError, match="at least one pixel"):
        image_token_count(0, 10)


def test_bad_tower_inputs(siglip):
    _, _, tower = siglip
    with pytest.raises(TypeError, match="floating point"):
        tower(jnp.zeros((1, 28, 28, 3), jnp.uint8))
    with pytest.raises(ValueError, match="1 channels, the tower expects 3"):
        tower(jnp.zeros((1, 28, 28, 1)))
    with pytest.raises(ValueError, match="28 channels"):  # channels-first by mistake
        tower(jnp.zeros((1, 3, 28, 28)))
    with pytest.raises(ValueError, match=r"height 2 is smaller than one patch \(4 pixels\)"):
        tower(jnp.zeros((1, 2, 28, 3)))
    with pytest.raises(ValueError, match="width 3 is smaller"):
        tower(jnp.zeros((1, 28, 3, 3)))
    with pytest.raises(ValueError, match=r"\[batch, height, width, channels\]"):
        tower(jnp.zeros((28, 28, 3)))
    with pytest.raises(ValueError, match=r"select_layer=3 must be an int in \[-3, 2\]"):
        tower(jnp.zeros((1, 28, 28, 3)), select_layer=3)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: VisionConfig.tiny(num_attention_heads=5), "not divisible into num_attention_heads=5"),
        (lambda: VisionConfig.tiny(image_size=3), r"image_size: 3 is smaller than one patch \(4\)"),
        (lambda: VisionConfig.tiny(hidden_act="relu"), "hidden_act='relu' is not supported"),
        (lambda: VisionConfig.tiny(num_hidden_layers=0), "num_hidden_layers: must be a positive int"),
        (lambda: VisionConfig.tiny(layer_norm_eps=0.0), "layer_norm_eps"),
        (lambda: ProjectorConfig(projector_type="linear"), "projector_type='linear' is not supported"),
        (lambda: ProjectorConfig(depth=1), "downsample_mlp_gelu needs depth >= 2"),
        (lambda: ProjectorConfig(projector_type="mlp_gelu"), "mlp_gelu neither downsamples"),
        (lambda: TilingConfig(global_view_pos="middle"), "global_view_pos='middle'"),
        (lambda: TilingConfig(image_mean=(0.5, 0.5)), "image_mean: expected three floats"),
        (lambda: TilingConfig(image_std=(0.5, 0.0, 0.5)), "image_std: values must be positive"),
        (lambda: TilingConfig(max_tiles=0), "max_tiles: must be a positive int"),
    ],
)
def test_config_errors(make, match):
    with pytest.raises(ConfigError, match=match):
        make()
