"""Vision configuration: the SigLIP tower, DeepSeek-VL2's projector and its dynamic tiling.

``VisionConfig`` names its fields as Hugging Face's ``SiglipVisionConfig`` so a SigLIP ``config.json`` maps one to
one. ``ProjectorConfig`` follows DeepSeek-VL2's ``MlpProjectorConfig`` and ``TilingConfig`` its processor
(arXiv 2412.10302, deepseek-ai/DeepSeek-VL2 ``deepseek_vl2/models/``).
"""

from __future__ import annotations

import dataclasses
import enum

from dsjax.config import ConfigError


class VisionAct(enum.StrEnum):
    """The tower's MLP activation (HF ``hidden_act``)."""

    GELU_TANH = "gelu_pytorch_tanh"  # SigLIP, and timm's GELU(approximate="tanh") in DeepSeek-VL2
    GELU = "gelu"  # exact erf form


class ProjectorType(enum.StrEnum):
    """DeepSeek-VL2's ``projector_type`` values that dsjax implements."""

    DOWNSAMPLE_MLP_GELU = "downsample_mlp_gelu"  # VL2: r x r pixel shuffle, then the MLP
    MLP_GELU = "mlp_gelu"  # DeepSeek-VL (v1) 1.3B aligner: the MLP on every token


def _as_enum(cfg, name: str, enum_type):
    """Normalise a string field to its enum (values arrive as strings from config.json)."""
    value = getattr(cfg, name)
    try:
        object.__setattr__(cfg, name, enum_type(value))
    except ValueError:
        allowed = ", ".join(m.value for m in enum_type)
        raise ConfigError(f"{name}={value!r} is not supported (allowed: {allowed})") from None


def _positive_ints(cfg, *names: str):
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not (isinstance(value, int) and value > 0):
            raise ConfigError(f"{name}: must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """A SigLIP ViT (arXiv 2303.15343): patch embedding, learned absolute positions, pre-norm encoder, final norm.

    Field names are HF ``SiglipVisionConfig``'s. ``attention_dropout`` is accepted for config.json compatibility
    and ignored (dsjax's tower is deterministic; DeepSeek trains it without dropout). The attention-pooling head
    (``vision_use_head``) is not built: DeepSeek-VL/VL2 skip it.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int = 3
    image_size: int
    patch_size: int
    hidden_act: VisionAct = VisionAct.GELU_TANH
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0

    def __post_init__(self):
        _as_enum(self, "hidden_act", VisionAct)
        _positive_ints(
            self,
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_channels",
            "image_size",
            "patch_size",
        )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size: {self.hidden_size} is not divisible into num_attention_heads="
                f"{self.num_attention_heads} heads"
            )
        if self.image_size < self.patch_size:
            raise ConfigError(f"image_size: {self.image_size} is smaller than one patch ({self.patch_size})")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps: must be positive, got {self.layer_norm_eps!r}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError(f"attention_dropout: must lie in [0, 1), got {self.attention_dropout!r}")

    @property
    def head_dim(self) -> int:
        """Per-head width (72 for SO400M)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side at the native resolution: 27 for SO400M at 384 px (the stride-14 convolution drops
        the last 6 pixel rows and columns, in HF and timm alike)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Rows of the learned position table (``grid_size ** 2``)."""
        return self.grid_size**2

    def replace(self, **changes) -> VisionConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def siglip_so400m_384(cls, **overrides) -> VisionConfig:
        """SigLIP-SO400M/14 at 384 px, DeepSeek-VL2's tower: 1152 wide, 27 layers, 16 heads, MLP 4304
        (timm's ``int(1152 * 3.7362)``), 27 x 27 = 729 patches per tile."""
        base = dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=384,
            patch_size=14,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def siglip_large_384(cls, **overrides) -> VisionConfig:
        """SigLIP-L/16 at 384 px, DeepSeek-VL (v1)'s low-resolution tower: 24 x 24 = 576 patches."""
        base = dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=384,
            patch_size=16,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> VisionConfig:
        """A test-sized tower: 28 px images of 4 x 4 patches -> a 7 x 7 grid (odd, like SO400M's 27)."""
        base = dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=4,
        )
        return cls(**{**base, **overrides})


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProjectorConfig:
    """DeepSeek-VL2's vision-language projector (``MlpProjectorConfig``).

    ``downsample_mlp_gelu``: concatenate each ``downsample_ratio`` x ``downsample_ratio`` block of tower tokens
    (the grid zero-padded to a multiple first) into one ``input_dim * ratio**2`` vector, then
    ``Linear -> (GELU -> Linear) * (depth - 1)`` with hidden width ``n_embed * mlp_ratio`` and output ``n_embed``.
    ``mlp_gelu``: the same MLP on every token, ``Linear(input_dim, n_embed)`` first (DeepSeek-VL v1's aligner).
    GELU is the exact erf form (``nn.GELU()``).
    """

    projector_type: ProjectorType = ProjectorType.DOWNSAMPLE_MLP_GELU
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2

    def __post_init__(self):
        _as_enum(self, "projector_type", ProjectorType)
        _positive_ints(self, "input_dim", "n_embed", "depth", "mlp_ratio", "downsample_ratio")
        if self.projector_type == ProjectorType.DOWNSAMPLE_MLP_GELU and self.depth < 2:
            # VL2's constructor always appends GELU + Linear(n_embed * mlp_ratio -> n_embed) after the first one
            raise ConfigError(f"depth: downsample_mlp_gelu needs depth >= 2, got {self.depth}")
        if self.projector_type == ProjectorType.MLP_GELU and (self.downsample_ratio != 1 or self.mlp_ratio != 1):
            raise ConfigError("downsample_ratio / mlp_ratio: mlp_gelu neither downsamples nor widens; set both to 1")

    @property
    def in_features(self) -> int:
        """Width of the projector's first Linear: ``input_dim * downsample_ratio**2`` (4608 in VL2)."""
        return self.input_dim * self.downsample_ratio**2

    @property
    def widths(self) -> tuple[int, ...]:
        """Feature widths through the MLP: ``(in_features, hidden..., n_embed)``, one more than ``depth``."""
        if self.projector_type == ProjectorType.MLP_GELU:
            return (self.in_features, *(self.n_embed,) * self.depth)
        hidden = self.n_embed * self.mlp_ratio
        return (self.in_features, *(hidden,) * (self.depth - 1), self.n_embed)

    @classmethod
    def deepseek_vl2(cls, n_embed: int = 2048, **overrides) -> ProjectorConfig:
        """VL2's projector: 2 x 2 shuffle of SO400M tokens (4608 wide), Linear -> GELU -> Linear to ``n_embed``
        (1280 for VL2-Tiny, 2048 for VL2-Small, 2560 for VL2)."""
        return cls(**{**dict(input_dim=1152, n_embed=n_embed), **overrides})

    @classmethod
    def tiny(cls, **overrides) -> ProjectorConfig:
        """Matches ``VisionConfig.tiny()`` (32 wide) into a 64-wide language model."""
        return cls(**{**dict(input_dim=32, n_embed=64), **overrides})


