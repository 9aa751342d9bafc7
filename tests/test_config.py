"""ModelConfig validation, presets and HF config.json round trips."""

import json

import pytest

import dsjax
from dsjax.config import PRESETS, ConfigError, ModelConfig, ScoringFunc, TopkMethod
from dsjax.hf_config import config_from_hf, config_to_hf, load_config

# The released DeepSeek-V3 config.json (the fields dsjax reads), in its original layout.
V3_RELEASED = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "ep_size": 1,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-06,
    "use_cache": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}


def test_released_v3_config_reads_as_preset():
    # The release is the FP8 checkpoint: its quantization_config reads as fp8_weights (the architecture is the preset).
    assert config_from_hf(V3_RELEASED) == ModelConfig.deepseek_v3(fp8_weights=True)


def test_softmax_scale_matches_reference_values():
    # 192^-0.5 * mscale^2 with mscale = 0.1 * mscale_all_dim * ln(40) + 1 (architecture notes §3).
    assert ModelConfig.deepseek_v3().softmax_scale == pytest.approx(0.1352338, abs=1e-7)
    assert ModelConfig.deepseek_v2_lite().softmax_scale == pytest.approx(0.1147214, abs=1e-7)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_round_trip(name, tmp_path):
    cfg = PRESETS[name]()
    dsjax.hf_config.save_config(cfg, tmp_path)
    assert load_config(tmp_path) == cfg
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))) == cfg


def test_transformers_reads_our_config(tmp_path):
    from transformers import AutoConfig

    dsjax.hf_config.save_config(ModelConfig.deepseek_v3(), tmp_path)
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "deepseek_v3" and hf.n_group == 8 and hf.q_lora_rank == 1536
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 40


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(n_group=3), "n_group"),
        (dict(topk_group=5), "topk_group"),
        (dict(topk_group=1, num_experts_per_tok=3), "topk_group"),  # one kept group of 2 experts < top-3
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(q_lora_rank=0), "q_lora_rank"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(first_k_dense_replace=9), "first_k_dense_replace"),
        (dict(moe_layer_freq=2), "moe_layer_freq"),
        (dict(topk_method="top_p"), "topk_method"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(eos_token_id=1000), "eos_token_id"),
        (dict(n_group=8, topk_group=4), "n_group"),  # noaux_tc needs >= 2 experts per group
    ],
)
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.tiny(**changes)


def test_enums_accept_strings_and_configs_are_frozen():
    cfg = ModelConfig.tiny(topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1)
    assert cfg.topk_method is TopkMethod.GREEDY and cfg.scoring_func is ScoringFunc.SOFTMAX
    with pytest.raises(AttributeError):
        cfg.hidden_size = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        ModelConfig(64)  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ],
)
def test_unsupported_hf_configs(edit, message):
    with pytest.raises(ConfigError, match=message):
        config_from_hf({**V3_RELEASED, **edit})


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_configs_equal_presets(name):
    from dsjax.yaml_config import load_model_config

    assert load_model_config(f"configs/{name}.yaml") == PRESETS[name]()


def test_yaml_preset_with_overrides_and_errors(tmp_path):
    from dsjax.yaml_config import load_model_config

    (tmp_path / "a.yaml").write_text("preset: deepseek_v3\nmodel:\n  num_hidden_layers: 4\n")
    assert load_model_config(tmp_path / "a.yaml") == ModelConfig.deepseek_v3(num_hidden_layers=4)
    (tmp_path / "b.yaml").write_text("preset: tiny\nmodel:\n  hiden_size: 4\n")
    with pytest.raises(ConfigError, match="hiden_size"):
        load_model_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("preset: tiny\nmodel:\n  num_experts_per_tok: 99\n")
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        load_model_config(tmp_path / "c.yaml")
