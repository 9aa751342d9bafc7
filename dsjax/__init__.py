"""dsjax: DeepSeek-V2/V3 in JAX/Flax NNX."""

from dsjax.checkpoint.hf import from_pretrained, save_pretrained
from dsjax.checkpoint.safetensors_io import CheckpointError
from dsjax.coder.infill import infill
from dsjax.config import ConfigError, ModelConfig, Numerics, ScoringFunc, TopkMethod, YarnScaling
from dsjax.infer import generate, generate_text, stream
from dsjax.model import ModelOutput, Transformer, abstract_model, count_params, create_model

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "ModelOutput",
    "Numerics",
    "ScoringFunc",
    "TopkMethod",
    "Transformer",
    "YarnScaling",
    "abstract_model",
    "count_params",
    "create_model",
    "from_pretrained",
    "generate",
    "generate_text",
    "infill",
    "save_pretrained",
    "stream",
]
