"""dsjax benchmarks, one subcommand per mode: ``python scripts/bench.py MODE [options] [--json]``.

Modes register themselves in ``MODES`` (name -> help, argument adder, runner); a runner prints its own
human-readable report and returns a dict, which ``--json`` prints as the last line of output.

  forward  full-sequence forward (prefill) tokens/s of dsjax vs HF transformers' DeepseekV3ForCausalLM on the
           same random weights, float32, on the default single CPU device, plus a logit-parity check.
  train    train-step tokens/s and MFU of dsjax vs HF DeepseekV3ForCausalLM + torch AdamW on the same weights
           and batch (next-token CE, AdamW 0.9/0.95, wd 0.1, clip 1.0), plus a check of the loss after one update.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dsjax

REL_TOL = 1e-4  # max |dsjax - hf| / max |hf|, as in the parity tests

# HF DeepseekV3Config keyword arguments of the preset model sizes (V3 routing: sigmoid, noaux_tc).
_COMMON = dict(n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=4096,
               num_nextn_predict_layers=0, pad_token_id=None, bos_token_id=0, eos_token_id=1)  # fmt: skip
CONFIGS: dict[str, dict] = {
    "tiny": dict(_COMMON, vocab_size=1024, hidden_size=64, num_attention_heads=4, kv_lora_rank=32,
                 q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                 intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4, n_routed_experts=8,
                 num_experts_per_tok=2, n_group=4, topk_group=2),
    "small": dict(_COMMON, vocab_size=4096, hidden_size=256, num_attention_heads=8, kv_lora_rank=64,
                  q_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                  intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=6, n_routed_experts=16,
                  num_experts_per_tok=4, n_group=4, topk_group=2),
}  # fmt: skip


class Mode(NamedTuple):
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]


MODES: dict[str, Mode] = {}


def register(name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Decorator: register ``run(args) -> dict`` as the subcommand ``name`` with its own arguments."""

    def wrap(run):
        MODES[name] = Mode(help, add_args, run)
        return run

    return wrap


# ---- shared helpers ----------------------------------------------------------------------------------------
def machine_info() -> dict:
    import torch

    return dict(cpu_count=os.cpu_count(), processor=platform.processor() or platform.machine(),
                jax=jax.__version__, jax_device=str(jax.devices()[0]), torch=torch.__version__,
                loadavg_1min=round(os.getloadavg()[0], 2))  # fmt: skip


