"""R1-Zero in miniature, the project's main job: pretrain a small DeepSeek-V3-architecture model on a synthetic
corpus, then GRPO with rule rewards only; held-out pass@1 and format rate before and after.

  python scripts/r1_zero.py [--out runs/r1_zero] [--rl-steps N] [--pretrain-steps N] [--seed S] [--base RUN/base/hf]
                            [--set grpo.learning_rate=1e-4 --set questions=16 ...]

Writes ``results.json`` (base_pass1, rl_pass1, base_format, rl_format, seconds, train-rollout accuracy by window,
...), ``r1_zero.png`` (accuracy and mean response length over the GRPO steps, as in the R1 paper),
``transcripts_base.md`` / ``transcripts_rl.md`` (the same held-out problems before and after GRPO), ``base/``
(pretraining run, plots, weights), ``rl/`` (GRPO metrics, ``rl.png``, checkpoints, final weights in ``rl/hf``).

Exit code 75 (``PREEMPTED_EXIT_CODE``): a preemption notice (SIGTERM) stopped pretraining or GRPO after a
checkpointed step; the same command resumes it.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import dataclasses
import sys

from dsjax.runtime import preload_allocator


def with_overrides(zc, sets: list[str]):
    """``zc`` with ``KEY=VALUE`` overrides, values parsed as YAML scalars (``1e-4``, ``true``, ``null``)."""
    import yaml

    top, grpo = {}, {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        parsed = yaml.safe_load(value)
        name = key.removeprefix("grpo.")
        target, fields = (grpo, zc.grpo) if key.startswith("grpo.") else (top, zc)
        if name not in {f.name for f in dataclasses.fields(fields)} or name == "grpo":
            raise ValueError(f"--set {item!r}: no field {key!r}")
        if isinstance(parsed, str) and value.replace(".", "", 1).replace("e-", "", 1).isdigit():
            parsed = float(value)  # YAML 1.1 reads 1e-4 as a string
        target[name] = parsed
    return dataclasses.replace(zc, grpo=dataclasses.replace(zc.grpo, **grpo), **top)


def main(argv=None) -> int:
    from dsjax.rl.zero import ZeroConfig, run
    from dsjax.train.preemption import PREEMPTED_EXIT_CODE, Preempted

    defaults = ZeroConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/r1_zero")
    p.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    p.add_argument("--rl-steps", type=int, default=defaults.rl_steps)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a ZeroConfig field (questions=16) or a GRPOConfig one (grpo.learning_rate=1e-4)")  # fmt: skip
    p.add_argument("--base", default=None, metavar="HF_DIR",
                   help="start GRPO from an earlier run's base model (RUN/base/hf) instead of pretraining")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    zc = dataclasses.replace(defaults, pretrain_steps=args.pretrain_steps, rl_steps=args.rl_steps, seed=args.seed)
    try:
        zc = with_overrides(zc, args.set)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    try:
        r = run(zc, args.out, progress=not args.quiet, base_model=args.base)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    print(f"\n{'':14}{'base':>8}{'after GRPO':>12}")
    print(f"{'pass@1':14}{r['base_pass1']:>8.1%}{r['rl_pass1']:>12.1%}")
    print(f"{'format rate':14}{r['base_format']:>8.1%}{r['rl_format']:>12.1%}")
    print(f"{'length':14}{r['base_length']:>8.1f}{r['rl_length']:>12.1f}")
    print(
        f"\npass@1 x{r['improvement']:.1f} in {r['seconds'] / 60:.1f} min; results in {args.out}/results.json, "
        f"curves in r1_zero.png, transcripts in transcripts_base.md and transcripts_rl.md"
    )
    return 0


if __name__ == "__main__":
    preload_allocator()  # re-executes once with mimalloc (see dsjax/runtime.py)
    sys.exit(main())
