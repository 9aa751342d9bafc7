"""``bench.py decode``: generation tokens/s of dsjax vs HF transformers' ``generate``, and MTP speculation.

Part 1 (vs HF): the same random float32 weights (preset ``--config``), random prompts of ``--prompt-len``
tokens, greedy, exactly ``--new-tokens`` new tokens per row (no stop token), at each ``--batches`` size. Tokens/s
counts generated tokens over the whole call (prefill included) on both sides; HF gets its fastest attention /
experts implementation. Greedy outputs are compared token by token.

Part 2 (speculative): a model trained with the MTP loss (``--mtp-checkpoint``, default ``runs/train_tiny/hf``
from ``python scripts/train.py``; trained here for ``--mtp-steps`` steps if absent) generates from held-out
corpus prefixes with and without MTP drafting; reports the acceptance rate and the speedup, and checks that the
greedy outputs are identical.
"""

import argparse
import os
import statistics
import tempfile
import time

import jax.numpy as jnp
import numpy as np
from bench_common import HF_IMPLS, load_same_weights, machine_info, make_hf, print_table, register, time_calls

import dsjax
from dsjax.infer import generate

DEFAULT_MTP_CHECKPOINT = "runs/train_tiny/hf"


def _decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--iters", type=int, default=3, help="timed calls per side (the median is reported)")
    p.add_argument("--mtp-checkpoint", default=DEFAULT_MTP_CHECKPOINT, help="HF dir of an MTP-trained model")
    p.add_argument("--mtp-steps", type=int, default=300, help="training steps if --mtp-checkpoint is absent")
    p.add_argument("--spec-new-tokens", type=int, default=256, help="new tokens per row in the speculative part")
    p.add_argument("--spec-iters", type=int, default=5, help="timed calls per side in the speculative part")
    p.add_argument("--skip-mtp", action="store_true", help="only the comparison with HF")


def _vs_hf(args, batch: int, hf, model) -> dict:
    import torch

    rng = np.random.default_rng(args.seed + batch)
    prompts = rng.integers(2, model.config.vocab_size, (batch, args.prompt_len)).astype(np.int32)
    ids = torch.as_tensor(prompts, dtype=torch.long)
    n = args.new_tokens

    def hf_call():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)  # fmt: skip

    def ds_call():
        return generate(model, prompts.tolist(), max_new_tokens=n, stop_tokens=(), return_result=True)

    trials = {}
    for attn, experts in HF_IMPLS:  # give HF its fastest implementation at this batch size
        hf.set_attn_implementation(attn)
        hf.set_experts_implementation(experts)
        trials[f"{attn}/{experts}"] = min(time_calls({"hf": hf_call}, iters=1)["hf"])
    best = min(trials, key=trials.get)
    hf.set_attn_implementation(best.split("/")[0])
    hf.set_experts_implementation(best.split("/")[1])

    ours = ds_call()  # compiles the prefill and the decode loop for this shape bucket
    hf_tokens = hf_call()[:, args.prompt_len :].numpy()
    same = float(np.mean([list(r) == list(h) for r, h in zip(ours.tokens, hf_tokens)]))
    times = time_calls({"dsjax": ds_call, "hf": hf_call}, args.iters)
    ds_s, hf_s = statistics.median(times["dsjax"]), statistics.median(times["hf"])
    return dict(batch=batch, dsjax_tokens_per_s=batch * n / ds_s, hf_tokens_per_s=batch * n / hf_s,
                ratio=hf_s / ds_s, dsjax_ms=1e3 * ds_s, hf_ms=1e3 * hf_s, same_output_rows=same, hf_impl=best,
                hf_trials_ms={k: round(1e3 * v, 1) for k, v in trials.items()})  # fmt: skip


def _mtp_model(args):
    if os.path.exists(os.path.join(args.mtp_checkpoint, "config.json")):
        return dsjax.from_pretrained(args.mtp_checkpoint, dtype=jnp.float32), args.mtp_checkpoint
    from dsjax.train.config import load_run_config
    from dsjax.train.loop import train

    out = tempfile.mkdtemp(prefix="dsjax_mtp_")
    run = load_run_config("configs/train_tiny.yaml", [f"train.steps={args.mtp_steps}"])
    print(f"{args.mtp_checkpoint} not found: training configs/train_tiny.yaml for {args.mtp_steps} steps in {out}")
    train(run, out, progress=False)
    path = os.path.join(out, "hf")
    return dsjax.from_pretrained(path, dtype=jnp.float32), f"{path} ({args.mtp_steps} steps)"


