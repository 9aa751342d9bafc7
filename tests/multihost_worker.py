"""One process of a (possibly multi-process) tiny pretraining run, for ``tests/test_multihost.py``.

  python tests/multihost_worker.py --process-id I --num-processes N --port P --out DIR [--rewind-to K]
      [--resume] [--resume-after-preemption] [--reference DIR] [--total-devices D] [--heartbeat-timeout S]
      [--compile-cache DIR] [--step-seconds S]

Simulates ``8 / N`` CPU devices in this process, joins a ``jax.distributed`` cluster of ``N`` processes on
``localhost:P`` (when ``N > 1``) and trains a small run on the global ``2 x 4`` (data x expert) mesh into ``DIR``,
which every process is given (orbax writes each checkpoint from all processes into one directory, so it must be
shared, as on a cluster's shared filesystem). With ``--rewind-to K`` it then deletes the checkpoints after step
``K`` and trains again with ``resume=True``: the run restores step ``K`` from the multi-process checkpoint and
recomputes the last steps. The last line of stdout is a JSON object with the losses this process saw.

For ``tests/test_faults.py``: ``--resume`` continues from the checkpoints in ``DIR`` (a restarted job);
``--reference DIR`` then trains the same run from scratch into another directory, uninterrupted, for comparison. A
run stopped by a preemption notice (SIGTERM to any one process) prints its JSON with ``"preempted"`` set to the
step all processes stopped after, and exits with ``PREEMPTED_EXIT_CODE``; with ``--resume-after-preemption`` it
prints that line and resumes from the checkpoint in the same process instead (a restart without the process
start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

TOTAL_DEVICES = 8

# A run small enough to compile and train in seconds on CPU, still covering MLA, routed experts split over the
# `expert` axis with the all-to-all dispatch, MTP, the data pipeline, asynchronous checkpointing and resume.
OVERRIDES = [
    "train.steps=6",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.batch_size=8",
    "train.seq_len=32",
    "train.warmup_steps=2",
    "train.dispatch=ep",
    "mesh.data=2",
    "mesh.expert=4",
    "model.num_hidden_layers=2",
    "model.hidden_size=64",
    "model.intermediate_size=96",
    "model.moe_intermediate_size=32",
    "model.num_attention_heads=2",
    "model.q_lora_rank=32",
    "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=16",
    "model.n_routed_experts=8",
    "model.num_experts_per_tok=2",
    "model.n_group=2",
    "model.topk_group=1",
    "data.num_docs=200",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (needed when --num-processes > 1)")
    parser.add_argument("--out", required=True, help="output directory, the same for every process")
    parser.add_argument("--rewind-to", type=int, default=None, help="then resume from this step's checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    parser.add_argument("--resume-after-preemption", action="store_true", help="resume in-process when preempted")
    parser.add_argument("--reference", help="then train the same run from scratch into this directory")
    parser.add_argument("--total-devices", type=int, default=TOTAL_DEVICES, help="simulated devices, all processes")
    parser.add_argument("--heartbeat-timeout", type=int, default=100, help="seconds until a silent peer is dead")
    parser.add_argument("--compile-cache", help="JAX persistent compilation cache directory (shared by the runs)")
    parser.add_argument("--step-seconds", type=float, default=0.0,
                        help="sleep after each step: JAX's preemption notifier polls once a second, and tiny steps "
                        "would finish the run before the processes agree on a stop step")  # fmt: skip
    args = parser.parse_args(argv)
    n, i, total = args.num_processes, args.process_id, args.total_devices
    if total % n:
        raise SystemExit(f"--num-processes must divide {total}")

    jax = join_cluster(n, i, total, args.port, heartbeat_timeout=args.heartbeat_timeout)
    if args.compile_cache:  # restarted jobs load the executables the first one compiled
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    from jax.experimental import multihost_utils

    from dsjax.train import loop
    from dsjax.train.config import load_run_config
    from dsjax.train.preemption import PREEMPTED_EXIT_CODE, Preempted

    # Record the metrics of every step as this process sees them (whether or not this process writes
    # metrics.jsonl): wrap the jitted step that train() builds.
    seen: list[dict] = []
    jit_train_step = loop.jit_train_step

    def recording_jit_train_step(*a, **kw):
        step_fn = jit_train_step(*a, **kw)

        def step(state, batch):
            state, metrics = step_fn(state, batch)
            seen.append({"loss": metrics["loss"], "ce": metrics["ce"], "load": metrics.get("load")})
            time.sleep(args.step_seconds)
            return state, metrics

        return step

    loop.jit_train_step = recording_jit_train_step

    def losses(last_step: int, start: float) -> dict:
        host = jax.device_get(seen)  # the metrics are replicated: every process can fetch them
        seen.clear()
        return {
            "seconds": round(time.perf_counter() - start, 1),
            "steps": list(range(last_step - len(host) + 1, last_step + 1)),
            "loss": [float(m["loss"]) for m in host],
            "ce": [float(m["ce"]) for m in host],
            "load": [None if m["load"] is None else m["load"].tolist() for m in host],
        }

    here = os.path.dirname(os.path.abspath(__file__))
    run = load_run_config(os.path.join(here, os.pardir, "configs", "train_tiny.yaml"), OVERRIDES + args.set)
    start = time.perf_counter()
    try:
        summary = loop.train(run, args.out, resume=args.resume, progress=False)
    except Preempted as e:
        result = {"process_index": i, "process_count": n, "preempted": e.step, "reason": e.reason,
                  **losses(e.step, start)}  # fmt: skip
        print(json.dumps(result), flush=True)
        if not args.resume_after_preemption:
            return PREEMPTED_EXIT_CODE
        start = time.perf_counter()
        summary = loop.train(run, args.out, resume=True, progress=False)
    result = {"process_index": i, "process_count": n, **losses(summary.steps, start)}
    if args.reference is not None:
        start = time.perf_counter()
        result["reference"] = losses(loop.train(run, args.reference, resume=False, progress=False).steps, start)

    if args.rewind_to is not None:
        ckpt_dir = os.path.join(args.out, "checkpoints")
        multihost_utils.sync_global_devices("trained")
        if i == 0:
            for name in os.listdir(ckpt_dir):
                if name.isdigit() and int(name) > args.rewind_to:
                    # As if the run had stopped at step K (moved aside in one rename, not deleted file by file).
                    shutil.move(os.path.join(ckpt_dir, name), tempfile.mkdtemp(dir=args.out))
        multihost_utils.sync_global_devices("rewound")
        start = time.perf_counter()
        summary = loop.train(run, args.out, resume=True, progress=False)
        result["resumed"] = losses(summary.steps, start)

    print(json.dumps(result), flush=True)
    return 0


def join_cluster(n: int, i: int, total: int, port: int, *, heartbeat_timeout: int = 100):
    """Start JAX as process ``i`` of ``n`` with ``total // n`` simulated CPU devices (joining the
    ``jax.distributed`` cluster on ``localhost:port`` when ``n > 1``) and return the ``jax`` module. Call it
    before anything imports jax: the CPU backend reads the device count once, when it starts."""
    # Overwrite rather than extend: the test runner's conftest exports its own XLA_FLAGS, which subprocesses
    # inherit. Optimisation level 0 (as tests/conftest.py) halves compile time, which dominates here.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={total // n} --xla_backend_optimization_level=0"
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    if n > 1:
        # Cross-process collectives on CPU run over TCP with Gloo (jax 0.10's default for
        # jax_cpu_collectives_implementation; set here so the test does not depend on the default). It must be
        # set before the CPU backend starts, i.e. before the first jax.devices() or computation.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"localhost:{port}", num_processes=n, process_id=i, initialization_timeout=120,
            heartbeat_timeout_seconds=heartbeat_timeout,
        )  # fmt: skip
    assert jax.process_count() == n and jax.process_index() == i
    assert jax.device_count() == total and jax.local_device_count() == total // n
    return jax


if __name__ == "__main__":
    sys.exit(main())
