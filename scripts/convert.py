"""Convert DeepSeek-V2/V3 checkpoints between Hugging Face safetensors and orbax.

  python scripts/convert.py hf-to-orbax SRC DST [--dtype float32|bfloat16]
  python scripts/convert.py orbax-to-hf SRC DST [--dtype float32|bfloat16] [--max-shard-gb N]

``--dtype`` is the dtype the weights are loaded in and written as (the router and routing bias stay fp32).
The default, float32, is lossless for any source; pass bfloat16 to halve the size of a bf16 checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp

import dsjax
from dsjax.checkpoint.orbax_io import load_orbax, save_orbax

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("hf-to-orbax", "HF safetensors directory -> orbax checkpoint"),
        ("orbax-to-hf", "orbax checkpoint -> HF safetensors directory"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("src", help="source checkpoint directory")
        p.add_argument("dst", help="destination directory (an existing checkpoint there is replaced)")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype")
        if name == "orbax-to-hf":
            p.add_argument("--max-shard-gb", type=float, default=4.0, help="shard size limit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    try:
        if args.command == "hf-to-orbax":
            model = dsjax.from_pretrained(args.src, dtype=dtype)
            save_orbax(model, args.dst)
            written = "orbax checkpoint"
        else:
            model = load_orbax(args.src, dtype=dtype)
            files = dsjax.save_pretrained(model, args.dst, max_shard_bytes=int(args.max_shard_gb * 2**30))
            written = f"{len(files)} safetensors file(s)"
    except (dsjax.CheckpointError, dsjax.ConfigError) as e:  # a bad input, not a bug: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = dsjax.count_params(model, include_mtp=True)
    print(
        f"{args.command}: {args.src} -> {args.dst}: {n:,} parameters ({args.dtype}) as {written} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
