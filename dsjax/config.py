"""Model configuration: one frozen, validated dataclass for DeepSeek-V2/V3 models.

Field names follow Hugging Face's ``config.json`` for DeepSeek-V2/V3 so that a reader of either can map them
one to one (arXiv 2405.04434 for V2, 2412.19437 for V3). Presets build the released architectures; ``tiny()``
and ``tiny_v2()`` build test-sized models. ``dsjax.hf_config`` reads and writes ``config.json``.
"""

from __future__ import annotations

import dataclasses
import enum
import math


class ConfigError(ValueError):
    """A configuration value is invalid or unsupported; the message names the field."""


class TopkMethod(enum.StrEnum):
    """How routed experts are chosen (HF ``topk_method``)."""

    GREEDY = "greedy"  # plain top-k over all experts (V2-Lite)
    GROUP_LIMITED_GREEDY = "group_limited_greedy"  # keep the topk_group groups with the largest max score (V2)
    NOAUX_TC = "noaux_tc"  # V3: bias-corrected selection, groups ranked by the sum of their top-2 scores


class ScoringFunc(enum.StrEnum):
    """Router affinity function (HF ``scoring_func``)."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class Numerics(enum.StrEnum):
    """Which reference the small numerical choices follow where HF transformers and DeepSeek's code differ.

    ``HF``: router GEMM and scoring in fp32, top-k weight normalisation adds 1e-20, RMSNorm casts to the input
    dtype before the weight multiply, routed-expert outputs accumulated in fp32.
    ``OFFICIAL`` (deepseek-ai/DeepSeek-V3 ``inference/model.py``): router GEMM and scoring in bf16 (the correction
    bias is added in fp32), no epsilon in the normalisation, RMSNorm multiplies by the weight in fp32, routed
    outputs accumulated in the compute dtype. In float32 compute only the router precision differs visibly.
    """

    HF = "hf"
    OFFICIAL = "official"


@dataclasses.dataclass(frozen=True, kw_only=True)
class YarnScaling:
    """YaRN RoPE scaling (arXiv 2309.00071; V3 §4.3): frequency correction plus the mscale² softmax factor."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self):
        if not self.factor >= 1.0:
            raise ConfigError(f"rope_scaling.factor must be >= 1, got {self.factor}")
        if self.original_max_position_embeddings <= 0:
            raise ConfigError("rope_scaling.original_max_position_embeddings must be positive")
        if not self.beta_fast > self.beta_slow > 0:
            raise ConfigError(
                f"rope_scaling needs beta_fast > beta_slow > 0, got {self.beta_fast} and {self.beta_slow}"
            )

    @property
    def attention_factor(self) -> float:
        """Multiplier on cos/sin (HF): mscale(s, mscale) / mscale(s, mscale_all_dim); 1.0 for released models."""
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)


