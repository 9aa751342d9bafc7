"""DeepSeek-VL2's image preprocessing and image-token layout, in numpy and Pillow.

An image becomes a global view (the whole image, aspect kept, padded with the mean colour to ``image_size``
square) plus a grid of ``tiles_w x tiles_h`` local tiles cut from the image padded the same way to the best
candidate resolution. Pixels are rescaled by 1/255 and normalised with mean/std 0.5 (SigLIP) in float32,
channels-last. After the tower and the 2 x 2 projector each tile is ``n x n`` tokens (n = 14); the sequence is
the global view's rows each followed by a newline embedding, one view-separator embedding, then the local grid's
``tiles_h * n`` rows of ``tiles_w * n`` tokens, each followed by a newline (global view first for
``global_view_pos="head"``, VL2's setting). (deepseek-ai/DeepSeek-VL2 ``processing_deepseek_vl_v2.py`` and
``DeepseekVLV2ForCausalLM.prepare_inputs_embeds``.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from dsjax.vision.config import TilingConfig

DEFAULT_TILING = TilingConfig()


def as_pil_rgb(image) -> Image.Image:
    """Check an input image: a ``PIL.Image.Image`` in mode ``RGB`` or a ``uint8`` array ``[height, width, 3]``.

    Raises:
      TypeError: not an image, or an array that is not ``uint8``.
      ValueError: another channel count / mode, or an empty image.
    """
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"image mode is {image.mode!r}, expected 'RGB' (convert it with image.convert('RGB'))")
        pil = image
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image array has dtype {image.dtype}, expected uint8 values in [0, 255]")
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image array has shape {image.shape}, expected [height, width, 3] (RGB)")
        pil = None
    else:
        raise TypeError(f"expected a PIL.Image.Image or a uint8 array [height, width, 3], got {type(image).__name__}")
    width, height = pil.size if pil is not None else (image.shape[1], image.shape[0])
    if width < 1 or height < 1:
        raise ValueError(f"image is {width} x {height} pixels; it needs at least one pixel")
    return pil if pil is not None else Image.fromarray(image, "RGB")


def select_best_resolution(width: int, height: int, candidates: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """VL2's choice among ``(width, height)`` candidates for a ``width x height`` image.

    Each candidate scales the image to fit (``int`` truncation of the scaled sides); its effective resolution is
    that area, capped at the original area (upscaling gains nothing). Highest effective resolution wins, then
    least waste (candidate area minus effective); on an exact tie of both the earlier candidate is kept. When
    every candidate scales a side below one pixel (effective 0, e.g. 10**6 x 1) the least waste still picks
    the smallest candidate.
    """
    if not candidates:
        raise ValueError("no candidate resolutions to choose from")
    best, best_effective, best_waste = None, 0, float("inf")
    for cand_w, cand_h in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cand_w, cand_h), effective, waste
    return best


def tile_grid(width: int, height: int, cfg: TilingConfig = DEFAULT_TILING, *, cropping: bool = True) -> tuple[int, int]:
    """``(tiles_w, tiles_h)`` of the local grid; ``cropping=False`` gives one tile (VL2's choice for conversations
    with more than two images)."""
    if width < 1 or height < 1:
        raise ValueError(f"image is {width} x {height} pixels; it needs at least one pixel")
    if not cropping:
        return 1, 1
    best_w, best_h = select_best_resolution(width, height, cfg.candidate_resolutions)
    return best_w // cfg.image_size, best_h // cfg.image_size


def normalize(pixels_yxc: np.ndarray, cfg: TilingConfig = DEFAULT_TILING) -> np.ndarray:
    """uint8 ``[..., 3]`` -> float32 ``(x / 255 - mean) / std`` (torchvision's ``ToTensor`` + ``Normalize``)."""
    mean = np.asarray(cfg.image_mean, np.float32)
    std = np.asarray(cfg.image_std, np.float32)
    return (pixels_yxc.astype(np.float32) / np.float32(255.0) - mean) / std


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """Where one image's embeddings go in the token sequence.

    ``source[i]`` indexes the rows of ``concat(tile_tokens.reshape(-1, d), newline, separator)`` with the
    ``1 + tiles_w * tiles_h`` tiles in processing order (global view first, then local tiles row by row), each
    ``tokens_per_side ** 2`` tokens row-major; see :func:`dsjax.vision.ops.gather_image_tokens`.
    """

    tiles_w: int
    tiles_h: int
    tokens_per_side: int
    source: np.ndarray

    @property
    def num_tokens(self) -> int:
        """Sequence positions the image occupies (all of them image-token placeholders in VL2's prompt)."""
        return len(self.source)

    @property
    def newline_index(self) -> int:
        """The value of ``source`` that stands for the newline embedding."""
        return (1 + self.tiles_w * self.tiles_h) * self.tokens_per_side**2

    @property
    def separator_index(self) -> int:
        """The value of ``source`` that stands for the view-separator embedding."""
        return self.newline_index + 1

    @property
    def newline_positions(self) -> np.ndarray:
        """Offsets (within the image's span) of the newline embeddings, one after every token row."""
        return np.flatnonzero(self.source == self.newline_index)

    @property
    def separator_position(self) -> int:
        """Offset of the single view-separator embedding between the global and the local views."""
        return int(np.flatnonzero(self.source == self.separator_index)[0])


def image_layout(tiles_w: int, tiles_h: int, cfg: TilingConfig = DEFAULT_TILING) -> ImageLayout:
    """The token layout of an image tiled ``tiles_w x tiles_h`` (see the module docstring)."""
    if tiles_w < 1 or tiles_h < 1:
        raise ValueError(f"tile grid {tiles_w} x {tiles_h} must be at least 1 x 1")
    n = cfg.tokens_per_side
    per_tile = n * n
    newline = (1 + tiles_w * tiles_h) * per_tile

    def with_newlines(rows_rc: np.ndarray) -> np.ndarray:
        column = np.full((rows_rc.shape[0], 1), newline, np.int64)
        return np.concatenate([rows_rc, column], axis=1).reshape(-1)

    global_view = with_newlines(np.arange(per_tile).reshape(n, n))
    # local grid position (R, C) -> tile 1 + (R // n) * tiles_w + C // n, token (R % n) * n + C % n
    rows, cols = np.meshgrid(np.arange(tiles_h * n), np.arange(tiles_w * n), indexing="ij")
    local = with_newlines((1 + (rows // n) * tiles_w + cols // n) * per_tile + (rows % n) * n + cols % n)
    separator = np.array([newline + 1])
    parts = [global_view, separator, local] if cfg.global_view_pos == "head" else [local, separator, global_view]
    return ImageLayout(tiles_w, tiles_h, n, np.concatenate(parts))


def image_token_count(width: int, height: int, cfg: TilingConfig = DEFAULT_TILING, *, cropping: bool = True) -> int:
    """Image tokens (features, newlines and the separator) for a ``width x height`` image:
    ``n (n + 1) + 1 + tiles_h n (tiles_w n + 1)``, 421 for a 1 x 1 grid with n = 14."""
    tiles_w, tiles_h = tile_grid(width, height, cfg, cropping=cropping)
    n = cfg.tokens_per_side
    return n * (n + 1) + 1 + tiles_h * n * (tiles_w * n + 1)


@dataclasses.dataclass(frozen=True)
class ProcessedImage:
    """One image ready for the tower: ``tiles`` float32 ``[1 + tiles_w * tiles_h, size, size, 3]``."""

    tiles: np.ndarray
    layout: ImageLayout


def process_image(image, cfg: TilingConfig = DEFAULT_TILING, *, cropping: bool = True) -> ProcessedImage:
    """Tile and normalise one image as DeepSeek-VL2's processor does.

    Both views are resized with Pillow's bicubic filter, aspect ratio kept, and centred on a mean-colour canvas
    (``ImageOps.pad``). A side that scales below half a pixel vanishes (Pillow keeps an empty image), so an
    extreme aspect ratio can leave a view all background, as in VL2.

    Args:
      image: a ``PIL.Image.Image`` in mode RGB or a ``uint8`` array ``[height, width, 3]``.
      cropping: choose the local grid among the candidates; False uses one local tile (VL2 does so when a
        conversation holds more than two images).
    """
    pil = as_pil_rgb(image)
    tiles_w, tiles_h = tile_grid(*pil.size, cfg, cropping=cropping)
    size = cfg.image_size
    views = [np.asarray(ImageOps.pad(pil, (size, size), color=cfg.pad_color))]
    local = np.asarray(ImageOps.pad(pil, (tiles_w * size, tiles_h * size), color=cfg.pad_color))
    for i in range(tiles_h):
        for j in range(tiles_w):
            views.append(local[i * size : (i + 1) * size, j * size : (j + 1) * size])
    return ProcessedImage(normalize(np.stack(views), cfg), image_layout(tiles_w, tiles_h, cfg))
