"""``bench.py fp8``: DeepSeek's fine-grained FP8 GEMM and train step vs bf16 on this machine.

CPUs have no FP8 arithmetic: XLA:CPU converts the E4M3 operands to f32 before each dot, so here the FP8 path
costs quantisation and per-128 promotion on top of a bf16-speed GEMM, and the figures are informational (the
speed claim belongs to GPUs with FP8 tensor cores; ``scripts/fp8_gpu_check.py`` measures that). The errors are
the point on CPU: relative Frobenius error of bf16 and FP8 GEMMs (forward, input and weight gradients) against
float64, and of the FP8 train step's loss against the bf16 one after the same updates.
"""

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import CONFIGS, machine_info, print_table, register, time_calls
from flax import nnx

import dsjax
from dsjax.config import Fp8Recipe
from dsjax.ops.fp8 import fp8_matmul

# (tokens, in, out): the small preset's expert / attention projections, then a DeepSeek-V3 expert scaled by 1/4
GEMM_SHAPES = [(2048, 256, 128), (2048, 256, 768), (2048, 1792, 512)]


def _rel_fro(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _gemm_rows(iters: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    recipe = Fp8Recipe()
    rows = []
    for m, k, n in GEMM_SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[:, 7] *= 30  # an outlier channel, as LLM activations have
        w = (0.02 * rng.standard_normal((k, n))).astype(np.float32)
        g = rng.standard_normal((m, n)).astype(np.float32)
        exact = (x.astype(np.float64) @ w, g.astype(np.float64) @ w.T, x.T.astype(np.float64) @ g)

        def bf16(x, w):
            return jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)

        def fp8(x, w):
            return fp8_matmul(x.astype(jnp.bfloat16), w, recipe).astype(jnp.float32)

        row = dict(m=m, k=k, n=n)
        args = (jnp.asarray(x), jnp.asarray(w))
        cot = jnp.asarray(g)
        fns = {}
        for name, f in (("bf16", bf16), ("fp8", fp8)):
            fwd = jax.jit(f)
            both = jax.jit(lambda x, w, g, f=f: jax.vjp(f, x, w)[1](g))
            y, (dx, dw) = fwd(*args), both(*args, cot)
            row[f"{name}_err"] = [_rel_fro(v, e) for v, e in zip((y, dx, dw), exact)]
            fns[f"{name}_fwd"] = lambda fwd=fwd, a=args: jax.block_until_ready(fwd(*a))
            fns[f"{name}_fwd_bwd"] = lambda both=both, a=args, c=cot: jax.block_until_ready(both(*a, c))
        times = time_calls(fns, iters)
        row.update({f"{key}_ms": 1e3 * statistics.median(v) for key, v in times.items()})
        rows.append(row)
    return rows


def _train_rows(config: str, batch: int, seq: int, iters: int, seed: int) -> dict:
    from dsjax.hf_config import config_from_hf
    from dsjax.train.config import TrainConfig
    from dsjax.train.optim import make_optimizer
    from dsjax.train.step import init_train_state, jit_train_step, make_train_step

    cfg = config_from_hf(dict(CONFIGS[config], model_type="deepseek_v3"))
    tc = TrainConfig(steps=1000, warmup_steps=0, lr=1e-3, min_lr_ratio=1.0, mtp_lambda=0.0, batch_size=batch,
                     seq_len=seq)  # fmt: skip
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    ones = np.ones((batch, seq), np.int32)
    data = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=ones.astype(bool), segment_ids=ones,
                positions=np.broadcast_to(np.arange(seq, dtype=np.int32), ones.shape).copy())  # fmt: skip
    steps, losses = {}, {}
    for name, fp8 in (("bf16", None), ("fp8", Fp8Recipe())):
        model = dsjax.create_model(cfg.replace(fp8=fp8), seed=seed, dtype=jnp.bfloat16)
        tx = make_optimizer(tc, nnx.state(model, nnx.Param))
        graphdef, state = init_train_state(model, tx)
        step = jit_train_step(make_train_step(graphdef, model.config, tc, tx))
        holder = {"state": state}

        def run(step=step, holder=holder):
            holder["state"], metrics = step(holder["state"], data)
            return float(metrics["loss"])

        losses[name] = [run() for _ in range(3)]  # compiles; the third loss follows two identical updates
        steps[name] = run
    times = time_calls(steps, iters)
    tps = {k: batch * seq / statistics.median(v) for k, v in times.items()}
    return dict(
        bf16_tokens_per_s=tps["bf16"],
        fp8_tokens_per_s=tps["fp8"],
        third_loss=losses,
        third_loss_rel_diff=abs(losses["fp8"][2] - losses["bf16"][2]) / losses["bf16"][2],
    )


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--iters", type=int, default=5, help="timed calls (the median is reported)")


@register("fp8", "fine-grained FP8 vs bf16: GEMM and train-step time and error (CPU figures informational)", _args)
def fp8(args: argparse.Namespace) -> dict:
    gemms = _gemm_rows(args.iters, args.seed)
    train = _train_rows(args.config, args.batch, args.seq, args.iters, args.seed)
    print(f"FP8 (E4M3, 1x128 activation / 128x128 weight tiles, blocked backend) vs bf16, {machine_info()}")
    print_table(
        ("GEMM m x k x n", "bf16 fwd ms", "fp8 fwd ms", "bf16 f+b ms", "fp8 f+b ms", "bf16 err", "fp8 err"),
        [
            (
                f"{r['m']}x{r['k']}x{r['n']}",
                f"{r['bf16_fwd_ms']:.2f}",
                f"{r['fp8_fwd_ms']:.2f}",
                f"{r['bf16_fwd_bwd_ms']:.2f}",
                f"{r['fp8_fwd_bwd_ms']:.2f}",
                "/".join(f"{e:.2%}" for e in r["bf16_err"]),
                "/".join(f"{e:.2%}" for e in r["fp8_err"]),
            )
            for r in gemms
        ],
    )
    print("  (errors: relative Frobenius vs float64 of y / dx / dw)")
    ratio = train["fp8_tokens_per_s"] / train["bf16_tokens_per_s"]
    print(
        f"train step, config={args.config}, batch={args.batch}, seq={args.seq}: bf16 {train['bf16_tokens_per_s']:,.0f}"
        f" tok/s, fp8 {train['fp8_tokens_per_s']:,.0f} tok/s, ratio fp8/bf16 {ratio:.2f}x (CPU: no FP8 units)"
    )
    print(f"loss after two identical updates: relative difference fp8 vs bf16 {train['third_loss_rel_diff']:.2e}")
    return dict(mode="fp8", config=args.config, batch=args.batch, seq=args.seq, gemm=gemms, **train, ratio=ratio)