GLOBAL_VIEW_POSITIONS = ("head", "tail")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TilingConfig:
    """DeepSeek-VL2's dynamic tiling and image-token layout (its processor and ``prepare_inputs_embeds``).

    Candidate resolutions are ``(image_size * m, image_size * n)`` for all ``m * n <= max_tiles`` (the 23 entries
    of the released configs for 9). Each image becomes one global ``image_size`` view plus ``m * n`` local tiles;
    each tile yields ``ceil((image_size // patch_size) / downsample_ratio)`` tokens per side after the projector.
    ``pad_color`` is VL2's ``tuple(int(x * 255) for x in image_mean)``: (127, 127, 127) for mean 0.5.
    """

    image_size: int = 384
    patch_size: int = 14
    downsample_ratio: int = 2
    max_tiles: int = 9
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    global_view_pos: str = "head"

    def __post_init__(self):
        _positive_ints(self, "image_size", "patch_size", "downsample_ratio", "max_tiles")
        if self.image_size < self.patch_size:
            raise ConfigError(f"image_size: {self.image_size} is smaller than one patch ({self.patch_size})")
        for name in ("image_mean", "image_std"):
            value = tuple(getattr(self, name))
            if len(value) != 3 or not all(isinstance(v, int | float) for v in value):
                raise ConfigError(f"{name}: expected three floats (R, G, B), got {value!r}")
            object.__setattr__(self, name, value)
        if not all(0.0 <= m <= 1.0 for m in self.image_mean):
            raise ConfigError(f"image_mean: values must lie in [0, 1], got {self.image_mean}")
        if not all(s > 0 for s in self.image_std):
            raise ConfigError(f"image_std: values must be positive, got {self.image_std}")
        if self.global_view_pos not in GLOBAL_VIEW_POSITIONS:
            raise ConfigError(f"global_view_pos={self.global_view_pos!r}; choose one of {GLOBAL_VIEW_POSITIONS}")

    @property
    def tokens_per_side(self) -> int:
        """Tokens per tile side after the projector: ``ceil(27 / 2) = 14`` for VL2."""
        return -(-(self.image_size // self.patch_size) // self.downsample_ratio)

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """RGB of the padding around resized images (VL2's ``int(mean * 255)``)."""
        return tuple(int(m * 255) for m in self.image_mean)

    @property
    def candidate_resolutions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` candidates in the released configs' order: by tile count, then per count the
        factor pairs by their smaller side, the tall one (fewer tiles across) before the wide one. The order
        matters: :func:`dsjax.vision.processing.select_best_resolution` keeps the first of exact ties."""
        out = []
        for area in range(1, self.max_tiles + 1):
            for small in range(1, area + 1):
                big, rem = divmod(area, small)
                if rem or small > big:
                    continue
                out.append((small, big))
                if small != big:
                    out.append((big, small))
        return tuple((self.image_size * m, self.image_size * n) for m, n in out)
