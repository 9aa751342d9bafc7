"""Logit parity with HF transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM in float32."""

import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import CASES, hf_logits, make_hf_model, save_hf

import dsjax

REL_TOL = 1e-4  # max |ours - ref| / max |ref|, fixed by the issue


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(case, tmp_path):
    hf = make_hf_model(case)
    path = save_hf(hf, tmp_path / case)
    model = dsjax.from_pretrained(path, dtype=jnp.float32)
    tokens = np.random.default_rng(1).integers(0, hf.config.vocab_size, size=(3, 21))
    ref = hf_logits(hf, tokens).numpy()
    for dispatch, attention in (("ragged", "naive"), ("dense", "absorbed"), ("blocked", "naive")):
        err = rel_err(model(tokens, dispatch=dispatch, attention=attention), ref)
        assert err <= REL_TOL, f"{case} {dispatch}/{attention}: relative error {err:.2e}"


def test_hf_loads_what_we_save(tmp_path):
    """save_pretrained output is a valid HF checkpoint: transformers loads it and computes the same logits."""
    from transformers import AutoModelForCausalLM

    model = dsjax.create_model(dsjax.ModelConfig.tiny(num_nextn_predict_layers=0, initializer_range=0.1), seed=3)
    dsjax.save_pretrained(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="float32").eval()
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 17))
    assert rel_err(model(tokens), hf_logits(hf, tokens).numpy()) <= REL_TOL


@pytest.mark.parametrize("case", ["v3_qlora_yarn", "v2_greedy_yarn"])
def test_greedy_generation_matches_hf_generate(case, tmp_path):
    """Cached greedy decoding (absorbed attention over the latent cache) gives HF generate's tokens."""
    import torch

    hf = make_hf_model(case)
    model = dsjax.from_pretrained(save_hf(hf, tmp_path / case), dtype=jnp.float32)
    prompts = np.random.default_rng(2).integers(2, hf.config.vocab_size, size=(3, 11))
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                          max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)  # fmt: skip
    ours = dsjax.generate(model, prompts.tolist(), max_new_tokens=16, stop_tokens=())
    assert ours == ref[:, prompts.shape[1] :].tolist()
