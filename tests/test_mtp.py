"""MTP modules in the released DeepSeek-V3 layout, checked against a torch reference built from HF modules."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import make_hf_model, save_hf
from test_parity_hf import REL_TOL, rel_err
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

import dsjax
from dsjax.checkpoint.safetensors_io import CheckpointReader, write_safetensors

MAIN_LAYERS = 3


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    """An HF checkpoint with one MTP layer (model.layers.3.*) and the torch modules to recompute it.

    HF transformers drops MTP weights, so the reference runs HF's own decoder layer 3 (built as a fourth layer
    of a 4-layer model) behind torch norms and ``eh_proj``, following V3 §2.2 and the released layout.
    """
    hf_ext = make_hf_model("v3_qlora_yarn", num_hidden_layers=MAIN_LAYERS + 1)
    src = tmp_path_factory.mktemp("ext")
    save_hf(hf_ext, src)
    tensors = {k: np.array(CheckpointReader(src).get(k)) for k in CheckpointReader(src).keys()}
    gen = torch.Generator().manual_seed(7)
    d = hf_ext.config.hidden_size
    extra = {
        "enorm.weight": 1 + 0.2 * torch.randn(d, generator=gen),
        "hnorm.weight": 1 + 0.2 * torch.randn(d, generator=gen),
        "shared_head.norm.weight": 1 + 0.2 * torch.randn(d, generator=gen),
        "eh_proj.weight": 0.1 * torch.randn(d, 2 * d, generator=gen),
    }
    prefix = f"model.layers.{MAIN_LAYERS}."
    tensors.update({prefix + k: v.numpy() for k, v in extra.items()})
    tensors[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    tensors[prefix + "shared_head.head.weight"] = tensors["lm_head.weight"]
    dst = tmp_path_factory.mktemp("mtp")
    write_safetensors(dst / "model.safetensors", tensors)
    config = json.loads((src / "config.json").read_text())
    config.update(num_hidden_layers=MAIN_LAYERS, num_nextn_predict_layers=1)
    (dst / "config.json").write_text(json.dumps(config))

    norms = {}
    for k in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        norms[k] = DeepseekV3RMSNorm(d, eps=hf_ext.config.rms_norm_eps)
        norms[k].weight.data.copy_(extra[k])
    return dst, hf_ext, norms, extra["eh_proj.weight"]


def reference_mtp_logits(hf_ext, norms, eh_proj, tokens):
    """h' = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)]) -> layer 3 -> shared_head.norm -> lm_head."""
    hf_ext.config.num_hidden_layers = MAIN_LAYERS  # run only the main stack for h
    try:
        with torch.no_grad():
            tok = torch.as_tensor(tokens, dtype=torch.long)
            out = hf_ext.model(tok)
            main_logits = hf_ext.lm_head(out.last_hidden_state)
            shifted = torch.roll(tok, -1, dims=1)
            shifted[:, -1] = 0
            emb = hf_ext.model.embed_tokens(shifted)
            x = torch.cat([norms["enorm.weight"](emb), norms["hnorm.weight"](out.last_hidden_state)], -1) @ eh_proj.T
            t = tok.shape[1]
            pos = torch.arange(t)[None]
            mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
            x = hf_ext.model.layers[MAIN_LAYERS](
                x, attention_mask=mask, position_ids=pos, position_embeddings=hf_ext.model.rotary_emb(x, pos)
            )
            return main_logits.numpy(), hf_ext.lm_head(norms["shared_head.norm.weight"](x)).numpy()
    finally:
        hf_ext.config.num_hidden_layers = MAIN_LAYERS + 1


def test_mtp_logits_match_reference(mtp_checkpoint):
    path, hf_ext, norms, eh_proj = mtp_checkpoint
    model = dsjax.from_pretrained(path, dtype=jnp.float32)
    assert model.config.num_nextn_predict_layers == 1
    tokens = np.random.default_rng(2).integers(0, hf_ext.config.vocab_size, size=(2, 19))
    logits, mtp_logits = model(tokens, return_mtp=True)
    ref_main, ref_mtp = reference_mtp_logits(hf_ext, norms, eh_proj, tokens)
    assert mtp_logits.shape == (1, *logits.shape)
    assert rel_err(logits, ref_main) <= REL_TOL
    assert rel_err(mtp_logits[0], ref_mtp) <= REL_TOL


def test_mtp_optional_on_load(mtp_checkpoint):
    path, *_ = mtp_checkpoint
    plain = dsjax.from_pretrained(path, dtype=jnp.float32, mtp=False)
    assert plain.mtp is None and plain.config.num_nextn_predict_layers == 0
    with pytest.raises(ValueError, match="no MTP modules"):
        plain(np.zeros((1, 4), np.int32), return_mtp=True)


def test_mtp_round_trip_and_missing_detection(mtp_checkpoint, tmp_path):
    path, *_ = mtp_checkpoint
    model = dsjax.from_pretrained(path, dtype=jnp.float32)
    dsjax.save_pretrained(model, tmp_path / "out", max_shard_bytes=50_000)
    original, saved = CheckpointReader(path), CheckpointReader(tmp_path / "out")
    assert original.keys() == saved.keys()
    for k in original.keys():
        np.testing.assert_array_equal(original.get(k), saved.get(k), err_msg=k)
    with pytest.raises(dsjax.CheckpointError, match="mtp=True"):
        dsjax.from_pretrained(save_hf(make_hf_model("v3_qlora_yarn"), tmp_path / "nomtp"), mtp=True)