FP8_BACKENDS = ("reference", "blocked", "pallas", "auto")
WGRAD_DTYPES = ("float32", "compute")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp8Recipe:
    """DeepSeek-V3's fine-grained FP8 GEMM recipe (§3.3), used by :mod:`dsjax.ops.fp8`.

    Activations and their gradients are quantised to E4M3 in ``1 x block`` tiles, weights in ``block x block``
    blocks, each with its own online scale ``max(amax, amax_floor) / 448``; products are accumulated in fp32
    one ``block``-long slice of the contraction at a time, the scales applied at each promotion.

    ``routed_experts``: the routed experts' GEMMs in FP8 too (DeepSeek's recipe); False keeps them in the compute
    dtype (the kernels of the bf16 path, e.g. megablox on TPU) with every other FP8 GEMM as it is.
    ``backend``: ``blocked`` splits the contraction into ``block``-long fp8 x fp8 -> fp32 dots (the structure of
    DeepSeek's kernels, the default); ``reference`` dequantises both operands and does one fp32 dot (the oracle);
    ``pallas`` runs the GEMMs as Pallas TPU kernels with ``blocked``'s numerics (the dense ones always, the
    routed experts' grouped ones where each device has its own rows, as under expert parallelism; interpreted
    off TPU; ``block`` must be 128), ``auto`` picks ``pallas`` when compiling for TPU, on GPU the Mosaic-GPU FP8
    kernels of :mod:`dsjax.ops.fp8_gpu` (``blocked``'s numerics: E4M3 ``wgmma``, promoted every 128 of the
    contraction; dense GEMMs per device, the routed experts' grouped ones inside expert parallelism; widths off
    the 128-wide tiles zero-padded), and ``blocked`` elsewhere.
    ``wgrad_dtype``: the weight gradients as the GEMMs give them, and as they are summed over devices:
    ``float32`` (DeepSeek's recipe) or ``compute`` (the compute dtype, e.g. bf16, as the bf16 step's dot
    gives them: half the bytes in the reductions and the scanned layers' gradient buffers; the partial
    products are still accumulated in fp32 on each device). The master weights' gradients are in their dtype
    either way.
    ``quantized_dispatch``: the routed experts' input rows quantised before they are sorted and exchanged by
    expert (DeepSeek-V3 dispatches in FP8): their E4M3 values and scales move, half the bytes of bf16 rows, and
    the GEMMs take them as they are. The same numbers as quantising the moved rows (the ``1 x block`` tiles lie
    within a row); False moves the rows in the compute dtype. It applies where the experts run as grouped GEMMs
    (the ``ragged`` and ``ep`` dispatches), not to the per-block ``blocked`` dispatch of CPU.
    ``pow2_scales`` rounds every scale up to a power of two (DeepSeek-V3.1's UE8M0 scales), which makes the
    1x128 -> 128x1 re-tiling in the backward pass nearly lossless.
    ``amax_floor`` (1e-4, from DeepSeek's activation-quantisation kernel) applies to activations and weights;
    gradients use ``grad_amax_floor``, which only guards all-zero tiles: backward values are far smaller (on the
    tiny training config 76% of the output-gradient rows have amax < 1e-4), and a 1e-4 floor would squeeze them
    into E4M3's few subnormal codes -- the per-tile online scale exists to make loss scaling unnecessary.
    """

    backend: str = "blocked"
    block: int = 128
    pow2_scales: bool = False
    amax_floor: float = 1e-4
    grad_amax_floor: float = 1e-30
    routed_experts: bool = True
    wgrad_dtype: str = "float32"
    quantized_dispatch: bool = True

    def __post_init__(self):
        if self.backend not in FP8_BACKENDS:
            raise ConfigError(f"fp8.backend={self.backend!r}; choose one of {FP8_BACKENDS}")
        if not (isinstance(self.block, int) and self.block > 0):
            raise ConfigError(f"fp8.block must be a positive int, got {self.block!r}")
        if self.backend == "pallas" and self.block != 128:
            raise ConfigError(f"fp8.backend='pallas' needs fp8.block=128 (the TPU's lanes), got {self.block}")
        if self.wgrad_dtype not in WGRAD_DTYPES:
            raise ConfigError(f"fp8.wgrad_dtype={self.wgrad_dtype!r}; choose one of {WGRAD_DTYPES}")
        for name in ("routed_experts", "quantized_dispatch"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"fp8.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("amax_floor", "grad_amax_floor"):
            value = getattr(self, name)
            # scale = floor / 448 must stay a normal fp32 number
            if isinstance(value, bool) or not (isinstance(value, int | float) and 448 * 2.0**-126 <= value < 1e38):
                raise ConfigError(f"fp8.{name} must be a float in [5.3e-36, inf), got {value!r}")


def _as_recipe(value) -> Fp8Recipe | None:
    """``fp8`` as YAML / code may give it: None/False (off), True (defaults), a mapping, or a recipe."""
    if value is None or value is False:
        return None
    if value is True:
        return Fp8Recipe()
    if isinstance(value, dict):
        unknown = set(value) - {f.name for f in dataclasses.fields(Fp8Recipe)}
        if unknown:
            raise ConfigError(f"fp8: unknown fields {sorted(unknown)}")
        return Fp8Recipe(**value)
    if isinstance(value, Fp8Recipe):
        return value
    raise ConfigError(f"fp8: expected a bool, a mapping or an Fp8Recipe, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a DeepSeek-V2/V3 causal language model.

    Symbols (V3 paper): d = hidden_size, n_h = num_attention_heads, d_c = kv_lora_rank, d'_c = q_lora_rank,
    d_h = qk_nope_head_dim, d_h^R = qk_rope_head_dim, N_s = n_shared_experts, N_r = n_routed_experts,
    K_r = num_experts_per_tok, D = num_nextn_predict_layers (MTP depth).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int = 1
    topk_group: int = 1
    topk_method: TopkMethod = TopkMethod.GREEDY
    scoring_func: ScoringFunc = ScoringFunc.SOFTMAX
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    rope_scaling: YarnScaling | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    aux_loss_alpha: float = 0.0
    seq_aux: bool = True
    numerics: Numerics = Numerics.HF
    # Compute: run the MLA projections, dense MLPs and experts as fine-grained FP8 GEMMs (training and inference).
    fp8: Fp8Recipe | None = None
    # Storage: those weights are held as E4M3 with fp32 128x128 block scales (HF ``quantization_config``).
    fp8_weights: bool = False
    # Expert parallelism (dispatch "ep"): None = dropless (receive buffers sized for the worst case, expert-shards
    # times the routed volume); a float c = each device receives at most c x its balanced share of (token,
    # expert) slots, later routing choices dropped first (see dsjax.ops.ep). MaxText trains V3 at c = 1.0.
    moe_capacity_factor: float | None = None
    # How tokens travel: "ragged" (ragged_all_to_all: only occupied rows, emulated on CPU), "all_to_all" (fixed
    # per-destination buckets) or "auto" (ragged on TPU/GPU or with a capacity factor, else all_to_all).
    moe_exchange: str = "auto"

    def __post_init__(self):
        # Enums may arrive as strings from YAML / config.json; normalise so comparisons are exact.
        for name, enum_type in (("topk_method", TopkMethod), ("scoring_func", ScoringFunc), ("numerics", Numerics)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum_type(value))
            except ValueError:
                allowed = ", ".join(m.value for m in enum_type)
                raise ConfigError(f"{name}={value!r} is not supported (allowed: {allowed})") from None
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", YarnScaling(**self.rope_scaling))
        object.__setattr__(self, "fp8", _as_recipe(self.fp8))
        self._validate()

    def _validate(self):
        def need(cond: bool, field: str, msg: str):
            if not cond:
                raise ConfigError(f"{field}: {msg}")

        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
            "max_position_embeddings",
        ):
            value = getattr(self, field)
            need(isinstance(value, int) and value > 0, field, f"must be a positive int, got {value!r}")
        need(
            self.q_lora_rank is None or self.q_lora_rank > 0,
            "q_lora_rank",
            f"must be None (no query compression) or a positive int, got {self.q_lora_rank!r}",
        )
        need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
        need(
            self.qk_rope_head_dim % 2 == 0,
            "qk_rope_head_dim",
            f"RoPE rotates pairs of dimensions, so it must be even (got {self.qk_rope_head_dim})",
        )
        need(
            self.num_experts_per_tok <= self.n_routed_experts,
            "num_experts_per_tok",
            f"top-k ({self.num_experts_per_tok}) exceeds n_routed_experts ({self.n_routed_experts})",
        )
        need(
            self.n_routed_experts % self.n_group == 0,
            "n_group",
            f"n_routed_experts ({self.n_routed_experts}) is not divisible into {self.n_group} groups",
        )
        need(
            self.topk_group <= self.n_group,
            "topk_group",
            f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})",
        )
        if self.topk_method != TopkMethod.GREEDY:
            kept = self.topk_group * (self.n_routed_experts // self.n_group)
            need(
                self.num_experts_per_tok <= kept,
                "topk_group",
                f"the {self.topk_group} kept groups hold {kept} experts, fewer than "
                f"num_experts_per_tok={self.num_experts_per_tok}",
            )
        if self.topk_method == TopkMethod.NOAUX_TC:
            need(
                self.n_routed_experts // self.n_group >= 2,
                "n_group",
                "noaux_tc ranks groups by the sum of their top-2 scores, so each group needs >= 2 experts",
            )
        need(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            "first_k_dense_replace",
            f"must lie in [0, num_hidden_layers={self.num_hidden_layers}]",
        )
        need(
            self.moe_layer_freq == 1,
            "moe_layer_freq",
            f"only 1 is supported (every layer after the dense ones is MoE, as in all released "
            f"DeepSeek-V2/V3 models); got {self.moe_layer_freq}",
        )
        need(isinstance(self.fp8_weights, bool), "fp8_weights", f"must be a bool, got {self.fp8_weights!r}")
        need(
            not (self.fp8_weights and self.fp8 is not None and self.fp8.block != 128),
            "fp8.block",
            f"fp8_weights are stored in 128x128 blocks; FP8 compute on them needs block 128, "
            f"got {getattr(self.fp8, 'block', None)}",
        )
        need(
            self.moe_capacity_factor is None
            or (isinstance(self.moe_capacity_factor, int | float) and 0 < self.moe_capacity_factor < float("inf")),
            "moe_capacity_factor",
            f"must be None (dropless) or a positive number, got {self.moe_capacity_factor!r}",
        )
        need(
            self.moe_exchange in ("auto", "ragged", "all_to_all"),
            "moe_exchange",
            f"must be auto, ragged or all_to_all, got {self.moe_exchange!r}",
        )
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be positive")
        for tok in ("bos_token_id", "eos_token_id"):
            value = getattr(self, tok)
            need(value is None or 0 <= value < self.vocab_size, tok, f"{value} is outside [0, vocab_size)")

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: the no-position part plus the decoupled RoPE part (192 for V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def shared_intermediate_size(self) -> int:
        """The shared experts run as one fused MLP of this width."""
        return self.n_shared_experts * self.moe_intermediate_size

    @property
    def has_routing_bias(self) -> bool:
        """V3's auxiliary-loss-free balancing keeps a per-expert bias used for selection only."""
        return self.topk_method == TopkMethod.NOAUX_TC

    @property
    def softmax_scale(self) -> float:
        """Attention logit scale: qk_head_dim^-0.5, times YaRN's mscale(factor, mscale_all_dim)² when scaled."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ---- presets -------------------------------------------------------------------------------------------
    @classmethod
    def deepseek_v3(cls, **overrides) -> ModelConfig:
        """DeepSeek-V3 / R1, 671B total (37B active), with one MTP module."""
        base = dict(
            vocab_size=129280,
            hidden_size=7168,
            intermediate_size=18432,
            moe_intermediate_size=2048,
            num_hidden_layers=61,
            num_attention_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            n_routed_experts=256,
            n_shared_experts=1,
            num_experts_per_tok=8,
            n_group=8,
            topk_group=4,
            topk_method=TopkMethod.NOAUX_TC,
            scoring_func=ScoringFunc.SIGMOID,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            first_k_dense_replace=3,
            num_nextn_predict_layers=1,
            max_position_embeddings=163840,
            bos_token_id=0,
            eos_token_id=1,
            rope_scaling=YarnScaling(
                factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0
            ),
        )
        return cls(**{**base, **overrides})

    @classmethod
    def deepseek_v2(cls, **overrides) -> ModelConfig:
        """DeepSeek-V2, 236B total (21B active)."""
        base = dict(
            vocab_size=102400,
            hidden_size=5120,
            intermediate_size=12288,
            moe_intermediate_size=1536,
            num_hidden_layers=60,
            num_attention_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            n_routed_experts=160,
            n_shared_experts=2,
            num_experts_per_tok=6,
            n_group=8,
            topk_group=3,
            topk_method=TopkMethod.GROUP_LIMITED_GREEDY,
            scoring_func=ScoringFunc.SOFTMAX,
            routed_scaling_factor=16.0,
            first_k_dense_replace=1,
            max_position_embeddings=163840,
            bos_token_id=100000,
            eos_token_id=100001,
            aux_loss_alpha=0.003,
            rope_scaling=YarnScaling(
                factor=40.0, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707
            ),
        )
        return cls(**{**base, **overrides})

    @classmethod
    def deepseek_v2_lite(cls, **overrides) -> ModelConfig:
        """DeepSeek-V2-Lite, 15.7B total (2.4B active), no query compression."""
        base = dict(
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            num_hidden_layers=27,
            num_attention_heads=16,
            q_lora_rank=None,
            kv_lora_rank=512,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            n_group=1,
            topk_group=1,
            topk_method=TopkMethod.GREEDY,
            scoring_func=ScoringFunc.SOFTMAX,
            routed_scaling_factor=1.0,
            first_k_dense_replace=1,
            max_position_embeddings=163840,
            bos_token_id=100000,
            eos_token_id=100001,
            aux_loss_alpha=0.001,
            rope_scaling=YarnScaling(
                factor=40.0, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707
            ),
        )
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> ModelConfig:
        """A test-sized V3-architecture model: MLA with query compression, sigmoid noaux_tc routing, MTP."""
        base = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            topk_method=TopkMethod.NOAUX_TC,
            scoring_func=ScoringFunc.SIGMOID,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            num_nextn_predict_layers=1,
            max_position_embeddings=512,
            bos_token_id=0,
            eos_token_id=1,
            rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=128, mscale=1.0, mscale_all_dim=1.0),
        )
        return cls(**{**base, **overrides})

    @classmethod
    def tiny_v2(cls, **overrides) -> ModelConfig:
        """A test-sized V2-Lite-architecture model: no query compression, softmax greedy routing."""
        v2 = dict(
            q_lora_rank=None,
            n_shared_experts=2,
            n_group=1,
            topk_group=1,
            topk_method=TopkMethod.GREEDY,
            scoring_func=ScoringFunc.SOFTMAX,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            num_nextn_predict_layers=0,
            rope_scaling=None,
        )
        return cls.tiny(**{**v2, **overrides})


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1 * mscale * ln(factor) + 1 (1 when not scaled)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


PRESETS = {
    "deepseek_v3": ModelConfig.deepseek_v3,
    "deepseek_v2": ModelConfig.deepseek_v2,
    "deepseek_v2_lite": ModelConfig.deepseek_v2_lite,
    "tiny": ModelConfig.tiny,
    "tiny_v2": ModelConfig.tiny_v2,
}
