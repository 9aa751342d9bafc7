"""Train the same model twice on the same data and seed, in bf16 and in DeepSeek's fine-grained FP8, and
compare the loss curves (DeepSeek-V3 App. B.1 reports a relative loss error under 0.25% at 16B scale).

  python scripts/fp8_vs_bf16.py [--config configs/train_tiny.yaml] [--set train.steps=400 ...] [--out DIR] [--json]

Both runs compute in bfloat16 (``train.compute_dtype``) with fp32 master weights; the FP8 run also sets
``model.fp8`` (MLA projections, dense MLPs, shared and routed experts as FP8 GEMMs, forward and backward).
A third run, bf16 with another seed (``--noise-seed``; data order and initialisation change), measures the
training randomness the FP8 gap is to be read against. Losses are logged every 2 steps; the final loss of a run
is its mean cross-entropy over the last ``--window`` steps (one batch's loss varies by several percent).
Writes ``DIR/{bf16,fp8,bf16_seed<N>}/`` (full training runs), ``DIR/fp8_vs_bf16.png`` and ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from dsjax.runtime import preload_allocator


def _curve(out_dir: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    from dsjax.train.metrics import read_jsonl

    records = [r for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if key in r]
    return np.array([r["step"] for r in records]), np.array([r[key] for r in records])


def _plot(path: str, curves: dict, gap_steps, gap) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_gap) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for name, (steps, values) in curves.items():
        ax.plot(steps, values, label=name)
    ax.set_ylabel("training cross-entropy (nats)")
    ax.set_title("Tiny DeepSeek-V3 model: bf16 vs fine-grained FP8")
    ax.legend()
    ax_gap.plot(gap_steps, 100 * gap, color="tab:red")
    ax_gap.axhline(0, color="gray", lw=0.5)
    ax_gap.set_ylabel("(fp8 - bf16) / bf16, %")
    ax_gap.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/train_tiny.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--out", default="runs/fp8_vs_bf16")
    parser.add_argument("--window", type=int, default=50, help="final steps averaged for the final loss")
    parser.add_argument("--noise-seed", type=int, default=1, help="seed of the bf16 noise run; < 0 skips it")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)

    from dsjax.config import ConfigError
    from dsjax.train.config import load_run_config
    from dsjax.train.loop import train

    common = ["train.log_every=2", *args.set, "train.compute_dtype=bfloat16"]
    results: dict = {"config": args.config, "overrides": args.set}
    runs = [("bf16", ["model.fp8=false"]), ("fp8", ["model.fp8=true"])]
    noise = f"bf16_seed{args.noise_seed}"
    if args.noise_seed >= 0:
        runs.append((noise, ["model.fp8=false", f"train.seed={args.noise_seed}"]))
    try:
        for name, extra in runs:
            run = load_run_config(args.config, [*common, *extra])
            summary = train(run, os.path.join(args.out, name), resume=False, progress=not args.quiet)
            results[f"{name}_tokens_per_s"] = summary.tokens_per_s
            results[f"{name}_skipped_steps"] = summary.skipped_steps
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    curves = {name: _curve(os.path.join(args.out, name), "ce") for name, _ in runs}
    steps, ce_b = curves["bf16"]
    if any(not np.array_equal(steps, s) for s, _ in curves.values()):
        raise RuntimeError("the runs logged different steps")
    last = steps > steps[-1] - args.window

    def final(name):
        return float(curves[name][1][last].mean())

    gap = (curves["fp8"][1] - ce_b) / ce_b
    results.update(
        steps=int(steps[-1]),
        window=[int(steps[last][0]), int(steps[-1])],
        bf16_final_ce=final("bf16"),
        fp8_final_ce=final("fp8"),
        relative_gap=(final("fp8") - final("bf16")) / final("bf16"),
    )
    if args.noise_seed >= 0:
        results["seed_noise_final_ce"] = final(noise)
        results["seed_noise_relative_gap"] = (final(noise) - final("bf16")) / final("bf16")
    plot_path = os.path.join(args.out, "fp8_vs_bf16.png")
    labels = {"bf16": "bf16", "fp8": "fp8 (E4M3, 1x128 / 128x128)", noise: f"bf16, seed {args.noise_seed}"}
    _plot(plot_path, {labels[name]: curve for name, curve in curves.items()}, steps, gap)
    results["plot"] = plot_path
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)

    print(f"steps {results['steps']}: final cross-entropy (mean over steps {results['window'][0]}-{steps[-1]})")
    print(f"  bf16 {final('bf16'):.4f}   fp8 {final('fp8'):.4f}   relative gap {100 * results['relative_gap']:+.3f}%")
    if args.noise_seed >= 0:
        print(
            f"  training randomness: bf16 seed {args.noise_seed} {final(noise):.4f}, "
            f"relative gap {100 * results['seed_noise_relative_gap']:+.3f}%"
        )
    print(
        f"  throughput on this machine: bf16 {results['bf16_tokens_per_s']:.0f} tok/s, "
        f"fp8 {results['fp8_tokens_per_s']:.0f} tok/s (CPU emulation; informational)"
    )
    print(f"  plot: {plot_path}")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    preload_allocator()  # re-executes once with mimalloc (see dsjax/runtime.py)
    sys.exit(main())
