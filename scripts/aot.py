"""Compile a dsjax step for a TPU slice or a GPU host on this (CPU) machine and report per-chip memory, flops,
collectives and a roofline estimate.

  python scripts/aot.py --topology v5p:8x8x8 --model deepseek_v3 --step train --mesh data=8,expert=64 \
      --per-chip-batch 4 --seq 8192 [--set train.remat=full] [--json]

TPU needs libtpu (``pip install "jax[tpu]"``, part of the test extra); GPU hosts (``--topology 8xh200``) need the
CUDA plugin (the ``gpu`` extra). Exit codes: 0 fits, 2 does not fit or does not compile, 1 bad arguments.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices come from the topology, not the host

from dsjax.aot.cli import main

if __name__ == "__main__":
    sys.exit(main())
