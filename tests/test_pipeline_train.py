"""Pipelined pretraining: the run config's ``pipeline`` section, and `scripts/train.py` running ZB1P (B/W split,
W from B's kept residuals) on the 8-device CPU mesh (2 stage x 4 data devices), killed with SIGKILL after a
checkpoint and resumed, logging the losses of the plain (non-pipelined) run to float32 round-off, with the same
outputs (metrics, checkpoints, HF weights, summary). (ZB1P over 2 devices is the cheapest schedule to compile
that has every executor path but FB; DualPipeV runs through the same step in the model tests.)"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dsjax.train.config import ConfigError, load_run_config
from dsjax.train.loop import train
from dsjax.train.metrics import read_jsonl

CONFIG = "configs/train_tiny_pipeline.yaml"
SMALL = [
    "model.num_hidden_layers=3", "model.hidden_size=32", "model.intermediate_size=48",
    "model.moe_intermediate_size=16", "model.n_routed_experts=8", "model.num_experts_per_tok=2", "model.n_group=2",
    "model.topk_group=1", "model.q_lora_rank=16", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
    "model.qk_rope_head_dim=8", "model.v_head_dim=8", "data.num_docs=200", "train.batch_size=16",
    "train.seq_len=16", "train.log_every=1", "train.steps=8", "train.checkpoint_every=2",
    "train.keep_checkpoints=2", "train.warmup_steps=2", "mesh.data=4",
    "pipeline.schedule=zb1p", "pipeline.stages=2", "pipeline.micro_batches=4",
]  # fmt: skip


def test_pipeline_section_is_validated():
    run = load_run_config(CONFIG)
    assert (run.pipeline.schedule, run.pipeline.stages, run.pipeline.micro_batches) == ("dualpipev", 4, 8)
    assert run.pipeline.make_schedule().stages == 8
    assert not load_run_config("configs/train_tiny.yaml").pipeline.enabled
    cases = {
        "pipeline.schedule": ["pipeline.schedule=gpipe"],
        "microbatches \\(6\\) must be >= 2 \\* ranks": ["pipeline.micro_batches=6"],
        "must be >= 1 with schedule": ["pipeline.micro_batches=0"],
        "7 MoE layers do not split evenly into 8 pipeline stages": ["model.num_hidden_layers=8"],
        "ranks must be even": ["pipeline.schedule=dualpipe", "pipeline.stages=3"],
        "do not split over the 2x1 mesh": ["train.batch_size=8"],
        "unknown fields": ["pipeline.chunks=2"],
    }
    for message, sets in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_run_config(CONFIG, sets)


@pytest.mark.slow
def test_pipelined_run_killed_and_resumed_matches_sequential(tmp_path):
    args = [a for s in SMALL for a in ("--set", s)]
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "train.py")
    out = tmp_path / "pipelined"
    # The killed run compiles the step once; the resumed run (in this process, same XLA flags) finds it in the
    # suite's persistent compilation cache.
    proc = subprocess.Popen([sys.executable, script, "--quiet", "--config", CONFIG, "--out", str(out), *args],
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 900
    while not (out / "checkpoints" / "2").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    killed_at = max(r["step"] for r in read_jsonl(str(out / "metrics.jsonl")))
    assert 2 <= killed_at < 8, "the run finished before it could be killed; make it longer"

    resumed = train(load_run_config(CONFIG, SMALL), str(out), resume=True, progress=False)
    plain = train(load_run_config(CONFIG, [*SMALL, "pipeline.schedule=none"]), str(tmp_path / "plain"),
                  resume=False, progress=False)  # fmt: skip
    a, b = read_jsonl(str(tmp_path / "plain" / "metrics.jsonl")), read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "ce", "mtp", "balance", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=2e-5), (ra["step"], key)
        np.testing.assert_allclose(rb["load"], ra["load"], atol=2)  # a near-tie may route one token differently
    assert resumed.steps == plain.steps == 8
    assert resumed.final_loss == pytest.approx(plain.final_loss, rel=2e-5)
    for name in ("summary.json", "loss.png", "hf/config.json", "run_config.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "run_config.json").read_text())["pipeline"]["schedule"] == "zb1p"
