"""Multi-host GRPO: the update under ``jax.distributed`` with two CPU processes on localhost (4 simulated devices
each, Gloo collectives, the global 2 x 4 data x expert mesh, FSDP weights, rows of the rollout batch split over
both axes, all-to-all expert dispatch) gives the metrics and weights of one process with 8 devices, and both give
the plain single-device update's; the sharded policy's rollouts under two processes are those of one process."""

import json

import chex
import numpy as np
import pytest
from rl_multihost_worker import METRICS, STEPS
from test_multihost import WORKER, _free_port, _run_all

RL_WORKER = WORKER.replace("multihost_worker.py", "rl_multihost_worker.py")


@pytest.mark.slow
def test_two_process_grpo_update_matches_one_process(tmp_path):
    port = _free_port()
    out = {name: str(tmp_path / f"{name}.npz") for name in ("one", "eight", "two")}
    jobs = {
        "one": ["--process-id", "0", "--num-processes", "1", "--total-devices", "1", "--out", out["one"]],
        "eight": ["--process-id", "0", "--num-processes", "1", "--out", out["eight"], "--rollout"],
    }
    for i in range(2):
        jobs[f"proc{i}"] = [
            *("--process-id", str(i), "--num-processes", "2", "--port", str(port), "--out", out["two"]),
            "--rollout",
        ]
    res = _run_all(jobs, tmp_path, RL_WORKER)
    one, eight, procs = res["one"], res["eight"], [res["proc0"], res["proc1"]]
    params = {name: dict(np.load(path)) for name, path in out.items()}

    assert (one["device_count"], eight["device_count"]) == (1, 8)
    for i, r in enumerate(procs):
        assert (r["process_index"], r["process_count"], r["device_count"]) == (i, 2, 8)
    for r in (one, eight, *procs):
        assert r["step"] == STEPS and r["finite"] == [True] * STEPS
    # Every metric is a replicated scalar and the weights are gathered whole: both processes see the same values.
    for key in (*METRICS, "param_sums"):
        assert procs[0][key] == procs[1][key], key
    two = procs[0]
    # Rollouts with the sharded policy: the two processes sample exactly what one 8-device process samples.
    for r in (eight, *procs):
        assert r["rollout"]["ok"], r["rollout"].get("traceback")
    assert procs[0]["rollout"] == procs[1]["rollout"] == eight["rollout"]
    assert sum(map(len, two["rollout"]["tokens"])) > len(two["rollout"]["tokens"])  # more than stop tokens
    assert 0 < two["clipped_fraction"][-1] < 1  # the later steps' ratios are off 1: the clip is at work

    # The same program on the same devices, only cross-process reductions (Gloo's all-reduce and all-to-all
    # instead of the in-process ones) may order float sums differently: agreement to float32 rounding.
    for key in METRICS:
        np.testing.assert_allclose(two[key], eight[key], rtol=1e-5, atol=1e-7, err_msg=key)
    chex.assert_trees_all_close(params["two"], params["eight"], atol=1e-6, rtol=1e-5)

    # Against the single-device update (every matmul and reduction partitioned differently): the tolerances of
    # tests/test_rl_sharded.py's one sharded step, here after three.
    for name, r in (("eight", eight), ("two", two)):
        for key in METRICS:
            np.testing.assert_allclose(r[key], one[key], rtol=1e-5, atol=1e-7, err_msg=f"{name} {key}")
        chex.assert_trees_all_close(params[name], params["one"], atol=2e-6, rtol=1e-4)

    runs = {"two": two, "eight": eight, "one": one}
    pairs = (("two", "eight"), ("two", "one"), ("eight", "one"))
    diffs = {f"{a}-{b}": _max_rel_diff(runs[a], runs[b], params[a], params[b]) for a, b in pairs}
    print(json.dumps({"seconds": {name: r["seconds"] for name, r in res.items()}, "max_rel_diff": diffs}))


def _max_rel_diff(a, b, pa, pb) -> dict:
    rel = lambda x, y: float(np.max(np.abs(np.subtract(x, y)) / np.maximum(np.abs(y), 1e-30)))
    out = {key: rel(a[key], b[key]) for key in METRICS}
    out["params_abs"] = max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa)
    return out
