"""numerics="official" follows DeepSeek's inference code where it differs from HF (architecture notes §11).

The torch functions below restate deepseek-ai/DeepSeek-V3 ``inference/model.py`` (``Gate.forward``, RMSNorm)
from its documented behaviour: bf16 gate GEMM and sigmoid, fp32 bias added for selection, group score = sum of
the top-2 (amax without bias), -inf group mask, weights from the unbiased scores, normalised without epsilon.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dsjax
from dsjax.ops.norm import rms_norm
from dsjax.ops.routing import route


def official_gate(x, weight, bias, cfg):
    scores = torch.nn.functional.linear(x.bfloat16(), weight.bfloat16())
    scores = scores.softmax(-1, dtype=torch.float32) if cfg.scoring_func == "softmax" else scores.sigmoid()
    original = scores
    if bias is not None:
        scores = scores + bias
    m = x.shape[0]
    if cfg.n_group > 1:
        grouped = scores.view(m, cfg.n_group, -1)
        group_scores = grouped.amax(-1) if bias is None else grouped.topk(2, -1)[0].sum(-1)
        kept = group_scores.topk(cfg.topk_group, -1)[1]
        drop = torch.ones(m, cfg.n_group, dtype=torch.bool).scatter_(1, kept, False)
        scores = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)
    else:
        group_scores = None
    indices = scores.topk(cfg.num_experts_per_tok, -1)[1]
    weights = original.gather(1, indices).float()
    if cfg.scoring_func == "sigmoid":
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * cfg.routed_scaling_factor, indices, scores, group_scores


def _unambiguous(choice, group_scores, k, topk_group):
    """Tokens whose selection has no exact tie at the top-k (or kept-group) boundary, in bf16 scores."""
    top = np.sort(choice, -1)[:, ::-1]
    ok = top[:, k - 1] != top[:, k]
    if group_scores is not None:
        g = np.sort(group_scores, -1)[:, ::-1]
        ok &= g[:, topk_group - 1] != g[:, topk_group]
    return ok


@pytest.mark.parametrize("preset", ["tiny", "tiny_v2"])
def test_router_matches_official_gate(preset):
    cfg = dsjax.config.PRESETS[preset](
        numerics="official",
        n_routed_experts=32,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=4,
        topk_method="noaux_tc" if preset == "tiny" else "group_limited_greedy",
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, cfg.hidden_size)).astype(np.float32)
    gate = (0.2 * rng.standard_normal((cfg.hidden_size, cfg.n_routed_experts))).astype(np.float32)
    bias = (0.05 * rng.standard_normal(cfg.n_routed_experts)).astype(np.float32) if cfg.has_routing_bias else None
    ours = route(jnp.asarray(x), jnp.asarray(gate), None if bias is None else jnp.asarray(bias), cfg)
    w_ref, i_ref, choice, group_scores = official_gate(
        torch.from_numpy(x), torch.from_numpy(gate.T.copy()), None if bias is None else torch.from_numpy(bias), cfg
    )
    ok = _unambiguous(
        choice.float().numpy(),
        None if group_scores is None else group_scores.float().numpy(),
        cfg.num_experts_per_tok,
        cfg.topk_group,
    )
    assert ok.mean() > 0.8, "too many exact ties to make the comparison meaningful"
    ours_i, ours_w = np.asarray(ours.experts_mk)[ok], np.asarray(ours.weights_mk)[ok]
    ref_i, ref_w = i_ref.numpy()[ok], w_ref.numpy()[ok]
    order_o, order_r = np.argsort(ours_i, -1), np.argsort(ref_i, -1)
    np.testing.assert_array_equal(np.take_along_axis(ours_i, order_o, -1), np.take_along_axis(ref_i, order_r, -1))
    np.testing.assert_allclose(
        np.take_along_axis(ours_w, order_o, -1), np.take_along_axis(ref_w, order_r, -1), rtol=1e-6
    )
    # The profiles really differ: HF's fp32 router changes some weights by more than bf16 rounding.
    hf = route(
        jnp.asarray(x), jnp.asarray(gate), None if bias is None else jnp.asarray(bias), cfg.replace(numerics="hf")
    )
    assert np.abs(np.asarray(hf.weights_mk)[ok] - np.asarray(ours.weights_mk)[ok]).max() > 1e-4


@pytest.mark.parametrize("weight_in_fp32", [False, True])
def test_rms_norm_profiles_bitwise(weight_in_fp32):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((16, 64)).astype(np.float32)).bfloat16()
    w = torch.from_numpy(1 + 0.3 * rng.standard_normal(64).astype(np.float32)).bfloat16()
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
    ref = (normed * w.float()).bfloat16() if weight_in_fp32 else w * normed.bfloat16()  # official / HF
    ours = rms_norm(
        jnp.asarray(x.float().numpy()).astype(jnp.bfloat16),
        jnp.asarray(w.float().numpy()).astype(jnp.bfloat16),
        1e-6,
        weight_in_fp32=weight_in_fp32,
    )
    np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), ref.float().numpy())


def test_official_model_runs_close_to_hf_profile():
    cfg = dsjax.ModelConfig.tiny(initializer_range=0.1)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 10))
    hf = dsjax.create_model(cfg, seed=0)(tokens)
    official = dsjax.create_model(cfg.replace(numerics="official"), seed=0)(tokens)
    assert np.isfinite(np.asarray(official)).all()
    assert np.abs(np.asarray(official) - np.asarray(hf)).max() > 0
