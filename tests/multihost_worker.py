"""One process of a (possibly multi-process) tiny pretraining run, for ``tests/test_multihost.py``.

  python tests/multihost_worker.py --process-id I --num-processes N --port P --out DIR [--rewind-to K]

Simulates ``8 / N`` CPU devices in this process, joins a ``jax.distributed`` cluster of ``N`` processes on
``localhost:P`` (when ``N > 1``) and trains a small run on the global ``2 x 4`` (data x expert) mesh into ``DIR``,
which every process is given (orbax writes each checkpoint from all processes into one directory, so it must be
shared, as on a cluster's shared filesystem). With ``--rewind-to K`` it then deletes the checkpoints after step
``K`` and trains again with ``resume=True``: the run restores step ``K`` from the multi-process checkpoint and
recomputes the last steps. The last line of stdout is a JSON object with the losses this process saw.
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
    args = parser.parse_args(argv)
    n, i = args.num_processes, args.process_id
    if TOTAL_DEVICES % n:
        raise SystemExit(f"--num-processes must divide {TOTAL_DEVICES}")

    # Before jax is imported: the CPU backend reads the device count once, when it starts. Overwrite rather than
    # extend: the test runner's conftest exports its own XLA_FLAGS, which subprocesses inherit. Optimisation
    # level 0 (as tests/conftest.py) halves compile time, which dominates here.
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={TOTAL_DEVICES // n} --xla_backend_optimization_level=0"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    if n > 1:
        # Cross-process collectives on CPU run over TCP with Gloo (jax 0.10's default for
        # jax_cpu_collectives_implementation; set here so the test does not depend on the default). It must be
        # set before the CPU backend starts, i.e. before the first jax.devices() or computation.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"localhost:{args.port}", num_processes=n, process_id=i, initialization_timeout=120
        )
    assert jax.process_count() == n and jax.process_index() == i
    assert jax.device_count() == TOTAL_DEVICES and jax.local_device_count() == TOTAL_DEVICES // n

    from jax.experimental import multihost_utils

    from dsjax.train import loop
    from dsjax.train.config import load_run_config

    # Record the metrics of every step as this process sees them (whether or not this process writes
    # metrics.jsonl): wrap the jitted step that train() builds.
    seen: list[dict] = []
    jit_train_step = loop.jit_train_step

    def recording_jit_train_step(*a, **kw):
        step_fn = jit_train_step(*a, **kw)

        def step(state, batch):
            state, metrics = step_fn(state, batch)
            seen.append({"loss": metrics["loss"], "ce": metrics["ce"], "load": metrics.get("load")})
            return state, metrics

        return step

    loop.jit_train_step = recording_jit_train_step

    def losses(summary, start: float) -> dict:
        host = jax.device_get(seen)  # the metrics are replicated: every process can fetch them
        seen.clear()
        return {
            "seconds": round(time.perf_counter() - start, 1),
            "steps": list(range(summary.steps - len(host) + 1, summary.steps + 1)),
            "loss": [float(m["loss"]) for m in host],
            "ce": [float(m["ce"]) for m in host],
            "load": [None if m["load"] is None else m["load"].tolist() for m in host],
        }

    here = os.path.dirname(os.path.abspath(__file__))
    run = load_run_config(os.path.join(here, os.pardir, "configs", "train_tiny.yaml"), OVERRIDES + args.set)
    start = time.perf_counter()
    summary = loop.train(run, args.out, resume=False, progress=False)
    result = {"process_index": i, "process_count": n, **losses(summary, start)}

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
        result["resumed"] = losses(summary, start)

    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
