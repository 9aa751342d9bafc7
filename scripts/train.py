"""Pretrain a DeepSeek-V2/V3-architecture model.

  python scripts/train.py --config configs/train_tiny.yaml [--set train.steps=200 --set mesh.data=2] [--out DIR]

Resumes from the latest checkpoint in ``--out`` unless ``--no-resume``. Writes ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/``, ``loss.png``, ``expert_load.png`` and ``summary.json``. Under several
processes call with ``--distributed`` (``jax.distributed.initialize`` reads the cluster from the environment).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/train_tiny.yaml", help="run YAML (model/data/train/mesh)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override")
    parser.add_argument("--out", default="runs/train_tiny", help="output directory")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --out")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.distributed:
        jax.distributed.initialize()

    from dsjax.config import ConfigError
    from dsjax.train.config import load_run_config
    from dsjax.train.loop import TrainingDiverged, train

    try:
        run = load_run_config(args.config, args.set)
        summary = train(run, args.out, resume=not args.no_resume, progress=not args.quiet)
    except (ConfigError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(json.dumps(dataclasses_asdict(summary), indent=2))
    return 0


def dataclasses_asdict(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)


if __name__ == "__main__":
    sys.exit(main())
