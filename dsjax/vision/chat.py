"""Prompts with images: text holding ``<image>`` markers plus Pillow images -> token ids, tiles and layouts.

As DeepSeek-VL2's processor does, each marker becomes a run of ``layout.num_tokens`` copies of the placeholder id
(one per image embedding: tile tokens, newlines and the view separator), and images are tiled only when the
prompt holds at most two (``cropping``). :class:`~dsjax.vision.model.VisionLanguageModel` then writes the image
embeddings over the runs. :func:`render_vl_chat` is VL2's ``deepseek`` conversation format;
:func:`dsjax.infer.generate` continues such prompts with the latent KV cache (:func:`prefill_embeddings` makes
its prefill inputs) and :func:`generate_greedy` is its one-prompt greedy form.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax.data.tokenizer import DEEPSEEK_EOS, Tokenizer, encode_array
from dsjax.vision.config import TilingConfig
from dsjax.vision.model import ImageBatch, batch_images
from dsjax.vision.processing import ProcessedImage, process_image

IMAGE_MARKER = "<image>"  # VL2's image token string
VL2_USER, VL2_ASSISTANT = "<|User|>", "<|Assistant|>"  # VL2's role tokens (ASCII bars, unlike V3's)


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


# ---- chat format ------------------------------------------------------------------------------------------


def render_vl_chat(
    messages: Sequence[Mapping], *, add_generation_prompt: bool = True, eos: str = DEEPSEEK_EOS
) -> tuple[str, list]:
    """DeepSeek-VL2's ``deepseek`` conversation format; returns ``(text with <image> markers, images in order)``.

    ``messages``: ``{"role": system|user|assistant, "content": str, "images": [...]}`` (``images`` optional).
    The text is ``{system}\\n\\n`` (when given), then per turn ``<|User|>: {content}\\n\\n`` and
    ``<|Assistant|>: {content}{eos}``; with ``add_generation_prompt`` it ends with ``<|Assistant|>:`` for the
    model to continue (VL2's ``get_prompt`` with an empty last assistant message). A message with images but no
    ``<image>`` marker gets one marker line per image in front of its text (VL2 users write ``<image>\\n...``).

    Raises:
      ValueError: an unknown role, a system message after the first turn, or more markers than images.
    """
    text, images = "", []
    for i, message in enumerate(messages):
        role, content = message.get("role"), str(message.get("content", ""))
        pics = list(message.get("images") or ())
        markers = content.count(IMAGE_MARKER)
        if pics and not markers:
            content, markers = (IMAGE_MARKER + "\n") * len(pics) + content, len(pics)
        if markers != len(pics):
            raise ValueError(f"message {i} has {markers} {IMAGE_MARKER!r} marker(s) but {len(pics)} image(s)")
        images.extend(pics)
        if role == "system":
            if i:
                raise ValueError("a system message must come first")
            text += content + "\n\n" if content else ""
        elif role == "user":
            text += f"{VL2_USER}: {content}\n\n"
        elif role == "assistant":
            text += f"{VL2_ASSISTANT}: {content}{eos}"
        else:
            raise ValueError(f"message {i}: role {role!r} is not one of system, user, assistant")
    if add_generation_prompt:
        text += f"{VL2_ASSISTANT}:"
    return text, images


def encode_vl_chat(processor: VLProcessor, messages: Sequence[Mapping], **options) -> VLInputs:
    """:func:`render_vl_chat` then the processor: one conversation's :class:`VLInputs`."""
    cropping = options.pop("cropping", None)
    text, images = render_vl_chat(messages, **options)
    return processor(text, images, cropping=cropping)


# ---- generation with images ---------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, state, tokens_bt, pixels, source):
    return nnx.merge(graphdef, state).embed(tokens_bt, pixels, source)


def _merge_batches(batches: Sequence[ImageBatch], per_tile: int) -> ImageBatch:
    """One :class:`ImageBatch` of several (rows in order): feature indices move past the earlier batches' tiles,
    newline / separator indices to the merged table's last two rows."""
    total = sum(len(b.pixels) for b in batches) * per_tile
    parts, offset = [], 0
    for b in batches:
        features = len(b.pixels) * per_tile
        parts.append(np.where(b.source < features, b.source + offset, b.source - features + total))
        offset += features
    return ImageBatch(
        np.concatenate([b.pixels for b in batches]),
        np.concatenate(parts).astype(np.int32),
        tuple(n for b in batches for n in b.num_tokens),
    )


def prefill_embeddings(model, tokens_bt: np.ndarray, lengths_b: np.ndarray, images) -> jax.Array | None:
    """The prefill inputs ``[B, T, d]`` of a right-padded prompt batch: token embeddings with each prompt's images
    written over its placeholder runs (None when no prompt has images: the plain embedding lookup then serves).

    Args:
      model: a :class:`~dsjax.vision.model.VisionLanguageModel`.
      tokens_bt: the padded ids ``[B, T]``; rows past ``len(lengths_b)`` are batch padding.
      lengths_b: each prompt's length (placeholders must lie within it).
      images: None, or one entry per prompt: a sequence of :class:`~dsjax.vision.processing.ProcessedImage`
        (or one :class:`~dsjax.vision.model.ImageBatch`), None or empty for a prompt without images.

    Raises:
      ValueError / TypeError: naming the prompt, when its placeholders and images disagree or an image is not
        processed (see :meth:`~dsjax.vision.model.VisionLanguageModel.check_images`).
    """
    tokens_bt = np.asarray(tokens_bt)
    image_id = model.config.image_token_id
    if images is None:
        images = [None] * len(lengths_b)
    elif isinstance(images, ImageBatch | ProcessedImage | str) or not isinstance(images, Sequence):
        raise TypeError("images must be a list with one entry (a list of processed images) per prompt")
    if len(images) != len(lengths_b):
        raise ValueError(f"{len(images)} image lists for {len(lengths_b)} prompts (give one per prompt)")
    batches = []
    for i, entry in enumerate(images):
        if isinstance(entry, ProcessedImage):
            entry = [entry]
        try:
            batch = model.check_images(tokens_bt[i : i + 1, : int(lengths_b[i])], entry)
        except (ValueError, TypeError) as e:
            raise type(e)(f"prompt {i}: {e}") from None
        if batch is not None:
            batches.append(batch)
    if not batches:
        return None
    batch = _merge_batches(batches, model.config.tiling.tokens_per_side**2)
    if image_id is not None and int(np.sum(tokens_bt == image_id)) != len(batch.source):
        raise ValueError(f"the image placeholder id {image_id} also appears in the padding of the prompt batch")
    graphdef, state = nnx.split(model)
    return _embed(graphdef, state, jnp.asarray(tokens_bt), jnp.asarray(batch.pixels), jnp.asarray(batch.source))


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
    """Greedy continuation of one prompt with images: :func:`dsjax.infer.generate` at temperature 0 (a prefill of
    the image-spliced embeddings into the latent cache, then the cached decode loop).

    Args:
      model: a :class:`~dsjax.vision.model.VisionLanguageModel`.
      tokens: the prompt's ids ``[t]`` with the placeholder runs (:class:`VLProcessor` output).
      images: its processed images or their :class:`~dsjax.vision.model.ImageBatch`.
      stop_tokens: ids that end generation (included in the output); default the language config's EOS.

    Returns the generated ids.
    """
    from dsjax.infer.engine import generate  # here: dsjax.infer imports this module lazily

    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one prompt's ids [t], got shape {tokens.shape}")
    entry = None if images is None else images if isinstance(images, ImageBatch) else list(images)
    return generate(
        model, [tokens], images=[entry], max_new_tokens=max_new_tokens, temperature=0.0, stop_tokens=stop_tokens,
        attention=attention, dispatch=dispatch,
    )[0]  # fmt: skip
