"""The code main job in miniature: pretrain a small DeepSeek-V3-architecture model on a synthetic code corpus
(50% fill-in-the-middle, as DeepSeek-Coder), then GRPO with the execution reward only (fraction of a task's
assertions passed, run in the sandbox); held-out pass@1 and single-line infilling before and after.

  python scripts/code_rl.py [--out runs/code_rl] [--rl-steps N] [--pretrain-steps N] [--seed S]

Writes ``results.json`` (base_pass1, rl_pass1, infilling, seconds, ...), ``heldout.jsonl`` (the held-out tasks in
HumanEval's format: ``scripts/eval_code.py --problems`` reads it), ``transcripts.json``, ``base/`` (pretraining
run and weights) and ``rl/`` (GRPO metrics, ``rl.png``, checkpoints, final weights in ``rl/hf``).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import dataclasses
import sys

from dsjax.runtime import preload_allocator


def main(argv=None) -> int:
    from dsjax.coder.job import CodeJobConfig, run

    defaults = CodeJobConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/code_rl")
    p.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    p.add_argument("--rl-steps", type=int, default=defaults.rl_steps)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    jc = dataclasses.replace(defaults, pretrain_steps=args.pretrain_steps, rl_steps=args.rl_steps, seed=args.seed)
    r = run(jc, args.out, progress=not args.quiet)
    print(f"\n{r['heldout_tasks']} held-out tasks{'':6}{'base':>8}{'after GRPO':>12}")
    print(f"{'pass@1 (4 samples, T=1)':30}{r['base_pass1']:>8.1%}{r['rl_pass1']:>12.1%}")
    print(f"{'single-line infilling (greedy)':30}{r['base_infill_pass1']:>8.1%}{r['rl_infill_pass1']:>12.1%}")
    print(f"\npass@1 x{r['improvement']:.1f} in {r['seconds'] / 60:.1f} min; results in {args.out}/results.json")
    return 0


if __name__ == "__main__":
    preload_allocator()  # re-executes once with mimalloc (see dsjax/runtime.py)
    sys.exit(main())
