"""``bench.py vl``: image encode + prefill throughput of dsjax vs HF transformers' DeepSeek-VL, same weights.

transformers ships DeepSeek-VL (v1): a SigLIP vision model, an aligner (Linear, GELU, Linear) and any language
model (``text_config``). Here the language model is the DeepSeek-V3 preset of ``--config`` on both sides, the
tower a SigLIP of ``--vision`` size and dsjax's projector ``mlp_gelu`` (v1's aligner). One call = every image
through the tower and the aligner, the features written over the placeholder tokens, and the language model's
forward over the whole sequence with logits. dsjax runs :meth:`VisionLanguageModel.forward` with v1's layout
(each image's tokens in order, no newline / separator embeddings, as ``masked_scatter`` does), float32.
"""

import argparse
import os
import statistics
import time

import jax
import numpy as np
from bench_common import (
    HF_IMPLS,
    REL_TOL,
    load_same_weights,
    machine_info,
    make_hf,
    print_table,
    register,
    rel_err,
    time_calls,
)

VISION = {  # HF SiglipVisionConfig sizes (224 px, 16 px patches: 196 tokens per image)
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6),
}


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vision", choices=sorted(VISION), default="small", help="SigLIP tower size")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=2, help="prompts, one image each")
    p.add_argument("--text", type=int, default=60, help="text tokens per prompt besides the image tokens")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (the median is reported)")
    p.add_argument("--hf-impl", default="auto", help="HF ATTN/EXPERTS implementation, e.g. sdpa/grouped_mm; "
                   "'auto' times every combination briefly and keeps HF's fastest")  # fmt: skip


