"""``pipeline`` mode: the pipelined train step of each schedule vs the non-pipelined step on the same 8 devices.

The model and batch are `configs/train_tiny_pipeline.yaml`'s (``--run-config``; the common ``--config`` preset is
not used: a pipeline needs its MoE layers to split evenly into stages). The pipelined steps run on a 4 (stage) x 2
(data) mesh, the model cut into 4 stages (8 for DualPipeV, two per device); the non-pipelined step is the plain
`dsjax.train.step` with the batch split over all 8 devices (data parallel). Both steps are the whole update
(forward, backward, AdamW, bias update) from the same initial state and batch; the first step's losses must
agree to ``--loss-rtol``. ``ratio`` = non-pipelined / DualPipeV step time (> 1: the pipeline is faster).

On a CPU host the 8 "devices" share the host's cores, so this measures the executor's overheads (a unit-time
replay of the schedule, one ``ppermute`` per channel per step, the stage forward recomputed in B and W) more than
any pipelining gain; the bubble fractions the simulator predicts are printed beside the times.
"""

import argparse
import os
import statistics
import sys

from bench_common import machine_info, print_table, register, time_calls

DEVICES = 8
SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-config", default="configs/train_tiny_pipeline.yaml", help="run YAML (model, train)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override")
    p.add_argument("--stages", type=int, default=4, help="pipeline devices (x data = 8)")
    p.add_argument("--micro-batches", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--iters", type=int, default=5, help="timed steps per variant (the median is reported)")
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    p.add_argument("--loss-rtol", type=float, default=1e-5)


def _ensure_devices() -> None:
    """Re-execute with 8 host devices when the CPU backend has fewer (the flag must be set before it starts)."""
    import jax

    if jax.default_backend() == "cpu" and jax.device_count() < DEVICES:
        flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "XLA_FLAGS": flags.strip()})


@register("pipeline", "pipelined train step per schedule vs the non-pipelined step, 8-device CPU mesh", _args)
def pipeline(args: argparse.Namespace) -> dict:
    _ensure_devices()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dsjax.model import create_model
    from dsjax.pipeline import GENERATORS
    from dsjax.pipeline.simulator import simulate
    from dsjax.pipeline.train import make_pipeline_mesh, make_pipeline_train_step
    from dsjax.sharding import make_mesh
    from dsjax.train.config import load_run_config
    from dsjax.train.optim import make_optimizer
    from dsjax.train.step import init_train_state, jit_train_step, make_train_step

    data = DEVICES // args.stages
    sets = [f"train.batch_size={args.batch}", f"train.seq_len={args.seq}", f"mesh.data={data}", *args.set]
    rng = np.random.default_rng(args.seed)
    runs = {}
    for name in args.schedules:
        pp = [f"pipeline.schedule={name}", f"pipeline.stages={args.stages}",
              f"pipeline.micro_batches={args.micro_batches}"]  # fmt: skip
        runs[name] = load_run_config(args.run_config, [*sets, *pp])
    plain = load_run_config(args.run_config, [*sets, f"mesh.data={DEVICES}", "pipeline.schedule=none"])
    cfg, tc = plain.model, plain.train
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    ones = np.ones((args.batch, args.seq), np.int32)
    host_batch = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=ones.astype(bool), segment_ids=ones,
                      positions=np.broadcast_to(np.arange(args.seq, dtype=np.int32), ones.shape).copy())  # fmt: skip

    def build(mesh, make_step):
        with jax.set_mesh(mesh):
            model = create_model(cfg, seed=args.seed, mesh=mesh)
            tx = make_optimizer(tc, nnx.state(model, nnx.Param))
            graphdef, state = init_train_state(model, tx)
            shardings = jax.tree.map(lambda x: x.sharding, state)
            batch_sharding = NamedSharding(mesh, P(("data", "expert")))
            step = jit_train_step(make_step(graphdef, tx), shardings, batch_sharding)
            batch = jax.device_put(jax.tree.map(jnp.asarray, host_batch), batch_sharding)
        holder = {"state": state, "loss": None}

        def call():
            with jax.set_mesh(mesh):
                holder["state"], metrics = step(holder["state"], batch)
            holder["loss"] = holder["loss"] or float(metrics["loss"])  # the first step's (same initial state)
            jax.block_until_ready(holder["state"].params)

        return call, holder

    calls, holders = {}, {}
    calls["none"], holders["none"] = build(make_mesh(DEVICES, 1), lambda g, tx: make_train_step(g, cfg, tc, tx))
    for name, run in runs.items():
        mesh = make_pipeline_mesh(args.stages, data, 1)
        schedule = run.pipeline.make_schedule()

        def make(g, tx, schedule=schedule, mesh=mesh):
            return make_pipeline_train_step(g, cfg, tc, tx, schedule, mesh)

        calls[name], holders[name] = build(mesh, make)
    times = time_calls(calls, args.iters)
    step_s = {k: statistics.median(v) for k, v in times.items()}
    losses = {k: h["loss"] for k, h in holders.items()}
    loss_err = {k: abs(v - losses["none"]) / abs(losses["none"]) for k, v in losses.items()}
    rows, bubbles = [], {}
    for name in ["none", *runs]:
        bubble = ""
        if name != "none":
            sim = simulate(GENERATORS[name](args.stages, args.micro_batches))
            bubbles[name] = max(sim.bubble) / sim.total
            bubble = f"{bubbles[name]:.2f}"
        rows.append((name, f"{1e3 * step_s[name]:.0f}", f"{step_s['none'] / step_s[name]:.2f}", bubble,
                     f"{losses[name]:.6f}", f"{loss_err[name]:.1e}"))  # fmt: skip
    print(f"{cfg.num_hidden_layers}-layer model, batch {args.batch} x {args.seq}, {args.micro_batches} micro-batches, "
          f"pipeline {args.stages} stage x {data} data devices vs {DEVICES} data devices")  # fmt: skip
    print_table(("schedule", "ms/step", "speed vs none", "sim. bubble", "first loss", "rel. diff"), rows)
    ok = all(e <= args.loss_rtol for e in loss_err.values())
    failure = {} if ok else {"failure": f"first-step losses differ beyond {args.loss_rtol}: {loss_err}"}
    ratio = step_s["none"] / step_s["dualpipev"] if "dualpipev" in step_s else None
    return dict(mode="pipeline", ok=ok, ratio=ratio, step_s=step_s, first_loss=losses, loss_rel_diff=loss_err,
                sim_bubble_fraction=bubbles, stages=args.stages, data=data, micro_batches=args.micro_batches,
                batch=args.batch, seq=args.seq, iters=args.iters, machine=machine_info(),
                **failure)  # fmt: skip
