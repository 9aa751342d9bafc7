"""Run outputs: JSONL metrics (truncated consistently on resume), TensorBoard scalars, PNG plots."""

from __future__ import annotations

import json
import os
import sys

import numpy as np


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: str, *, resume_step: int = 0):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        # Lines past the restored step belong to the interrupted run's lost future: drop them.
        kept = [r for r in read_jsonl(self.path) if r["step"] <= resume_step] if resume_step else []
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        SummaryWriter = _summary_writer_class()
        self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=resume_step or None)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._tb.close()


def _summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without torch: tensorboardX imports torch, if installed, only to
    accept torch tensors (we log floats), and that import alone takes ~2 s of every run's start-up."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_ratio(load_le: np.ndarray) -> np.ndarray:
    """Per layer max/min expert load (min floored at 1 token so an idle expert gives a finite, large ratio)."""
    return load_le.max(-1) / np.maximum(load_le.min(-1), 1.0)


def plot_run(
    records: list[dict], out_dir: str, *, unigram_entropy: float | None = None, layer_names: list[str] | None = None
) -> list[str]:
    """``loss.png`` (cross-entropy, MTP and balance losses) and ``expert_load.png`` (max/min load per layer
    over training, and the final load distribution). Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["ce"] for r in records], label="next-token CE")
    if any(r.get("mtp") for r in records):
        ax.plot(steps, [r["mtp"] for r in records], label="MTP CE (depth 1)")
    if unigram_entropy is not None:
        ax.axhline(unigram_entropy, color="gray", ls="--", label=f"unigram entropy {unigram_entropy:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.legend()
    ax.set_title("training loss")
    fig.tight_layout()
    written.append(os.path.join(out_dir, "loss.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    loads = [(r["step"], np.asarray(r["load"])) for r in records if "load" in r]
    if loads:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ratios = np.stack([load_ratio(load) for _, load in loads])
        names = layer_names or [f"MoE layer {i}" for i in range(ratios.shape[1])]
        for layer in range(ratios.shape[1]):
            ax1.plot([s for s, _ in loads], ratios[:, layer], label=names[layer])
        ax1.set_yscale("log")
        ax1.set_xlabel("step")
        ax1.set_ylabel("max / min expert load")
        ax1.legend(fontsize=7)
        final = loads[-1][1]
        image = ax2.imshow(final / final.mean(-1, keepdims=True), aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=ax2)
        ax2.set_yticks(range(len(names)), names, fontsize=7)
        ax2.set_xlabel("expert")
        ax2.set_title("final load / mean load")
        fig.tight_layout()
        written.append(os.path.join(out_dir, "expert_load.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
