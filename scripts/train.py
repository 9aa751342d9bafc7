"""Pretrain a DeepSeek-V2/V3-architecture model.

  python scripts/train.py --config configs/train_tiny.yaml [--set train.steps=200 --set mesh.data=2] [--out DIR]

Pipeline parallelism: a ``pipeline`` section (or ``--set pipeline.schedule=dualpipev --set pipeline.stages=4
--set pipeline.micro_batches=8``) adds a ``stage`` mesh axis in front of ``data`` x ``expert``, e.g. on the
8-device CPU mesh (``XLA_FLAGS=--xla_force_host_platform_device_count=8``):
``--config configs/train_tiny_pipeline.yaml``; outputs, checkpoints and resume are the same.

Resumes from the latest checkpoint in ``--out`` unless ``--resume none`` (``--no-resume``); ``--resume fallback``
resumes from the newest checkpoint that is not damaged and then moves the damaged newer ones aside (a checkpoint
saved with another model config is an error, and nothing is moved). Writes ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/``, ``loss.png``, ``expert_load.png`` and ``summary.json``. Under several
processes call with ``--distributed`` (``jax.distributed.initialize`` reads the cluster from the environment)
or ``--coordinator HOST:PORT --num-processes N --process-id I``; ``--out`` must then be a shared directory.

Exit codes: 0 done; 1 a configuration, data, checkpoint or divergence error (message on stderr); 75
(``PREEMPTED_EXIT_CODE``) stopped by a preemption notice (SIGTERM) or ``train.max_runtime_s`` after saving a
checkpoint: run the same command again to resume. When another process of a multi-process run dies, JAX stops
this one (within ``--heartbeat-timeout`` seconds) with "the JAX distributed service detected fatal errors".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax

from dsjax.runtime import preload_allocator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/train_tiny.yaml", help="run YAML (model/data/train/mesh)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override")
    parser.add_argument("--out", default="runs/train_tiny", help="output directory")
    parser.add_argument(
        "--resume",
        choices=("latest", "fallback", "none"),
        default="latest",
        help="latest: resume from the newest checkpoint; fallback: skip damaged ones; none: start over",
    )
    parser.add_argument("--no-resume", action="store_true", help="the same as --resume none")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (else detected from the cluster environment)")
    parser.add_argument("--num-processes", type=int, help="number of processes (with --coordinator)")
    parser.add_argument("--process-id", type=int, help="this process's index (with --coordinator)")
    parser.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=100,
        metavar="S",
        help="multi-process: stop when another process has been silent this long (JAX's default)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.distributed or args.coordinator:
        # Without arguments jax detects SLURM, Open MPI, Kubernetes or TPU clusters; elsewhere name them.
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
            heartbeat_timeout_seconds=args.heartbeat_timeout,
        )  # fmt: skip

    from dsjax.checkpoint.safetensors_io import CheckpointError
    from dsjax.config import ConfigError
    from dsjax.train.config import load_run_config
    from dsjax.train.loop import TrainingDiverged, train
    from dsjax.train.preemption import PREEMPTED_EXIT_CODE, Preempted

    try:
        run = load_run_config(args.config, args.set)
        summary = train(run, args.out, resume="none" if args.no_resume else args.resume, progress=not args.quiet)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except (ConfigError, TrainingDiverged, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(json.dumps(dataclasses.asdict(summary), indent=2))
    return 0


if __name__ == "__main__":
    preload_allocator()  # re-executes once with mimalloc (see dsjax/runtime.py)
    sys.exit(main())
