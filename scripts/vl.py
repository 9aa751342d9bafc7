"""The vision-language job: a tiny DeepSeek-VL2 learns visual questions about synthetic shapes on a CPU.

  python scripts/vl.py                        # from scratch, seed 0: writes runs/vl/{results.json, heldout.png}
  python scripts/vl.py --trainable projector --trainable image_newline --trainable view_seperator

Scenes of one to three coloured circles / squares / triangles (32 x 32 px) with a question each about the
shape count, a shape's colour or its position (see ``dsjax/vision/job.py``); the model trains with the loss on
the answer only and answers held-out scenes greedily through the generation engine, before and after training.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import sys

from dsjax.runtime import preload_allocator
from dsjax.vision.job import JobConfig, run
from dsjax.vision.train import PARTS


def main(argv=None) -> int:
    d = JobConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/vl", help="output directory")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--patch-size", type=int, default=d.patch_size, help="tower patch size in pixels (8 or 4)")
    p.add_argument("--eval-size", type=int, default=d.eval_size, help="held-out examples (kinds cycle)")
    p.add_argument("--trainable", action="append", choices=PARTS, help="parts to train (repeat; default all)")
    args = p.parse_args(argv)
    cfg = JobConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    eval_size=args.eval_size, patch_size=args.patch_size,
                    trainable=tuple(args.trainable or PARTS))  # fmt: skip
    results = run(cfg, args.out)
    print(f"wrote {args.out}/results.json and {args.out}/heldout.png ({results['total_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    preload_allocator()  # re-executes once with mimalloc (see dsjax/runtime.py)
    sys.exit(main())
