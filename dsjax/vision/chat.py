"""Prompts with images: text holding ``<image>`` markers plus Pillow images -> token ids, tiles and layouts.

As DeepSeek-VL2's processor does, each marker becomes a run of ``layout.num_tokens`` copies of the placeholder id
(one per image embedding: tile tokens, newlines and the view separator), and images are tiled only when the
prompt holds at most two (``cropping``). :class:`~dsjax.vision.model.VisionLanguageModel` then writes the image
embeddings over the runs. :func:`generate_greedy` continues such a prompt with the latent KV cache.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax.data.tokenizer import Tokenizer, encode_array
from dsjax.infer.cache import init_cache
from dsjax.infer.forward import _Runner, _scan_cached, forward_cached
from dsjax.model import check_tokens
from dsjax.vision.config import TilingConfig
from dsjax.vision.model import ImageBatch, batch_images
from dsjax.vision.processing import ProcessedImage, process_image

IMAGE_MARKER = "<image>"  # VL2's image token string


class VLInputs(NamedTuple):
    """One processed prompt: ``tokens [t]`` int32 with the placeholder runs, the processed images in order and
    them as one :class:`~dsjax.vision.model.ImageBatch` (None without images)."""

    tokens: np.ndarray
    images: tuple[ProcessedImage, ...]
    batch: ImageBatch | None


class VLProcessor:
    """Turns text with image markers and images into model inputs.

    Args:
      tokenizer: any :class:`~dsjax.data.tokenizer.Tokenizer`; its text encoding must never produce
        ``image_token_id`` (checked), so placeholders are unambiguous.
      image_token_id: the placeholder id (VL2's ``<image>`` id; ``VLConfig.image_token_id``).
      tiling: the model's tiling (``VLConfig.tiling``).
      marker: the string that stands for an image in the text.
      add_bos: start the ids with ``tokenizer.bos_id`` (VL2's processor does).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        image_token_id: int,
        tiling: TilingConfig,
        marker: str = IMAGE_MARKER,
        add_bos: bool = True,
    ):
        if not marker:
            raise ValueError("marker must be a non-empty string")
        self.tokenizer, self.image_token_id, self.tiling = tokenizer, int(image_token_id), tiling
        self.marker, self.add_bos = marker, add_bos

    def __call__(self, text: str, images: Sequence = (), *, cropping: bool | None = None) -> VLInputs:
        """Process one prompt. ``images`` (PIL RGB images or uint8 ``[h, w, 3]`` arrays) fill the markers in order;
        ``cropping`` None follows VL2 (tile when there are at most two images).

        Raises:
          ValueError: the marker count differs from the number of images; the text encodes to the placeholder id.
        """
        pieces = text.split(self.marker)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"the text has {len(pieces) - 1} {self.marker!r} marker(s) but {len(images)} image(s)")
        crop = len(images) <= 2 if cropping is None else cropping
        processed = tuple(process_image(image, self.tiling, cropping=crop) for image in images)
        parts = [np.array([self.tokenizer.bos_id], np.int32)] if self.add_bos else []
        for i, piece in enumerate(pieces):
            ids = encode_array(self.tokenizer, piece)
            if np.any(ids == self.image_token_id):
                raise ValueError(f"text piece {i} encodes to the image placeholder id {self.image_token_id}")
            parts.append(ids)
            if i < len(processed):
                parts.append(np.full(processed[i].layout.num_tokens, self.image_token_id, np.int32))
        tokens = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
        return VLInputs(tokens, processed, batch_images(processed) if processed else None)


def pad_batch(inputs: Sequence[VLInputs], pad_id: int, length: int | None = None):
    """Right-pad processed prompts into ``tokens [b, length]`` (default: the longest) and one
    :class:`~dsjax.vision.model.ImageBatch` of all their images in row order (None without images); also
    returns ``lengths [b]``."""
    longest = max(len(x.tokens) for x in inputs)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length={length} is shorter than the longest prompt ({longest} tokens)")
    tokens = np.full((len(inputs), length), pad_id, np.int32)
    for row, x in enumerate(inputs):
        tokens[row, : len(x.tokens)] = x.tokens
    images = [image for x in inputs for image in x.images]
    lengths = np.array([len(x.tokens) for x in inputs], np.int32)
    return tokens, (batch_images(images) if images else None), lengths


