"""NNX modules of DeepSeek-VL2's vision side: the SigLIP tower and the downsampling MLP projector."""

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.layers.common import param, scan_stack, stacked
from dsjax.sharding import shard
from dsjax.vision import ops
from dsjax.vision.config import ProjectorConfig, ProjectorType, VisionAct, VisionConfig


def _zeros(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class LayerNorm(nnx.Module):
    """LayerNorm with a learned scale (ones) and bias (zeros)."""

    def __init__(self, dim: int, axis_name: str, *, eps: float, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
        self.bias = _zeros((dim,), (axis_name,), param_dtype)
        self.eps = eps

    def __call__(self, x):
        return ops.layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Linear(nnx.Module):
    """``x . w + b`` with ``w [in, out]``."""

    def __init__(self, n_in: int, n_out: int, axes: tuple[str, str], *, rngs: nnx.Rngs, param_dtype, std: float):
        self.w = param(rngs, (n_in, n_out), axes, param_dtype, std)
        self.b = _zeros((n_out,), axes[1:], param_dtype)

    def __call__(self, x):
        return ops.linear(x, self.w[...], self.b[...])


class EncoderLayer(nnx.Module):
    """Pre-norm ViT block: ``x += attn(ln1(x)); x += mlp(ln2(x))`` (HF ``SiglipEncoderLayer``, timm ``Block``)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype):
        d, h, k, f = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
        std = d**-0.5
        self.approximate_gelu = cfg.hidden_act == VisionAct.GELU_TANH
        self.ln1 = LayerNorm(d, "vit_embed", eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        for name in ("wq", "wk", "wv"):
            setattr(self, name, param(rngs, (d, h, k), ("vit_embed", "vit_heads", "vit_head_dim"), param_dtype, std))
            setattr(self, "b" + name[1], _zeros((h, k), ("vit_heads", "vit_head_dim"), param_dtype))
        self.wo = param(rngs, (h, k, d), ("vit_heads", "vit_head_dim", "vit_embed"), param_dtype, std)
        self.bo = _zeros((d,), ("vit_embed",), param_dtype)
        self.ln2 = LayerNorm(d, "vit_embed", eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.fc1 = Linear(d, f, ("vit_embed", "vit_mlp"), rngs=rngs, param_dtype=param_dtype, std=std)
        self.fc2 = Linear(f, d, ("vit_mlp", "vit_embed"), rngs=rngs, param_dtype=param_dtype, std=f**-0.5)

    def __call__(self, x_btd):
        weights = [getattr(self, n)[...] for n in ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")]
        x_btd = x_btd + ops.attention(self.ln1(x_btd), *weights)
        h = self.ln2(x_btd)
        fc = (self.fc1.w[...], self.fc1.b[...], self.fc2.w[...], self.fc2.b[...])
        h = ops.mlp(h, *fc, approximate=self.approximate_gelu)
        return shard(x_btd + h, ("batch", "seq", "act_embed"))


class SiglipVisionTower(nnx.Module):
    """SigLIP ViT without the pooling head: ``[b, y, x, c]`` pixels -> ``[b, t, d]`` patch tokens.

    Computes HF ``SiglipVisionModel(...).last_hidden_state`` and, at DeepSeek-VL2's defaults, VL2's
    ``VisionTransformer.forward_features`` (all layers, then the final LayerNorm). When the patch grid differs
    from the native one the position table is resized bicubically (HF's ``interpolate_pos_encoding=True``).
    Computation runs in the pixels' dtype (weights are cast to it); softmax and LayerNorm statistics in fp32.
    """

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        self.cfg = cfg
        self.patch_w = param(rngs, (p, p, c, d), (None, None, None, "vit_embed"), param_dtype, (p * p * c) ** -0.5)
        self.patch_b = _zeros((d,), ("vit_embed",), param_dtype)
        self.pos_embed = param(rngs, (cfg.num_positions, d), ("vit_pos", "vit_embed"), param_dtype, d**-0.5)
        self.layers = stacked(cfg.num_hidden_layers, lambda r: EncoderLayer(cfg, rngs=r, param_dtype=param_dtype), rngs)
        self.post_norm = LayerNorm(d, "vit_embed", eps=cfg.layer_norm_eps, param_dtype=param_dtype)

    def __call__(
        self,
        pixels_byxc: jax.Array,
        *,
        select_layer: int = -1,
        post_norm: bool = True,
        remat: str = "none",
        layers: str = "auto",
    ) -> jax.Array:
        """Encode images; returns ``[b, g * w, d]`` with ``g, w = y // patch_size, x // patch_size`` (pixels past
        the last whole patch are ignored, as by HF's and timm's convolution).

        ``select_layer``: which hidden state to return, indexed as HF's ``hidden_states`` (0 = embeddings,
        k = after k layers, negative from the end: -1 = last, -2 = the one LLaVA-style models take). DeepSeek's
        ``create_siglip_vit(select_layer)`` agrees for every value but 0, which it reads as "all layers".
        ``post_norm``: apply the final LayerNorm (HF and VL2 do; HF's ``hidden_states`` are without it).
        ``remat`` / ``layers``: see :func:`dsjax.layers.common.scan_stack`.
        """
        depth = self._depth(select_layer)
        x = self.embed(pixels_byxc)
        if depth:
            stack = self.layers
            if depth < self.cfg.num_hidden_layers:
                graphdef, state = nnx.split(self.layers)
                stack = nnx.merge(graphdef, jax.tree.map(lambda v: v[:depth], state))
            x, _ = scan_stack(stack, x, lambda layer, h: (layer(h), None), remat=remat, layers=layers)
        return self.post_norm(x) if post_norm else x

    def embed(self, pixels_byxc: jax.Array) -> jax.Array:
        """Patch embeddings plus (resized) position embeddings, ``[b, t, d]`` (HF's ``hidden_states[0]``)."""
        self._check_pixels(pixels_byxc)
        x = ops.patch_embed(pixels_byxc, self.patch_w[...], self.patch_b[...])
        b, g, w, d = x.shape
        x = x + ops.position_embeddings(self.pos_embed[...], (g, w)).astype(x.dtype)[None]
        return shard(x.reshape(b, g * w, d), ("batch", "seq", "act_embed"))

    def _depth(self, select_layer: int) -> int:
        n = self.cfg.num_hidden_layers
        if isinstance(select_layer, bool) or not isinstance(select_layer, int) or not -n - 1 <= select_layer <= n:
            raise ValueError(f"select_layer={select_layer!r} must be an int in [{-n - 1}, {n}] for {n} layers")
        return select_layer if select_layer >= 0 else n + 1 + select_layer

    def _check_pixels(self, pixels):
        cfg = self.cfg
        shape = getattr(pixels, "shape", None)
        if shape is None or len(shape) != 4:
            raise ValueError(f"pixels must be a [batch, height, width, channels] array, got shape {shape}")
        if not jnp.issubdtype(pixels.dtype, jnp.floating):
            raise TypeError(
                f"pixels must be floating point (normalised, see dsjax.vision.processing), got {pixels.dtype}"
            )
        if shape[-1] != cfg.num_channels:
            raise ValueError(
                f"pixels have {shape[-1]} channels, the tower expects {cfg.num_channels} (channels-last layout)"
            )
        for side, name in ((shape[1], "height"), (shape[2], "width")):
            if side < cfg.patch_size:
                raise ValueError(f"image {name} {side} is smaller than one patch ({cfg.patch_size} pixels)")


class Projector(nnx.Module):
    """DeepSeek-VL2's ``MlpProjector``: tower tokens ``[b, t, input_dim]`` -> language-model embeddings.

    ``downsample_mlp_gelu`` (VL2): the square token grid is 2 x 2 pixel-shuffled (:func:`ops.pixel_shuffle`,
    27 x 27 -> 14 x 14) before the MLP; ``mlp_gelu`` (DeepSeek-VL v1's aligner) keeps every token.
    ``layers[i]`` is VL2's ``projector.layers.{2 i}`` (the GELUs sit at the odd indices).
    """

    def __init__(self, cfg: ProjectorConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        widths = cfg.widths
        axes = ("proj_in", *("proj_mlp",) * (len(widths) - 2), "embed")
        self.layers = nnx.List(
            [
                Linear(n_in, n_out, (axes[i], axes[i + 1]), rngs=rngs, param_dtype=param_dtype, std=n_in**-0.5)
                for i, (n_in, n_out) in enumerate(itertools.pairwise(widths))
            ]
        )

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        """Returns ``[b, t', n_embed]``; ``t' = ceil(g / 2) ** 2`` for a ``g x g`` grid when downsampling."""
        if x_btd.ndim != 3 or x_btd.shape[-1] != self.cfg.input_dim:
            raise ValueError(f"projector input must be [batch, tokens, {self.cfg.input_dim}], got {x_btd.shape}")
        if self.cfg.projector_type == ProjectorType.DOWNSAMPLE_MLP_GELU:
            b, t, d = x_btd.shape
            g = round(t**0.5)
            if g * g != t:
                raise ValueError(f"downsample_mlp_gelu needs a square token grid, got {t} tokens")
            x_btd = ops.pixel_shuffle(x_btd.reshape(b, g, g, d), self.cfg.downsample_ratio)
            x_btd = x_btd.reshape(b, -1, x_btd.shape[-1])
        for i, layer in enumerate(self.layers):
            x_btd = layer(jax.nn.gelu(x_btd, approximate=False) if i else x_btd)
        return x_btd
