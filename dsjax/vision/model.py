"""DeepSeek-VL2's vision-language model: SigLIP tower + projector + the DeepSeek language model.

Each image's tiles go through the tower and the projector; :func:`dsjax.vision.ops.gather_image_tokens` lays
the tokens out with the learned ``image_newline`` and ``view_seperator`` (VL2's spelling) embeddings, and the
result replaces the embeddings of the image-placeholder tokens, in order (VL2's ``prepare_inputs_embeds``:
``inputs_embeds[images_seq_mask] = images_in_this_batch``). The language model then runs on those embeddings.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax.config import ConfigError, ModelConfig
from dsjax.layers.block import embed_lookup
from dsjax.layers.common import param
from dsjax.model import ModelOutput, Transformer, check_tokens, redraw_weights, weight_noise
from dsjax.train.losses import cross_entropy
from dsjax.vision.config import ProjectorConfig, ProjectorType, TilingConfig, VisionConfig
from dsjax.vision.ops import gather_image_tokens
from dsjax.vision.processing import ProcessedImage
from dsjax.vision.tower import Projector, SiglipVisionTower


@dataclasses.dataclass(frozen=True, kw_only=True)
class VLConfig:
    """A DeepSeek-VL2 model: the language model, the vision side (both None: text only) and the tiling.

    ``image_token_id`` is the placeholder id the processor repeats once per image embedding (VL2's ``<image>``);
    None for a model that never sees images.
    """

    language: ModelConfig
    vision: VisionConfig | None = None
    projector: ProjectorConfig | None = None
    tiling: TilingConfig = dataclasses.field(default_factory=TilingConfig)
    image_token_id: int | None = None

    def __post_init__(self):
        if (self.vision is None) != (self.projector is None):
            raise ConfigError("vision and projector: give both (a vision-language model) or neither (text only)")
        if self.image_token_id is not None and not 0 <= self.image_token_id < self.language.vocab_size:
            raise ConfigError(f"image_token_id={self.image_token_id} is outside [0, {self.language.vocab_size})")
        if self.vision is None:
            return
        v, p, t = self.vision, self.projector, self.tiling
        checks = [
            ("projector.input_dim", p.input_dim, "vision.hidden_size", v.hidden_size),
            ("projector.n_embed", p.n_embed, "language.hidden_size", self.language.hidden_size),
            ("tiling.image_size", t.image_size, "vision.image_size", v.image_size),
            ("tiling.patch_size", t.patch_size, "vision.patch_size", v.patch_size),
        ]
        # the layout's tokens per tile side must be what the projector leaves of the patch grid
        ratio = p.downsample_ratio if p.projector_type == ProjectorType.DOWNSAMPLE_MLP_GELU else 1
        checks.append(("tiling.downsample_ratio", t.downsample_ratio, "the projector's downsampling", ratio))
        for name, value, other, expected in checks:
            if value != expected:
                raise ConfigError(f"{name}={value} does not match {other}={expected}")

    def replace(self, **changes) -> VLConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, language: ModelConfig | None = None, **overrides) -> VLConfig:
        """A test-sized model: 28 px tiles of 7 x 7 patches -> 4 x 4 tokens per tile into a 64-wide language model
        with a 264-entry vocabulary (the byte tokenizer's), placeholder id 262 (an id it never produces)."""
        language = language or ModelConfig.tiny_v2(vocab_size=264, num_hidden_layers=2)
        base = dict(
            language=language,
            vision=VisionConfig.tiny(),
            projector=ProjectorConfig.tiny(n_embed=language.hidden_size),
            tiling=TilingConfig(image_size=28, patch_size=4, downsample_ratio=2, max_tiles=4),
            image_token_id=262,
        )
        return cls(**{**base, **overrides})


class ImageBatch(NamedTuple):
    """The images of one call, in order of appearance (row by row, left to right), ready for the model.

    ``pixels [n_tiles, size, size, 3]``: every image's tiles concatenated; ``source [n_tokens]`` indexes
    ``concat(tile_tokens.reshape(-1, d), newline, separator)`` over all of them (each image's
    :attr:`~dsjax.vision.processing.ImageLayout.source` shifted to its tiles); ``num_tokens`` per image.
    """

    pixels: np.ndarray
    source: np.ndarray
    num_tokens: tuple[int, ...]


def batch_images(images: Sequence[ProcessedImage]) -> ImageBatch:
    """Concatenate processed images into one :class:`ImageBatch` (one tower call for all tiles)."""
    if not images:
        raise ValueError("no images to batch")
    for i, image in enumerate(images):
        if not isinstance(image, ProcessedImage):
            raise TypeError(f"image {i} is a {type(image).__name__}; process it first (dsjax.vision.process_image)")
    sizes = {image.tiles.shape[1:] for image in images}
    if len(sizes) != 1:
        raise ValueError(f"images were processed at different tile sizes {sorted(sizes)}")
    per_tile = images[0].layout.tokens_per_side ** 2
    total = sum(len(image.tiles) for image in images) * per_tile
    parts, offset = [], 0
    for image in images:
        src = image.layout.source
        nl = image.layout.newline_index
        # feature rows move by the tiles before this image; newline / separator move to the shared table's end
        parts.append(np.where(src < nl, src + offset, src - nl + total))
        offset += len(image.tiles) * per_tile
    pixels = np.concatenate([image.tiles for image in images])
    return ImageBatch(pixels, np.concatenate(parts).astype(np.int32), tuple(i.layout.num_tokens for i in images))


def splice_image_embeddings(text_btd: jax.Array, mask_bt: jax.Array, image_nd: jax.Array) -> jax.Array:
    """``text`` with its ``mask``ed positions replaced by the rows of ``image``, in row-major order.

    The k-th masked position (counting row by row) takes ``image[k]``; the mask must hold exactly
    ``len(image)`` positions (checked by the callers that see concrete inputs). Shape-static, so it traces.
    """
    b, t, d = text_btd.shape
    flat_mask = mask_bt.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, max(image_nd.shape[0] - 1, 0))
    rows = jnp.take(image_nd.astype(text_btd.dtype), index, axis=0)
    return jnp.where(flat_mask[:, None], rows, text_btd.reshape(b * t, d)).reshape(b, t, d)


class VisionLanguageModel(nnx.Module):
    """DeepSeek-VL2: ``vision`` (SigLIP tower), ``projector``, ``image_newline`` / ``view_seperator`` ``[d]`` and
    ``language`` (a :class:`~dsjax.model.Transformer`). ``vision`` and the rest are None for a text-only model.

    Args:
      cfg: the model.
      rngs: initialisation randomness; the two special embeddings are ``N(0, 1 / d)`` (VL2's
        ``randn(n_embed) / sqrt(n_embed)``).
      dtype: compute dtype of the language model and the tower (pixels are cast to it).
      param_dtype: storage dtype of all weights.
    """

    def __init__(self, cfg: VLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = cfg
        self.language = Transformer(cfg.language, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d, has_vision = cfg.language.hidden_size, cfg.vision is not None
        self.vision = SiglipVisionTower(cfg.vision, rngs=rngs, param_dtype=param_dtype) if has_vision else None
        self.projector = Projector(cfg.projector, rngs=rngs, param_dtype=param_dtype) if has_vision else None
        self.image_newline = param(rngs, (d,), ("embed",), param_dtype, d**-0.5) if has_vision else None
        self.view_seperator = param(rngs, (d,), ("embed",), param_dtype, d**-0.5) if has_vision else None

    # ---- public entry point --------------------------------------------------------------------------------
    def __call__(self, tokens, images: Sequence[ProcessedImage] | ImageBatch | None = None, **options):
        """Logits ``[b, t, vocab]`` for ``tokens [b, t]`` whose image-placeholder runs take the ``images``
        (processed images or an :class:`ImageBatch`, in order of appearance). Validates everything, then runs
        a cached jit-compiled :meth:`forward`. ``options``: as for :meth:`dsjax.model.Transformer.__call__`.

        Raises:
          ValueError: images for a model without a tower or without ``image_token_id``, a placeholder count that
            differs from the images' token count, pixels that do not fit the tower.
          TypeError: images that are not processed images, non-float pixels.
        """
        tokens = check_tokens(tokens, self.config.language)
        batch = self.check_images(tokens, images)
        graphdef, state = nnx.split(self)
        pixels = source = None
        if batch is not None:
            pixels, source = jnp.asarray(batch.pixels), jnp.asarray(batch.source)
        return _jit_forward(graphdef, state, tokens, pixels, source, **options).logits

    def check_images(self, tokens, images) -> ImageBatch | None:
        """Validate ``images`` against concrete ``tokens``; returns them as an :class:`ImageBatch` (None when
        there are no images and no placeholders)."""
        cfg = self.config
        host = np.asarray(tokens)
        placeholders = 0 if cfg.image_token_id is None else int(np.sum(host == cfg.image_token_id))
        if images is None or (not isinstance(images, ImageBatch) and len(images) == 0):
            if placeholders:
                raise ValueError(f"tokens hold {placeholders} image placeholders (id {cfg.image_token_id}), no images")
            return None
        if self.vision is None:
            raise ValueError("images were given to a text-only model (no vision tower in its config)")
        if cfg.image_token_id is None:
            raise ValueError("images were given but the config has no image_token_id to place them at")
        batch = images if isinstance(images, ImageBatch) else batch_images(images)
        self.vision._check_pixels(batch.pixels)
        expected = cfg.tiling.image_size
        if batch.pixels.shape[1:3] != (expected, expected):
            raise ValueError(f"image tiles are {batch.pixels.shape[1:3]} pixels; this model's tiles are {expected}")
        if placeholders != len(batch.source):
            raise ValueError(
                f"tokens hold {placeholders} image placeholders (id {cfg.image_token_id}) but the "
                f"{len(batch.num_tokens)} image(s) need {len(batch.source)} ({' + '.join(map(str, batch.num_tokens))})"
            )
        return batch

    # ---- the computation -----------------------------------------------------------------------------------
    def encode_tiles(self, pixels_nyxc: jax.Array) -> jax.Array:
        """Tiles ``[n, size, size, 3]`` -> projected tokens ``[n, tokens_per_side**2, d]`` (compute dtype)."""
        return self.projector(self.vision(pixels_nyxc.astype(self.language.dtype)))

    def image_embeddings(self, pixels_nyxc: jax.Array, source: jax.Array) -> jax.Array:
        """Every image's embeddings in VL2's layout, concatenated: ``[len(source), d]`` (see :class:`ImageBatch`)."""
        return gather_image_tokens(
            self.encode_tiles(pixels_nyxc), self.image_newline[...], self.view_seperator[...], source
        )

    def embed(self, tokens_bt: jax.Array, pixels=None, source=None) -> jax.Array:
        """Input embeddings ``[b, t, d]``: the token embeddings with the image placeholders replaced."""
        text = embed_lookup(self.language.embed[...], tokens_bt, self.language.dtype)
        if pixels is None:
            return text
        mask = tokens_bt == self.config.image_token_id
        return splice_image_embeddings(text, mask, self.image_embeddings(pixels, source))

    def forward(self, tokens_bt, pixels=None, source=None, **options) -> ModelOutput:
        """The pure forward pass (no input checks): :meth:`embed`, then the language model's forward with those
        input embeddings. ``options``: ``positions``, ``segment_ids``, ``return_mtp`` and the loop / kernel
        choices of :meth:`dsjax.model.Transformer.forward`."""
        return self.language.forward(tokens_bt, input_embeddings=self.embed(tokens_bt, pixels, source), **options)


def text_loss(logits_btv: jax.Array, tokens_bt: jax.Array, image_token_id: int, loss_mask_bt=None):
    """Next-token cross-entropy on text only: ``(sum, count)`` over targets ``tokens[:, 1:]`` that are not image
    placeholders (VL2 sets their labels to -100) and, when given, where ``loss_mask[:, 1:]`` is true (e.g. to
    drop the prompt). Pure, for use inside a jitted train step."""
    targets = tokens_bt[:, 1:]
    mask = targets != image_token_id
    if loss_mask_bt is not None:
        mask = mask & loss_mask_bt[:, 1:].astype(bool)
    return cross_entropy(logits_btv[:, :-1], targets, mask)


def vl_loss_fn(graphdef: nnx.GraphDef, **options):
    """``loss_fn(params, rest, batch) -> (mean text loss, aux)`` for ``jax.value_and_grad`` over a
    :class:`VisionLanguageModel` split as ``nnx.split(model, nnx.Param, ...)``. ``batch``: ``tokens [b, t]``,
    ``pixels`` and ``source`` (an :class:`ImageBatch`'s, or None) and optionally ``loss_mask [b, t]``.
    ``options`` go to :meth:`VisionLanguageModel.forward` (``remat``, ``layers``, ``dispatch``)."""

    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        out = model.forward(batch["tokens"], batch.get("pixels"), batch.get("source"), **options)
        total, count = text_loss(out.logits, batch["tokens"], model.config.image_token_id, batch.get("loss_mask"))
        return total / jnp.maximum(count, 1), dict(ce_sum=total, tokens=count)

    return loss_fn


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "dispatch", "remat", "layers"))
def _jit_forward(graphdef, state, tokens, pixels, source, **options):
    return nnx.merge(graphdef, state).forward(tokens, pixels, source, **options)


def create_vl_model(cfg: VLConfig, *, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32):
    """A randomly initialised :class:`VisionLanguageModel` (on the default device), built as
    :func:`dsjax.model.create_model` builds the language model: one jit-compiled normal draw sliced over every
    weight (the constructor's own per-weight draws are dead code XLA drops; eager construction of the tower and
    the stacked layers compiles each op separately and takes far longer)."""

    def build():
        return VisionLanguageModel(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype)

    graphdef, abstract_state = nnx.split(nnx.eval_shape(build))

    @jax.jit
    def init(noise):
        return redraw_weights(nnx.split(build())[1], noise)

    return nnx.merge(graphdef, init(weight_noise(abstract_state, seed)))