# ---- greedy generation with images -------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "num_slots", "dispatch"))
def _prefill(graphdef, state, tokens_bt, pixels, source, num_slots: int, dispatch: str):
    """The prompt, images spliced in, through the language model into a fresh latent cache (as the engine's
    prefill, which embeds token ids itself and so cannot take image embeddings)."""
    model = nnx.merge(graphdef, state)
    lang = model.language
    b, t = tokens_bt.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = init_cache(lang.config.num_hidden_layers, b, num_slots, lang.config, lang.dtype)
    runner = _Runner(lang, positions, num_slots, fresh=True, attention="naive", dispatch=dispatch)
    x = model.embed(tokens_bt, pixels, source)
    first = 0
    for stack, count in ((lang.dense_layers, lang.config.first_k_dense_replace), (lang.moe_layers, None)):
        if stack is not None:
            x, cache = _scan_cached(stack, x, cache, first, runner)
            first += count or 0
    return lang.logits(lang.final_norm(x))[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "dispatch"), donate_argnames=("cache",))
def _decode_step(graphdef, state, token_b, position_b, cache, attention: str, dispatch: str):
    lang = nnx.merge(graphdef, state)
    logits, _, cache = forward_cached(
        lang, token_b[:, None], position_b[:, None], cache, attention=attention, dispatch=dispatch
    )
    return logits[:, 0], cache


def generate_greedy(
    model,
    tokens,
    images=None,
    *,
    max_new_tokens: int = 32,
    stop_tokens: Sequence[int] | None = None,
    attention: str = "absorbed",
    dispatch: str = "auto",
) -> list[int]:
    """Greedy continuation of one prompt with images: a prefill of the image-spliced embeddings into the latent
    cache, then one cached decode step per token (the engine's :func:`~dsjax.infer.forward.forward_cached`).

    Args:
      model: a :class:`~dsjax.vision.model.VisionLanguageModel`.
      tokens: the prompt's ids ``[t]`` with the placeholder runs (:class:`VLProcessor` output).
      images: its processed images or their :class:`~dsjax.vision.model.ImageBatch`.
      stop_tokens: ids that end generation (included in the output); default the language config's EOS.

    Returns the generated ids. Rows are decoded one prompt at a time, in a Python loop of jitted steps.
    """
    cfg = model.config.language
    tokens = check_tokens(np.asarray(tokens)[None], cfg)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    t = tokens.shape[1]
    if t + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"{t} prompt + {max_new_tokens} new tokens exceed {cfg.max_position_embeddings} positions")
    batch = model.check_images(tokens, images)
    stop = set(stop_tokens if stop_tokens is not None else () if cfg.eos_token_id is None else (cfg.eos_token_id,))
    pixels, source = (None, None) if batch is None else (jnp.asarray(batch.pixels), jnp.asarray(batch.source))
    graphdef, state = nnx.split(model)
    num_slots = -(-(t + max_new_tokens) // 32) * 32  # a multiple of 32: nearby lengths share a compiled program
    logits, cache = _prefill(graphdef, state, tokens, pixels, source, num_slots, dispatch)
    lang_graphdef, lang_state = nnx.split(model.language)
    out = [int(jnp.argmax(logits[0]))]
    while len(out) < max_new_tokens and out[-1] not in stop:
        position = jnp.full((1,), t + len(out) - 1, jnp.int32)
        token = jnp.asarray([out[-1]], jnp.int32)
        logits, cache = _decode_step(lang_graphdef, lang_state, token, position, cache, attention, dispatch)
        out.append(int(jnp.argmax(logits[0])))
    return out
