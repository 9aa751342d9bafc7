"""Draw a simulated pipeline timeline as a PNG, in the style of the DualPipe README figures.

One row per rank (rank 0 at the top), time to the right; boxes coloured by op kind (F orange, input-gradient
B light green, full backward dark green, W blue, F&B split into its forward and backward parts inside one black
border), the micro-batch id written in each box wide enough for it. A rank's second model chunk (DualPipe's
reverse direction, DualPipeV's second leg of the V) is drawn in a lighter shade of the same colour.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from dsjax.pipeline.schedules import Kind
from dsjax.pipeline.simulator import Result

COLORS = {Kind.F: "#f0a830", Kind.B: "#9ad66b", Kind.BW: "#4caf3a", Kind.W: "#6cb4ee"}
_FONT = 7  # points


def _shade(color: str, chunk: int) -> tuple[float, float, float]:
    # Blend the second chunk's colour halfway to white: same hue, clearly lighter.
    return tuple(c + (1 - c) * 0.5 * chunk for c in to_rgb(color))


def plot_timeline(result: Result, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write ``result``'s timeline to ``path`` (PNG) and return the path.

    Args:
        result: a `simulator.simulate` result.
        path: output file; parent folders are created.
        title: figure title; by default the schedule, its size, the step time and the largest bubble.
    """
    sched = result.schedule
    total = float(result.total) or 1.0
    unit = float(min(c for c in (result.costs.F, result.costs.B, result.costs.W) if c > 0))
    width_in = min(max(8.0, 0.28 * total / unit + 1.5), 60.0)  # ~0.28 in per smallest op: room for a label
    fig = Figure(figsize=(width_in, 0.42 * sched.ranks + 1.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points_per_unit = (width_in * 0.9 * 72) / total  # approximate: the axes span ~90% of the figure width

    def box(x0: float, w: float, rank: int, color, label: str | None, edge: bool = True) -> None:
        ax.add_patch(
            Rectangle((x0, rank - 0.4), w, 0.8, facecolor=color, edgecolor="black" if edge else "none", lw=0.4)
        )
        if label is not None and w * points_per_unit >= 0.62 * _FONT * len(label) + 2:
            ax.text(x0 + w / 2, rank, label, ha="center", va="center", fontsize=_FONT)

    for rank, ops in enumerate(sched.ops):
        for op, t0, t1 in zip(ops, result.start[rank], result.end[rank]):
            x0, w = float(t0), float(t1 - t0)
            if w == 0:
                continue
            chunk = sched.chunk_id(op.microbatch, op.stage)
            if op.kind is Kind.FB:
                # Split in proportion F : B so both halves stay readable; one border marks the overlapped pair.
                f_w = w * float(result.costs.F) / float(result.costs.F + result.costs.B or 1)
                b_chunk = sched.chunk_id(op.b_microbatch, op.b_stage)
                box(x0, f_w, rank, _shade(COLORS[Kind.F], chunk), str(op.microbatch), edge=False)
                box(x0 + f_w, w - f_w, rank, _shade(COLORS[Kind.BW], b_chunk), str(op.b_microbatch), edge=False)
                ax.add_patch(Rectangle((x0, rank - 0.4), w, 0.8, fill=False, edgecolor="black", lw=1.2))
            else:
                box(x0, w, rank, _shade(COLORS[op.kind], chunk), str(op.microbatch))

    ax.set_xlim(0, total)
    ax.set_ylim(sched.ranks - 0.5, -0.5)
    ax.set_yticks(range(sched.ranks), [f"rank {r}" for r in range(sched.ranks)], fontsize=8)
    ax.set_xlabel("time", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    kinds = {op.kind for ops in sched.ops for op in ops}
    names = {Kind.F: "forward", Kind.BW: "backward", Kind.B: "backward for input", Kind.W: "backward for weights"}
    legend = [Patch(facecolor=COLORS[k], edgecolor="black", label=n) for k, n in names.items() if k in kinds]
    if Kind.FB in kinds:
        legend.append(Patch(facecolor="white", edgecolor="black", lw=1.2, label="overlapped F & B (thick border)"))
    if sched.ranks and any(len(sched.chunks(r)) > 1 for r in range(sched.ranks)):
        label = "reverse direction" if len(sched.placement) > 1 else "second stage of the rank (V)"
        legend.append(Patch(facecolor=_shade(COLORS[Kind.F], 1), edgecolor="black", label=f"lighter: {label}"))
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=7, frameon=False)
    if title is None:
        title = (
            f"{sched.kind}: {sched.ranks} ranks, {sched.stages} stages, {sched.microbatches} micro-batches; "
            f"step time {result.total}, largest bubble {max(result.bubble)}"
        )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