def build(args):
    """The HF DeepSeek-VL model (random weights, routing bias set) and the dsjax model with the same weights."""
    import torch
    from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration, SiglipVisionConfig

    from dsjax.vision.config import ProjectorConfig, TilingConfig, VisionConfig
    from dsjax.vision.hf_map import load_projector, load_tower
    from dsjax.vision.model import VLConfig, create_vl_model

    lm = make_hf(args.config, args.seed)  # DeepseekV3ForCausalLM with a non-zero routing bias
    size = dict(image_size=args.image_size, patch_size=args.patch_size, **VISION[args.vision])
    vision = SiglipVisionConfig(**size)
    image_id = lm.config.vocab_size - 1
    cfg = DeepseekVLConfig(text_config=lm.config.to_dict(), vision_config=vision.to_dict(), image_token_id=image_id,
                           tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(args.seed + 1)
    hf = DeepseekVLForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():  # HF's init leaves biases at 0 and LayerNorms at 1/0: perturb so every weight matters
        gen = torch.Generator().manual_seed(args.seed + 2)
        for name, p in hf.named_parameters():
            if name.startswith(("model.vision_model.", "model.aligner.")):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        hf.model.language_model.load_state_dict(lm.model.state_dict())
        hf.lm_head.load_state_dict(lm.lm_head.state_dict())

    language = load_same_weights(lm)
    vl_cfg = VLConfig(
        language=language.config,
        vision=VisionConfig(**size),
        projector=ProjectorConfig(projector_type="mlp_gelu", input_dim=vision.hidden_size,
                                  n_embed=language.config.hidden_size, downsample_ratio=1),
        tiling=TilingConfig(image_size=args.image_size, patch_size=args.patch_size, downsample_ratio=1, max_tiles=1),
        image_token_id=image_id,
    )  # fmt: skip
    model = create_vl_model(vl_cfg, seed=args.seed)
    model.language = language
    state = hf.state_dict()
    load_tower(model.vision, state, prefix="model.vision_model.")
    load_projector(model.projector, state, layout="hf", prefix="model.aligner.")
    return hf, model


@register("vl", "image encode + prefill tokens/s of dsjax vs HF DeepSeek-VL on the same weights (float32)", _args)
def vl(args: argparse.Namespace) -> dict:
    import torch

    from dsjax.vision.model import ImageBatch

    torch.set_num_threads(os.cpu_count())
    hf, model = build(args)
    image_id = model.config.image_token_id
    per_image = (args.image_size // args.patch_size) ** 2
    rng = np.random.default_rng(args.seed)
    seq = per_image + args.text
    tokens = rng.integers(0, image_id, (args.batch, seq), np.int32)
    start = args.text // 2  # text, the image's run, more text
    tokens[:, start : start + per_image] = image_id
    pixels = rng.standard_normal((args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
    # v1 layout: the k-th placeholder takes the k-th feature row (no newline / separator entries)
    images = ImageBatch(pixels, np.arange(args.batch * per_image, dtype=np.int32), (per_image,) * args.batch)
    tokens_pt = torch.as_tensor(tokens, dtype=torch.long)
    pixels_pt = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    n_tokens = args.batch * seq

    t0 = time.perf_counter()
    logits = jax.block_until_ready(model(tokens, images))  # checks the inputs, compiles the cached jit forward
    compile_s = time.perf_counter() - t0

    def hf_forward(impl: tuple[str, str] | None = None):
        def call():
            if impl is not None:
                hf.set_attn_implementation(impl[0])
                hf.model.language_model.set_experts_implementation(impl[1])  # the VL wrapper refuses it
            with torch.inference_mode():
                return hf(input_ids=tokens_pt, pixel_values=pixels_pt).logits

        return call

    impls = HF_IMPLS if args.hf_impl == "auto" else [tuple(args.hf_impl.split("/"))]
    trials = time_calls({i: hf_forward(i) for i in impls}, iters=2) if len(impls) > 1 else {}
    trials = {"/".join(i): statistics.median(ts) for i, ts in trials.items()}
    best = min(trials, key=trials.get) if trials else "/".join(impls[0])
    err = rel_err(logits, hf_forward(tuple(best.split("/")))().numpy())  # leaves HF at its fastest setting
    hf_call = hf_forward()
    timed = time_calls({"dsjax": lambda: jax.block_until_ready(model(tokens, images)), "hf": hf_call}, args.iters)
    dsjax_s, hf_s = statistics.median(timed["dsjax"]), statistics.median(timed["hf"])
    ratio = hf_s / dsjax_s  # = dsjax tokens/s over HF's
    result = dict(mode="vl", config=args.config, vision=args.vision, image_size=args.image_size,
                  patch_size=args.patch_size, batch=args.batch, seq=seq, image_tokens=per_image,
                  iters=args.iters, dsjax_tokens_per_s=n_tokens / dsjax_s, hf_tokens_per_s=n_tokens / hf_s,
                  dsjax_images_per_s=args.batch / dsjax_s, hf_images_per_s=args.batch / hf_s, ratio=ratio,
                  rel_err=err, ok=err <= REL_TOL, dsjax_ms=1e3 * dsjax_s, hf_ms=1e3 * hf_s,
                  dsjax_ms_min=1e3 * min(timed["dsjax"]), hf_ms_min=1e3 * min(timed["hf"]),
                  dsjax_compile_s=compile_s, hf_impl=best,
                  hf_trials_ms={k: round(1e3 * v, 1) for k, v in trials.items()}, **machine_info())  # fmt: skip

    print(f"vl  language={args.config} vision={args.vision} ({args.image_size} px / {args.patch_size}: {per_image} "
          f"tokens per image), batch={args.batch} x {seq} tokens, float32, median of {args.iters}")  # fmt: skip
    print(f"machine  {result['cpu_count']} CPUs ({result['processor']}), jax {result['jax']} "
          f"[{result['jax_device']}], torch {result['torch']}, load avg {result['loadavg_1min']}")  # fmt: skip
    if trials:
        print("HF attn/experts trials (ms): " + ", ".join(f"{k} {v}" for k, v in result["hf_trials_ms"].items()))
    print()
    print_table(("impl", "ms/iter", "tokens/s", "images/s", "vs HF"),
                [("dsjax", f"{1e3 * dsjax_s:.1f}", f"{n_tokens / dsjax_s:,.0f}", f"{args.batch / dsjax_s:.1f}",
                  f"{ratio:.2f}x"),
                 (f"HF DeepseekVLForConditionalGeneration {best}", f"{1e3 * hf_s:.1f}", f"{n_tokens / hf_s:,.0f}",
                  f"{args.batch / hf_s:.1f}", "1.00x")])  # fmt: skip
    print(f"\ndsjax compile {compile_s:.2f}s; logits rel err vs HF {err:.2e} (tolerance {REL_TOL:.0e})")
    if not result["ok"]:
        result["failure"] = f"dsjax logits differ from HF: rel err {err:.2e} > {REL_TOL:.0e}"
    return result