def time_calls(fns: dict[str, Callable[[], object]], iters: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of ``iters`` calls of each ``fn()``, after ``warmup`` untimed calls of each.

    Calls are interleaved round-robin, so load from other processes on the machine hits all of them alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def make_hf(config: str, seed: int):
    """A random float32 HF DeepseekV3ForCausalLM of preset ``config``, with a non-zero routing bias."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    kw = dict(CONFIGS[config])
    kw["num_key_value_heads"] = kw["num_attention_heads"]
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw)).float().eval()
    with torch.no_grad():  # HF starts the bias at 0; let it steer selection as in trained checkpoints
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))
    return model


def load_same_weights(hf_model):
    """The dsjax model with ``hf_model``'s weights, through an HF safetensors checkpoint in a temp dir."""
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        return dsjax.from_pretrained(tmp, dtype=jnp.float32)


def print_table(header: tuple, rows: list[tuple]) -> None:
    cells = [tuple(str(c) for c in r) for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


# ---- forward -----------------------------------------------------------------------------------------------
# (attn, experts) implementations 'auto' tries; experts "batched_mm" is left out: 30-45x slower on CPU (measured)
HF_IMPLS = [(a, e) for a in ("sdpa", "eager") for e in ("eager", "grouped_mm")]


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


# ---- CLI ---------------------------------------------------------------------------------------------------


# ---- train -------------------------------------------------------------------------------------------------
def matmul_peak_flops(n: int = 1024, iters: int = 20) -> float:
    """This machine's float32 matmul throughput (FLOP/s) through XLA: the denominator of MFU."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    best = min(time_calls({"mm": lambda: jax.block_until_ready(f(a))}, iters)["mm"])
    return 2 * n**3 / best


def train_flops_per_token(cfg: dsjax.ModelConfig, seq: int) -> float:
    """Model FLOPs of one training token: 6 x (matmul parameters a token uses) + attention scores and values.

    Routed experts count with weight top_k / n_routed; the embedding table is a gather, not a matmul. Attention
    adds 2 * seq * heads * (qk_head + v_head) per layer forward (no causal discount), times 3 for training.
    """
    abstract = dsjax.abstract_model(cfg)
    active = 0.0
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        size = float(np.prod(var.get_value().shape))
        if path[0] == "mtp" or path == ("embed",) or path[-1] == "weight":
            continue  # MTP off here; embedding lookup and norms do no matmul
        if path[-1] in ("w_gate", "w_up", "w_down") and "shared" not in path and path[0] == "moe_layers":
            size *= cfg.num_experts_per_tok / cfg.n_routed_experts
        active += size
    attention = 2 * seq * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers
    return 6 * active + 3 * attention


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--iters", type=int, default=8, help="timed steps (the median is reported)")


@register("train", "train-step tokens/s and MFU of dsjax vs HF transformers + torch AdamW (float32, CPU)",
          _train_args)  # fmt: skip
def train(args: argparse.Namespace) -> dict:
    import torch

    from dsjax.train.config import TrainConfig
    from dsjax.train.optim import make_optimizer
    from dsjax.train.step import init_train_state, jit_train_step, make_train_step

    torch.set_num_threads(os.cpu_count())
    # XLA:CPU flushes denormals to zero; without the same setting torch's AdamW state and gradients drift into
    # denormals after a few updates and its CPU kernels slow down by an order of magnitude (seen here: 50x).
    torch.set_flush_denormal(True)
    hf = make_hf(args.config, args.seed).train()
    model = load_same_weights(hf)
    cfg = model.config
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    # The same objective on both sides: next-token cross-entropy, AdamW(0.9, 0.95, wd 0.1), clipping at 1.0.
    # HF has no MTP, balance loss or bias update, so they are off here (the model has no MTP module).
    tc = TrainConfig(steps=1000, warmup_steps=0, lr=1e-3, min_lr_ratio=1.0, mtp_lambda=0.0, balance_alpha=0.0,
                     bias_gamma=0.0, batch_size=args.batch, seq_len=args.seq)  # fmt: skip
    tx = make_optimizer(tc, nnx.state(model, nnx.Param))
    graphdef, state = init_train_state(model, tx)
    step = jit_train_step(make_train_step(graphdef, cfg, tc, tx))
    ones = np.ones((args.batch, args.seq), np.int32)
    batch = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=ones.astype(bool), segment_ids=ones,
                 positions=np.broadcast_to(np.arange(args.seq, dtype=np.int32), ones.shape).copy())  # fmt: skip

    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    inputs, labels = torch.as_tensor(tokens[:, :-1], dtype=torch.long), torch.as_tensor(tokens[:, 1:]).long()

    def hf_step():
        logits = hf(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    holder = {"state": state}

    def dsjax_step():
        holder["state"], metrics = step(holder["state"], batch)
        return float(metrics["loss"])

    # Same weights, batch and optimizer: the loss after one update must agree (this also compiles dsjax). At
    # initialisation both losses are ~ln(vocab), so the second step is the informative one.
    losses = {"dsjax": [dsjax_step(), dsjax_step()], "hf": [hf_step(), hf_step()]}
    loss_err = abs(losses["dsjax"][1] - losses["hf"][1]) / abs(losses["hf"][1])
    times = time_calls({"dsjax": dsjax_step, "hf": hf_step}, args.iters)
    tokens_per_step = args.batch * args.seq
    tps = {k: tokens_per_step / statistics.median(v) for k, v in times.items()}
    flops_tok = train_flops_per_token(cfg, args.seq)
    peak = matmul_peak_flops()
    mfu = {k: v * flops_tok / peak for k, v in tps.items()}
    print(f"train step, config={args.config}, batch={args.batch}, seq={args.seq}, float32, {machine_info()}")
    print_table(
        ("", "tokens/s", "MFU"),
        [(k, f"{tps[k]:,.0f}", f"{mfu[k]:.1%}") for k in ("dsjax", "hf")],
    )
    print(f"ratio dsjax/HF: {tps['dsjax'] / tps['hf']:.2f}x")
    print(f"loss after one update: dsjax {losses['dsjax'][1]:.6f}, HF {losses['hf'][1]:.6f} (rel {loss_err:.1e})")
    print(f"model {flops_tok / 1e6:.1f} MFLOP/token (training); XLA float32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    return dict(
        mode="train",
        config=args.config,
        batch=args.batch,
        seq=args.seq,
        dsjax_tokens_per_s=tps["dsjax"],
        hf_tokens_per_s=tps["hf"],
        ratio=tps["dsjax"] / tps["hf"],
        dsjax_mfu=mfu["dsjax"],
        hf_mfu=mfu["hf"],
        model_flops_per_token=flops_tok,
        matmul_peak_flops=peak,
        second_loss_rel_err=loss_err,
        ok=loss_err <= REL_TOL,
        failure=f"second-step losses differ by {loss_err:.2e}: the two sides do not train the same model",
    )


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", choices=sorted(CONFIGS), default="small", help="preset model size")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for name, mode in MODES.items():
        mode.add_args(sub.add_parser(name, help=mode.help, parents=[common]))
    args = parser.parse_args(argv)
    result = MODES[args.mode].run(args)
    if args.json:
        print(json.dumps(result), flush=True)
    if not result.get("ok", True):
        print(f"FAILED: {args.mode}: {result.get('failure', 'check failed')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
