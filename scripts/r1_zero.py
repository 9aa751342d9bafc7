"""R1-Zero in miniature, the project's main job: pretrain a small DeepSeek-V3-architecture model on a synthetic
corpus, then GRPO with rule rewards only; held-out pass@1 and format rate before and after.

  python scripts/r1_zero.py [--out runs/r1_zero] [--rl-steps N] [--pretrain-steps N] [--seed S]

Writes ``results.json`` (base_pass1, rl_pass1, base_format, rl_format, seconds, ...), ``base/`` (pretraining run,
plots, weights), ``rl/`` (GRPO metrics, ``rl.png``, checkpoints, final weights in ``rl/hf``).

Exit code 75 (``PREEMPTED_EXIT_CODE``): a preemption notice (SIGTERM) stopped pretraining or GRPO after a
checkpointed step; the same command resumes it.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import dataclasses
import sys

from dsjax.runtime import preload_allocator


def main(argv=None) -> int:
    from dsjax.rl.zero import ZeroConfig, run
    from dsjax.train.preemption import PREEMPTED_EXIT_CODE, Preempted

    defaults = ZeroConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/r1_zero")
    p.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    p.add_argument("--rl-steps", type=int, default=defaults.rl_steps)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    zc = dataclasses.replace(defaults, pretrain_steps=args.pretrain_steps, rl_steps=args.rl_steps, seed=args.seed)
    try:
        r = run(zc, args.out, progress=not args.quiet)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    print(f"\n{'':14}{'base':>8}{'after GRPO':>12}")
    print(f"{'pass@1':14}{r['base_pass1']:>8.1%}{r['rl_pass1']:>12.1%}")
    print(f"{'format rate':14}{r['base_format']:>8.1%}{r['rl_format']:>12.1%}")
    print(f"{'length':14}{r['base_length']:>8.1f}{r['rl_length']:>12.1f}")
    print(f"\npass@1 x{r['improvement']:.1f} in {r['seconds'] / 60:.1f} min; results in {args.out}/results.json")
    return 0


if __name__ == "__main__":
    preload_allocator()  # re-executes once with mimalloc (see dsjax/runtime.py)
    sys.exit(main())
