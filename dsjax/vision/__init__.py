"""DeepSeek-VL2's vision side (arXiv 2412.10302): SigLIP tower, projector, dynamic tiling and image-token layout.

``process_image`` turns a Pillow image into a global view plus local tiles and their token layout;
``SiglipVisionTower`` encodes the tiles; ``Projector`` shuffles 2 x 2 token blocks and maps them into the language
model's width; :func:`dsjax.vision.ops.gather_image_tokens` lays the result out with the newline and
view-separator embeddings. ``load_tower`` / ``load_projector`` read HF or DeepSeek-VL2 PyTorch weights.

``VisionLanguageModel`` puts them together with the language model (image embeddings written over the
placeholder runs ``VLProcessor`` makes of ``<image>`` markers); ``load_vl`` / ``save_vl`` read and write
DeepSeek-VL2-layout checkpoints; ``vl_loss_fn`` and ``generate_greedy`` train on and continue such prompts.
"""

from dsjax.vision.chat import VLInputs, VLProcessor, generate_greedy, pad_batch
from dsjax.vision.checkpoint import load_vl, load_vl_config, save_vl
from dsjax.vision.config import ProjectorConfig, ProjectorType, TilingConfig, VisionAct, VisionConfig
from dsjax.vision.hf_map import load_projector, load_tower
from dsjax.vision.model import (
    ImageBatch,
    VisionLanguageModel,
    VLConfig,
    batch_images,
    create_vl_model,
    splice_image_embeddings,
    text_loss,
    vl_loss_fn,
)
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
    "ImageBatch",
    "ImageLayout",
    "ProcessedImage",
    "Projector",
    "ProjectorConfig",
    "ProjectorType",
    "SiglipVisionTower",
    "TilingConfig",
    "VLConfig",
    "VLInputs",
    "VLProcessor",
    "VisionAct",
    "VisionConfig",
    "VisionLanguageModel",
    "batch_images",
    "create_vl_model",
    "gather_image_tokens",
    "generate_greedy",
    "image_layout",
    "image_token_count",
    "load_projector",
    "load_tower",
    "load_vl",
    "load_vl_config",
    "pad_batch",
    "process_image",
    "save_vl",
    "select_best_resolution",
    "splice_image_embeddings",
    "text_loss",
    "tile_grid",
    "vl_loss_fn",
]
