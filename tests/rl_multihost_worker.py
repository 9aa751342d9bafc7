"""One process of a (possibly multi-process) GRPO update, for ``tests/test_rl_multihost.py``.

  python tests/rl_multihost_worker.py --process-id I --num-processes N [--port P] --out FILE.npz
      [--total-devices D] [--rollout]

Simulates ``D / N`` CPU devices in this process (default ``D = 8``), joins a ``jax.distributed`` cluster of ``N``
processes on ``localhost:P`` (when ``N > 1``) and runs ``STEPS`` GRPO updates of a tiny model on the global
``2 x 4`` (data x expert) mesh: weights under the FSDP rules, the rollout batch's rows split over both axes, the
all-to-all expert dispatch. ``--total-devices 1`` runs the plain single-device update instead (no mesh).

Every process builds the same rollout batch from a fixed seed (its old and reference log-probs from the
unsharded model, computed locally: identical inputs in every run) and places it on the global sharding from its
own host copy. The last line of stdout is a JSON object with each step's metrics (replicated scalars) and per-leaf
sums of the final weights; process 0 also writes the final weights, gathered from every process, to ``FILE.npz``.
With ``--rollout`` it first samples completions with the sharded policy (``dsjax.infer.engine.generate`` under
the global mesh) and reports them (or the error) under ``"rollout"``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

from multihost_worker import join_cluster

STEPS = 3
NUM_SEQS = 16
# Per-step metrics reported (replicated scalars of the update)
METRICS = ("loss", "kl", "entropy", "grad_norm", "clipped_fraction", "ratio_mean", "sampler_logp_gap", "tis_ratio_mean")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (needed when --num-processes > 1)")
    parser.add_argument("--out", required=True, help="where process 0 writes the final weights (.npz)")
    parser.add_argument("--total-devices", type=int, default=8, help="simulated devices, all processes; 1: no mesh")
    parser.add_argument("--rollout", action="store_true", help="also sample with the sharded policy")
    args = parser.parse_args(argv)
    n, i, total = args.num_processes, args.process_id, args.total_devices
    if total % n:
        raise SystemExit(f"--num-processes must divide {total}")

    jax = join_cluster(n, i, total, args.port)
    jax.config.update("jax_numpy_rank_promotion", "raise")  # as tests/conftest.py

    import numpy as np
    import optax
    from flax import nnx
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    import dsjax
    from dsjax.rl import GRPOConfig
    from dsjax.rl.step import build_batch, make_grpo_step, make_logprob_fn
    from dsjax.sharding import FSDP_RULES, make_mesh, state_shardings
    from dsjax.train.step import init_train_state

    # tests/test_rl_sharded.py's model and GRPO settings (old and reference log-probs, beta > 0, mu = 2), one
    # layer fewer (one dense, one MoE layer: compiling dominates) and a smaller learning rate (at 1e-3 the clip
    # cuts nearly every token's policy gradient from the second step on).
    cfg = dsjax.ModelConfig.tiny(vocab_size=264, initializer_range=0.1, num_hidden_layers=2)
    grpo = GRPOConfig(G=4, epsilon=0.2, beta=0.04, mu=2, max_completion_length=8, learning_rate=1e-4)
    start = time.perf_counter()
    log = lambda what: print(f"[{time.perf_counter() - start:6.1f} s] {what}", file=sys.stderr, flush=True)

    # The rollout batch: the same on every process and in every run (the unsharded model's log-probs, computed
    # on this process's first device alone).
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, int(rng.integers(3, 9))).tolist() for _ in range(NUM_SEQS)]
    completions = [rng.integers(3, 256, int(rng.integers(1, 9))).tolist() for _ in range(NUM_SEQS)]
    sampler = [(-rng.uniform(0.5, 3.0, len(c))).tolist() for c in completions]
    batch = build_batch(prompts, completions, row_len=32, completion_logprobs=sampler)
    assert batch["tokens"].shape[0] == 8  # rows split evenly over the 8 devices
    batch["advantages"] = rng.normal(size=NUM_SEQS).astype(np.float32)
    model = dsjax.create_model(cfg, seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    logp = np.asarray(make_logprob_fn(graphdef)(params, rest, batch))
    batch["old_logp"] = logp - 0.01  # mu = 2: the rollout policy's, slightly off this one
    batch["ref_logp"] = logp + 0.02
    del params, rest
    log("rollout batch built")

    tx = optax.adamw(grpo.learning_rate)
    result: dict = {"process_index": i, "process_count": n, "device_count": jax.device_count()}
    if total == 1:
        graphdef, state = init_train_state(model, tx)
        step = make_grpo_step(graphdef, grpo, tx, NUM_SEQS)
        placed = batch
        mesh = None
    else:
        mesh = make_mesh(data=2, expert=4)  # over every process's devices
        # The same weights, each process placing its devices' blocks of them from its host copy (as a restore
        # from a checkpoint would; compiling create_model's sharded initialisation would double this run's time).
        graphdef, weights = nnx.split(model)
        weights = jax.tree.map(
            lambda w, s: _place(np.asarray(w), s), weights, state_shardings(weights, mesh, FSDP_RULES)
        )
        with jax.set_mesh(mesh):
            model = nnx.merge(graphdef, weights)
            graphdef, state = init_train_state(model, tx)
        embed = state.params["embed"].get_value().sharding
        assert not embed.is_fully_replicated and embed.is_fully_addressable == (n == 1)  # FSDP over all processes
        if args.rollout:
            result["rollout"] = _rollout(model, prompts, grpo, mesh)
        rows = NamedSharding(mesh, PartitionSpec(("data", "expert")))
        shardings = {k: rows for k in batch} | {"advantages": NamedSharding(mesh, PartitionSpec())}
        placed = {k: _place(v, shardings[k]) for k, v in batch.items()}
        step = make_grpo_step(graphdef, grpo, tx, NUM_SEQS,
                              forward_options=dict(dispatch="ep"),
                              state_shardings=jax.tree.map(lambda x: x.sharding, state),
                              batch_shardings=shardings)  # fmt: skip

    log("state initialised")
    seen = []
    for _ in range(STEPS):
        if mesh is None:
            state, metrics = step(state, placed)
        else:
            with jax.set_mesh(mesh):
                state, metrics = step(state, placed)
        seen.append(metrics)
        log(f"step {len(seen)} dispatched")
    seen = jax.device_get(seen)  # replicated scalars: every process can read them
    for key in METRICS:
        result[key] = [float(m[key]) for m in seen]
    result["finite"] = [bool(m["finite"]) for m in seen]
    result["step"] = int(jax.device_get(state.step))  # replicated

    # The final weights, whole on every process (each one gathers the blocks the others hold).
    flat = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
    gathered = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in flat.items()}
    result["param_sums"] = {k: float(v.astype(np.float64).sum()) for k, v in gathered.items()}
    if i == 0:
        np.savez(args.out, **gathered)
    log("weights gathered")
    result["seconds"] = round(time.perf_counter() - start, 1)
    if n > 1:
        multihost_utils.sync_global_devices("done")  # no process leaves while another still gathers
    print(json.dumps(result), flush=True)
    return 0


def _place(host, sharding):
    """A global array of ``sharding`` from the whole array, which every process holds: each device's block is cut
    from this process's copy (no transfer between processes)."""
    import jax

    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _rollout(model, prompts, grpo, mesh) -> dict:
    """Sample completions of the first prompts with the sharded policy; report them, or why it failed."""
    import jax

    from dsjax.infer.engine import generate

    try:
        with jax.set_mesh(mesh):
            res = generate(model, prompts[:8], max_new_tokens=grpo.max_completion_length, temperature=1.0, seed=0,
                           return_result=True)  # fmt: skip
        return {"ok": True, "tokens": [list(map(int, t)) for t in res.tokens],
                "logprobs": [list(map(float, lp)) for lp in res.logprobs]}  # fmt: skip
    except Exception as e:  # reported, not raised: the update still runs
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}


if __name__ == "__main__":
    sys.exit(main())
