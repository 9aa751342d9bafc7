"""DeepSeek-VL2's vision side (arXiv 2412.10302): SigLIP tower, projector, dynamic tiling and image-token layout.

``process_image`` turns a Pillow image into a global view plus local tiles and their token layout;
``SiglipVisionTower`` encodes the tiles; ``Projector`` shuffles 2 x 2 token blocks and maps them into the language
model's width; :func:`dsjax.vision.ops.gather_image_tokens` lays the result out with the newline and
view-separator embeddings. ``load_tower`` / ``load_projector`` read HF or DeepSeek-VL2 PyTorch weights.
"""

from dsjax.vision.config import ProjectorConfig, ProjectorType, TilingConfig, VisionAct, VisionConfig
from dsjax.vision.hf_map import load_projector, load_tower
from dsjax.vision.ops import gather_image_tokens
from dsjax.vision.processing import (
    ImageLayout,
    ProcessedImage,
    image_layout,
    image_token_count,
    process_image,
    select_best_resolution,
    tile_grid,
)
from dsjax.vision.tower import Projector, SiglipVisionTower

__all__ = [
    "ImageLayout",
    "ProcessedImage",
    "Projector",
    "ProjectorConfig",
    "ProjectorType",
    "SiglipVisionTower",
    "TilingConfig",
    "VisionAct",
    "VisionConfig",
    "gather_image_tokens",
    "image_layout",
    "image_token_count",
    "load_projector",
    "load_tower",
    "process_image",
    "select_best_resolution",
    "tile_grid",
]
