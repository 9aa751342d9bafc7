"""Simulate 1F1B, ZB1P, DualPipe and DualPipeV and compare them with Table 2 of the DeepSeek-V3 report.

For each number of pipeline stages PP (Table 2 compares schedules at the same PP: DualPipeV runs PP stages on
PP/2 ranks) and micro-batch count, prints the simulated bubble, peak activations and parameters per rank beside
the table's formula, then draws each schedule's timeline to <out>/<schedule>.png. Costs are exact fractions:
--costs F,B,W[,FB] with B the full backward and FB the overlapped F&B (default F+B); the default 1,2,1 is the
DualPipe figures' cost model, under which every formula of Table 2 is exact.

Usage: python scripts/pipeline_schedules.py [--ranks 4 8 16] [--microbatches 32 48] [--costs 3,5,2,6]
       [--plot-ranks 8 --plot-microbatches 20] [--out runs/pipeline]
"""

import argparse
from fractions import Fraction

from dsjax.pipeline import GENERATORS
from dsjax.pipeline.plot import plot_timeline
from dsjax.pipeline.simulator import Costs, simulate, table2


def parse_costs(text: str) -> Costs:
    """``F,B,W`` or ``F,B,W,FB`` (ints, decimals or fractions such as 3/2) -> `Costs`."""
    values = [Fraction(v) for v in text.split(",")]
    if len(values) not in (3, 4):
        raise argparse.ArgumentTypeError(f"--costs wants F,B,W or F,B,W,FB, got {text!r}")
    try:
        return Costs(*values)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def per_rank(values) -> str:
    """Per-rank values, collapsed to one when all ranks agree."""
    values = [str(v) for v in values]
    return values[0] if len(set(values)) == 1 else " ".join(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16], help="PP (stages) values of the table")
    parser.add_argument("--microbatches", type=int, nargs="+", help="micro-batch counts (default: 2PP and 3PP)")
    parser.add_argument("--costs", type=parse_costs, default=Costs(1, 2, 1), help="F,B,W[,FB] (default 1,2,1)")
    parser.add_argument("--plot-ranks", type=int, default=8, help="PP of the plotted timelines (Figure 5: 8)")
    parser.add_argument("--plot-microbatches", type=int, default=20, help="micro-batches plotted (Figure 5: 20)")
    parser.add_argument("--out", default="runs/pipeline", help="folder for <schedule>.png")
    args = parser.parse_args()
    costs = args.costs
    print(f"costs: F={costs.F} B={costs.B} W={costs.W} F&B={costs.fb} send={costs.send}")
    print("bubble, activations and parameters: the largest over ranks (as Table 2), then the per-rank values")
    print(
        f"{'schedule':10} {'PP':>3} {'ranks':>5} {'mb':>3} | {'bubble':>7} {'T2':>7} | {'act':>3} {'T2':>3} | "
        f"{'par':>3} {'T2':>3} | per-rank bubble; per-rank activations"
    )
    for pp in args.ranks:
        for mb in args.microbatches or (2 * pp, 3 * pp):
            for name, gen in GENERATORS.items():
                ranks = pp // 2 if name == "dualpipev" else pp
                try:
                    if name == "dualpipev" and pp % 2:
                        raise ValueError("DualPipeV needs an even number of stages (2 per rank)")
                    res = simulate(gen(ranks, mb), costs)
                except ValueError as e:
                    print(f"{name:10} {pp:>3} {ranks:>5} {mb:>3} | n/a: {e}")
                    continue
                bubble, params, act = table2(name, pp, costs)
                print(
                    f"{name:10} {pp:>3} {ranks:>5} {mb:>3} | {max(res.bubble)!s:>7} {bubble!s:>7} | "
                    f"{max(res.activations):>3} {act:>3} | {max(res.param_copies):>3} {params:>3} | "
                    f"{per_rank(res.bubble)}; {per_rank(res.activations)}"
                )
    for name, gen in GENERATORS.items():
        ranks = max(1, args.plot_ranks // 2) if name == "dualpipev" else args.plot_ranks
        try:
            sched = gen(ranks, args.plot_microbatches)
        except ValueError as e:
            print(f"not drawn: {e}")
            continue
        print(f"wrote {plot_timeline(simulate(sched, costs), f'{args.out}/{name}.png')}")


if __name__ == "__main__":
    main()
