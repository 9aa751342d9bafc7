"""Read and write Hugging Face ``config.json`` for DeepSeek-V2/V3 (``model_type`` deepseek_v2 / deepseek_v3).

Accepts both the released checkpoints' layout (``rope_scaling`` + ``rope_theta`` at top level) and transformers
v5's ``rope_parameters``; writes the released layout, which transformers still reads.
"""

from __future__ import annotations

import json
import os
from typing import Any

from dsjax.config import ConfigError, ModelConfig, ScoringFunc, TopkMethod, YarnScaling

_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
_ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, YarnScaling | None]:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = float(d.get("rope_theta") or params.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "yarn":
        raise ConfigError(f"rope_scaling: type {rope_type!r} is not supported (DeepSeek uses 'yarn')")
    if params.get("truncate", True) is not True:
        raise ConfigError("rope_scaling.truncate=false is not supported")
    original = params.get("original_max_position_embeddings")
    if original is None:
        raise ConfigError("rope_scaling: yarn needs original_max_position_embeddings")
    factor = params.get("factor") or d["max_position_embeddings"] / original
    yarn = YarnScaling(
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params.get("mscale") or 0.0) or 1.0,
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
    )
    explicit = params.get("attention_factor")
    if explicit is not None and abs(explicit - yarn.attention_factor) > 1e-12:
        raise ConfigError("rope_scaling.attention_factor differing from the mscale-derived value is not supported")
    return theta, yarn


FP8_QUANTIZATION = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


def _fp8_weights_from_hf(d: dict[str, Any]) -> bool:
    """True for DeepSeek's FP8 ``quantization_config`` (E4M3 weights, 128x128 block scales); other
    quantisation schemes are rejected rather than misread."""
    q = d.get("quantization_config")
    if not q:
        return False
    if q.get("quant_method") != "fp8":
        raise ConfigError(f"quantization_config.quant_method={q.get('quant_method')!r}: only 'fp8' is supported")
    if q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"quantization_config.fmt={q.get('fmt')!r}: only 'e4m3' is supported")
    if list(q.get("weight_block_size") or [128, 128]) != [128, 128]:
        raise ConfigError(
            f"quantization_config.weight_block_size={q.get('weight_block_size')!r}: only [128, 128] is supported"
        )
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError(
            f"quantization_config.activation_scheme={q.get('activation_scheme')!r}: only 'dynamic' is supported"
        )
    return True


def config_from_hf(d: dict[str, Any], **overrides) -> ModelConfig:
    """Build a :class:`ModelConfig` from a parsed ``config.json`` dict; unsupported settings raise ConfigError."""
    model_type = d.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ConfigError(f"model_type: {model_type!r} is not a DeepSeek-V2/V3 config ({', '.join(_MODEL_TYPES)})")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act: only 'silu' is supported, got {d['hidden_act']!r}")
    for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if d.get(flag):
            raise ConfigError(f"{flag}: true is not supported (DeepSeek models have none)")
    is_v3 = model_type == "deepseek_v3"
    theta, yarn = _rope_from_hf(d)
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    q_lora = d.get("q_lora_rank")
    kwargs = dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        moe_intermediate_size=d["moe_intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        q_lora_rank=q_lora or None,  # the official code writes 0 for "no query compression"
        kv_lora_rank=d["kv_lora_rank"],
        qk_nope_head_dim=d["qk_nope_head_dim"],
        qk_rope_head_dim=d["qk_rope_head_dim"],
        v_head_dim=d["v_head_dim"],
        n_routed_experts=d["n_routed_experts"],
        n_shared_experts=d.get("n_shared_experts") or 0,
        num_experts_per_tok=d["num_experts_per_tok"],
        n_group=d.get("n_group") or 1,
        topk_group=d.get("topk_group") or 1,
        topk_method=d.get("topk_method") or (TopkMethod.NOAUX_TC if is_v3 else TopkMethod.GREEDY),
        scoring_func=d.get("scoring_func") or (ScoringFunc.SIGMOID if is_v3 else ScoringFunc.SOFTMAX),
        norm_topk_prob=bool(d.get("norm_topk_prob", is_v3)),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        first_k_dense_replace=d.get("first_k_dense_replace") or 0,
        moe_layer_freq=d.get("moe_layer_freq") or 1,
        num_nextn_predict_layers=d.get("num_nextn_predict_layers") or 0,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=d["max_position_embeddings"],
        rope_scaling=yarn,
        initializer_range=float(d.get("initializer_range", 0.02)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        aux_loss_alpha=float(d.get("aux_loss_alpha") or 0.0),
        seq_aux=bool(d.get("seq_aux", True)),
        fp8_weights=_fp8_weights_from_hf(d),
    )
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers") if kwargs[k] is None]
    if missing:
        raise ConfigError(f"config.json lacks required fields: {missing}")
    return ModelConfig(**{**kwargs, **overrides})


def config_to_hf(cfg: ModelConfig, *, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """The ``config.json`` dict for ``cfg``; ``config_from_hf(config_to_hf(cfg)) == cfg`` (numerics and the
    ``fp8`` compute recipe aside; ``fp8_weights`` is written as DeepSeek's ``quantization_config``)."""
    model_type = "deepseek_v3" if cfg.topk_method == TopkMethod.NOAUX_TC else "deepseek_v2"
    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "topk_method": cfg.topk_method.value,
        "scoring_func": cfg.scoring_func.value,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "moe_layer_freq": cfg.moe_layer_freq,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "aux_loss_alpha": cfg.aux_loss_alpha,
        "seq_aux": cfg.seq_aux,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "rope_interleave": True,
        "torch_dtype": torch_dtype,
    }
    if cfg.rope_scaling is not None:
        y = cfg.rope_scaling
        out["rope_scaling"] = {
            "type": "yarn",
            "factor": y.factor,
            "original_max_position_embeddings": y.original_max_position_embeddings,
            "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow,
            "mscale": y.mscale,
            "mscale_all_dim": y.mscale_all_dim,
        }
    if cfg.fp8_weights:
        out["quantization_config"] = dict(FP8_QUANTIZATION)
    return out


def read_config_json(path: str | os.PathLike) -> dict:
    """The dict in ``config.json`` of a checkpoint directory (or at a file path); clear errors if absent or bad."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {file}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None


def load_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """Read ``config.json`` from a checkpoint directory (or a file path)."""
    return config_from_hf(read_config_json(path), **overrides)


def save_config(cfg: ModelConfig, path: str | os.PathLike, **kwargs) -> None:
    """Write ``config.json`` into directory ``path``."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, **kwargs), f, indent=2, sort_keys=True)