def _speculative(args, batches: list[int]) -> tuple[dict, list[dict]]:
    from dsjax.data.corpus import default_corpus
    from dsjax.data.tokenizer import ByteTokenizer

    model, source = _mtp_model(args)
    tok = ByteTokenizer()
    # Held-out documents: the training corpus is drawn with seed 0 (train.seed); these come from another seed.
    docs = [d for d in default_corpus(num_docs=400, seed=12345) if len(tok.encode(d)) > args.prompt_len]
    rows = []
    n = args.spec_new_tokens
    kw = dict(max_new_tokens=n, stop_tokens=(), return_result=True)
    for batch in batches:
        prompts = [tok.encode(d)[: args.prompt_len] for d in docs[:batch]]
        calls = {"plain": lambda p=prompts: generate(model, p, **kw),
                 "speculative": lambda p=prompts: generate(model, p, speculative=True, **kw)}  # fmt: skip
        results = {k: f() for k, f in calls.items()}  # compile both
        times = time_calls(calls, args.spec_iters)
        plain_s, spec_s = statistics.median(times["plain"]), statistics.median(times["speculative"])
        spec = results["speculative"]
        rows.append(dict(batch=batch, acceptance=spec.acceptance_rate, speedup=plain_s / spec_s,
                         plain_tokens_per_s=batch * n / plain_s, speculative_tokens_per_s=batch * n / spec_s,
                         tokens_per_step=sum(map(len, spec.tokens)) / batch / (spec.decode_steps + 1),
                         identical=results["plain"].tokens == spec.tokens))  # fmt: skip
    return dict(checkpoint=source), rows


@register("decode", "generation tokens/s of dsjax vs HF generate (batch 1 and 16) and MTP speculation", _decode_args)
def decode(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())
    batches = [int(b) for b in args.batches.split(",")]
    hf = make_hf(args.config, args.seed)
    model = load_same_weights(hf)
    start = time.perf_counter()
    vs_hf = [_vs_hf(args, b, hf, model) for b in batches]
    info = machine_info()
    print(f"decode  config={args.config} prompt={args.prompt_len} new={args.new_tokens} greedy float32, "
          f"median of {args.iters}; {info['cpu_count']} CPUs, jax {info['jax']}, torch {info['torch']}, "
          f"load {info['loadavg_1min']}")  # fmt: skip
    print_table(
        ("batch", "dsjax tok/s", "HF tok/s", "ratio", "same output", "HF impl"),
        [(r["batch"], f"{r['dsjax_tokens_per_s']:,.0f}", f"{r['hf_tokens_per_s']:,.0f}", f"{r['ratio']:.2f}x",
          f"{r['same_output_rows']:.0%}", r["hf_impl"]) for r in vs_hf],
    )  # fmt: skip
    result = dict(mode="decode", config=args.config, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  vs_hf=vs_hf, ratio=min(r["ratio"] for r in vs_hf), **info)  # fmt: skip
    if not args.skip_mtp:
        meta, spec = _speculative(args, batches)
        print(f"\nMTP speculative decoding, greedy, {args.spec_new_tokens} new tokens, model {meta['checkpoint']}")
        print_table(
            ("batch", "acceptance", "tokens/step", "plain tok/s", "speculative tok/s", "speedup", "identical"),
            [(r["batch"], f"{r['acceptance']:.1%}", f"{r['tokens_per_step']:.2f}", f"{r['plain_tokens_per_s']:,.0f}",
              f"{r['speculative_tokens_per_s']:,.0f}", f"{r['speedup']:.2f}x", r["identical"]) for r in spec],
        )  # fmt: skip
        result.update(speculative=spec, mtp_checkpoint=meta["checkpoint"])
        if not all(r["identical"] for r in spec):
            result.update(ok=False, failure="speculative greedy output differs from plain greedy output")
    print(f"\nbench time {time.perf_counter() - start:.0f}s")
    return result
