"""DeepSeek-VL2's vision side (arXiv 2412.10302): SigLIP tower, projector, dynamic tiling and image-token layout.

``process_image`` turns a Pillow image into a global view plus local tiles and their token layout;
``SiglipVisionTower`` encodes the tiles; ``Projector`` shuffles 2 x 2 token blocks and maps them into the language
model's width; :func:`dsjax.vision.ops.gather_image_tokens` lays the result out with the newline and
view-separator embeddings. ``load_tower`` / ``load_projector`` read HF or DeepSeek-VL2 PyTorch weights.

``VisionLanguageModel`` puts them together with the language model (image embeddings written over the
placeholder runs ``VLProcessor`` makes of ``<image>`` markers); ``load_vl`` / ``save_vl`` read and write
DeepSeek-VL2-layout checkpoints. ``render_vl_chat`` is VL2's conversation format; :func:`dsjax.infer.generate`
takes a ``VisionLanguageModel`` and ``images`` (the prefill runs on the image-spliced embeddings);
:mod:`dsjax.vision.train` trains on such prompts (loss on the answer text, optional freezing, routing-bias
balancing) and :mod:`dsjax.vision.job` is the small synthetic-shapes job of ``scripts/vl.py``.
"""

from dsjax.vision.chat import (
    VLInputs,
    VLProcessor,
    encode_vl_chat,
    generate_greedy,
    pad_batch,
    prefill_embeddings,
    render_vl_chat,
)
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
    "encode_vl_chat",
    "gather_image_tokens",
    "generate_greedy",
    "image_layout",
    "image_token_count",
    "load_projector",
    "load_tower",
    "load_vl",
    "load_vl_config",
    "pad_batch",
    "prefill_embeddings",
    "process_image",
    "render_vl_chat",
    "save_vl",
    "select_best_resolution",
    "splice_image_embeddings",
    "text_loss",
    "tile_grid",
    "vl_loss_fn",
]
