"""``bench.py forward``: prefill tokens/s of dsjax vs HF transformers, with a logit-parity check."""

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

# ---- forward -----------------------------------------------------------------------------------------------


def _forward_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=10, help="timed iterations (the median is reported)")
    p.add_argument("--dispatch", help="dsjax MoE dispatch (default: the library's, 'auto')")
    p.add_argument("--attention", help="dsjax attention core (default: the library's, 'naive')")
    p.add_argument("--hf-impl", default="auto", help="HF ATTN/EXPERTS implementation, e.g. sdpa/grouped_mm; "
                   "'auto' times every combination briefly and keeps HF's fastest")  # fmt: skip


@register("forward", "prefill tokens/s of dsjax vs HF transformers (float32, CPU)", _forward_args)
def forward(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())
    hf = make_hf(args.config, args.seed)
    model = load_same_weights(hf)
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, hf.config.vocab_size, (args.batch, args.seq), np.int32)
    tokens_pt = torch.as_tensor(tokens, dtype=torch.long)
    n_tokens = args.batch * args.seq

    opts = {k: v for k, v in (("dispatch", args.dispatch), ("attention", args.attention)) if v}
    start = time.perf_counter()
    logits = jax.block_until_ready(model(tokens, **opts))  # traces and compiles the cached jit forward
    compile_s = time.perf_counter() - start

    def hf_forward(impl: tuple[str, str] | None = None):
        def call():
            if impl is not None:
                hf.set_attn_implementation(impl[0])
                hf.set_experts_implementation(impl[1])
            with torch.inference_mode():
                return hf(tokens_pt).logits

        return call

    impls = HF_IMPLS if args.hf_impl == "auto" else [tuple(args.hf_impl.split("/"))]
    trials = time_calls({i: hf_forward(i) for i in impls}, iters=3) if len(impls) > 1 else {}
    trials = {"/".join(i): statistics.median(ts) for i, ts in trials.items()}
    best = min(trials, key=trials.get) if trials else "/".join(impls[0])
    ref = hf_forward(tuple(best.split("/")))().numpy()  # leaves HF set to its fastest implementation
    err = rel_err(logits, ref)

    timed = time_calls({"dsjax": lambda: jax.block_until_ready(model(tokens, **opts)), "hf": hf_forward()}, args.iters)
    dsjax_s, hf_s = statistics.median(timed["dsjax"]), statistics.median(timed["hf"])
    ratio = hf_s / dsjax_s  # = dsjax tokens/s over HF tokens/s
    result = dict(mode="forward", config=args.config, batch=args.batch, seq=args.seq, iters=args.iters,
                  dsjax_tokens_per_s=n_tokens / dsjax_s, hf_tokens_per_s=n_tokens / hf_s, ratio=ratio,
                  rel_err=err, ok=err <= REL_TOL, dsjax_ms=1e3 * dsjax_s, hf_ms=1e3 * hf_s,
                  dsjax_ms_min=1e3 * min(timed["dsjax"]), hf_ms_min=1e3 * min(timed["hf"]),
                  dsjax_compile_s=compile_s, dsjax_options=opts, hf_impl=best,
                  hf_trials_ms={k: round(1e3 * v, 1) for k, v in trials.items()}, **machine_info())  # fmt: skip

    print(f"forward  config={args.config} batch={args.batch} seq={args.seq} float32, median of {args.iters}")
    print(f"machine  {result['cpu_count']} CPUs ({result['processor']}), jax {result['jax']} "
          f"[{result['jax_device']}], torch {result['torch']}, load avg {result['loadavg_1min']}")  # fmt: skip
    if trials:
        print("HF attn/experts trials (ms): " + ", ".join(f"{k} {v}" for k, v in result["hf_trials_ms"].items()))
    print()
    name = " ".join(["dsjax", *opts.values()])
    print_table(("impl", "ms/iter", "tokens/s", "vs HF"),
                [(name, f"{1e3 * dsjax_s:.1f}", f"{n_tokens / dsjax_s:,.0f}", f"{ratio:.2f}x"),
                 (f"HF {best}", f"{1e3 * hf_s:.1f}", f"{n_tokens / hf_s:,.0f}", "1.00x")])  # fmt: skip
    print(f"\ndsjax compile {compile_s:.2f}s; logits rel err vs HF {err:.2e} (tolerance {REL_TOL:.0e})")
    if not result["ok"]:
        result["failure"] = f"dsjax logits differ from HF: rel err {err:.2e} > {REL_TOL:.0e}"
    return result
