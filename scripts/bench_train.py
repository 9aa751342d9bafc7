"""``bench.py train``: train-step tokens/s and MFU of dsjax vs HF transformers + torch AdamW."""

import argparse
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import HF_IMPLS, REL_TOL, load_same_weights, machine_info, make_hf, print_table, register, time_calls
from flax import nnx

import dsjax


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

    def hf_with(impl):
        def call():
            hf.set_attn_implementation(impl[0])
            hf.set_experts_implementation(impl[1])
            return hf_step()

        return call

    # HF runs with its fastest attention/experts implementation on this machine (training steps to pick it).
    trials = time_calls({"/".join(i): hf_with(i) for i in HF_IMPLS}, iters=3)
    trials = {k: statistics.median(v) for k, v in trials.items()}
    best = min(trials, key=trials.get)
    hf.set_attn_implementation(best.split("/")[0])
    hf.set_experts_implementation(best.split("/")[1])
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
    print(f"ratio dsjax/HF: {tps['dsjax'] / tps['hf']:.2f}x (HF {best}, the fastest of {len(trials)} tried)")
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
        hf_impl=best,
        hf_trials_ms={k: round(1e3 * v, 1) for k, v in trials.items()},
        **machine_info(),
        ok=loss_err <= REL_TOL,
        failure=f"second-step losses differ by {loss_err:.2e}: the two sides do not train the same model",
    )
