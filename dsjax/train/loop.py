"""The pretraining loop: data -> jitted sharded step -> metrics, checkpoints, resume, plots.

One code path for a CPU laptop and a multi-host accelerator cluster: the mesh comes from the run config, each
process feeds its slice of the global batch, and the step is compiled with explicit shardings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.checkpoint.hf import save_pretrained
from dsjax.config import ConfigError
from dsjax.data.corpus import default_corpus, unigram_entropy
from dsjax.data.pipeline import make_pretrain_iterator
from dsjax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from dsjax.model import create_model
from dsjax.sharding import DEFAULT_RULES, FSDP_RULES, make_mesh
from dsjax.train.checkpoint import TrainCheckpointer
from dsjax.train.config import RunConfig, run_config_to_dict
from dsjax.train.metrics import MetricsLog, load_ratio, plot_run, read_jsonl
from dsjax.train.optim import make_optimizer
from dsjax.train.step import init_train_state, jit_train_step, make_train_step


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def load_tokenizer(spec: str) -> Tokenizer:
    return ByteTokenizer() if spec == "byte" else HFTokenizer.from_file(spec)


def load_documents(spec: str, num_docs: int, seed: int) -> list[str]:
    """The embedded corpus (``default``), a ``.txt`` file (documents separated by blank lines) or ``.jsonl``
    (one ``{"text": ...}`` per line)."""
    if spec == "default":
        return default_corpus(num_docs=num_docs, seed=seed)
    if not os.path.exists(spec):
        raise ConfigError(f"data.corpus: {spec} does not exist")
    with open(spec) as f:
        if spec.endswith(".jsonl"):
            docs = [json.loads(line)["text"] for line in f if line.strip()]
        else:
            docs = [d.strip() for d in f.read().split("\n\n") if d.strip()]
    if not docs:
        raise ConfigError(f"data.corpus: no documents in {spec}")
    return docs


@dataclasses.dataclass
class RunSummary:
    steps: int
    final_loss: float
    final_ce: float
    unigram_entropy: float
    tokens_per_s: float
    skipped_steps: int
    load_ratio: list[float]
    out_dir: str


def train(run: RunConfig, out_dir: str, *, resume: bool = True, progress: bool = True) -> RunSummary:
    """Train ``run`` writing checkpoints, ``metrics.jsonl``, TensorBoard logs, plots and the final weights in HF
    format (``out_dir/hf``, single-process runs) into ``out_dir``.

    With ``resume`` and a checkpoint in ``out_dir/checkpoints``, training continues from it: weights, routing
    biases, optimizer moments, step and data position are restored, so the losses continue exactly. Under
    several processes every process calls this with the same ``out_dir`` on a shared filesystem.
    """
    tc = run.train
    tokenizer = load_tokenizer(run.data.tokenizer)
    if tokenizer.vocab_size > run.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={run.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}"
        )
    docs = load_documents(run.data.corpus, run.data.num_docs, tc.seed)
    entropy = unigram_entropy(tokenizer.encode(d) for d in docs[:2000])

    if jax.process_count() > 1 and run.mesh.data * run.mesh.expert != jax.device_count():
        # A smaller mesh would take the first processes' devices only and leave the others without batch rows.
        raise ConfigError(
            f"mesh: {run.mesh.data}x{run.mesh.expert} must cover all {jax.device_count()} devices of the "
            f"{jax.process_count()} processes"
        )
    mesh = make_mesh(run.mesh.data, run.mesh.expert)
    compute_dtype = jnp.dtype(tc.compute_dtype)
    # Every process runs this function; orbax coordinates the checkpoint writes of all processes itself (into
    # out_dir/checkpoints, which must be one shared directory), and process 0 alone writes the other files.
    is_writer = jax.process_index() == 0
    if is_writer:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "run_config.json"), "w") as f:
            json.dump(run_config_to_dict(run), f, indent=2)

    with jax.set_mesh(mesh):
        rules = FSDP_RULES if run.mesh.fsdp else DEFAULT_RULES
        model = create_model(
            run.model, seed=tc.seed, mesh=mesh, rules=rules, dtype=compute_dtype, param_dtype=jnp.float32
        )
        tx = make_optimizer(tc, nnx.state(model, nnx.Param))
        graphdef, state = init_train_state(model, tx)
        del model
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        batch_sharding = NamedSharding(mesh, P(("data", "expert")))
        step_fn = jit_train_step(make_train_step(graphdef, run.model, tc, tx), state_shardings, batch_sharding)

        data = make_pretrain_iterator(
            docs, tokenizer, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=tc.seed, fim_rate=run.data.fim_rate
        )
        ckpt = TrainCheckpointer(
            os.path.join(out_dir, "checkpoints"), keep=tc.keep_checkpoints, every=tc.checkpoint_every
        )
        start = 0
        if resume and ckpt.latest_step() is not None:
            state, data_state = ckpt.restore(state)
            data.set_state(data_state)
            start = int(state.step)
        log = MetricsLog(out_dir, resume_step=start) if is_writer else None
        # A resumed (or already finished) run reports its last logged step until it logs a new one.
        previous = read_jsonl(log.path) if is_writer else []
        summary, state = _loop(
            run, state, step_fn, data, ckpt, log, batch_sharding, start, progress and is_writer, previous[-1:]
        )
        if jax.process_count() == 1:  # multi-host runs convert the orbax checkpoint instead (scripts/convert.py)
            # The final weights in HF format, for generation, evaluation and other tools (scripts/generate.py).
            save_pretrained(nnx.merge(graphdef, state.params, state.rest), os.path.join(out_dir, "hf"))
    summary.update(unigram_entropy=entropy, out_dir=out_dir)
    if is_writer:
        first = run.model.first_k_dense_replace
        names = [f"layer {first + i}" for i in range(run.model.num_moe_layers)]
        names += [f"MTP {k + 1}" for k in range(run.model.num_nextn_predict_layers)]
        plot_run(read_jsonl(log.path), out_dir, unigram_entropy=entropy, layer_names=names)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return RunSummary(**summary)


def _to_global(batch: dict, sharding: NamedSharding) -> dict:
    # Each process holds its rows of the global batch; assemble the global (sharded) arrays from them.
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def _loop(run, state, step_fn, data, ckpt, log, batch_sharding, start, progress, previous) -> dict:
    from tqdm import tqdm

    tc = run.train
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, dynamic_ncols=True, unit="step")
    tokens_seen, timer, last = 0, time.perf_counter(), (previous[0] if previous else {})
    compile_end = None
    try:
        for step in range(start, tc.steps):
            batch = _to_global(next(data), batch_sharding)
            state, metrics = step_fn(state, batch)
            if compile_end is None:  # the first step includes compilation: keep it out of tokens/s
                jax.block_until_ready(state.step)
                compile_end = timer = time.perf_counter()
            else:
                tokens_seen += tc.batch_size * tc.seq_len
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                host = jax.device_get(metrics)
                elapsed = time.perf_counter() - timer
                record = {k: float(v) for k, v in host.items() if k != "load"}
                record.update(step=done, tokens_per_s=tokens_seen / elapsed if elapsed > 0 else 0.0)
                if "load" in host:
                    record["load"] = np.asarray(host["load"]).tolist()
                    record["load_ratio_max"] = float(load_ratio(np.asarray(host["load"])).max())
                if log is not None:  # None on processes other than 0
                    log.write(record)
                last = record
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                run_length = int(state.nonfinite_run)
                if run_length >= tc.max_nonfinite_run:
                    raise TrainingDiverged(
                        f"{run_length} consecutive steps with a non-finite loss or gradient at step {done}; "
                        "updates were skipped and no checkpoint holds them. Lower train.lr or check the data."
                    )
            saved = ckpt.save(done, state, data.get_state())
            bar.update(1)
        if start < tc.steps and not saved:  # the final state is always checkpointed
            ckpt.save(tc.steps, state, data.get_state(), force=True)
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        if log is not None:
            log.close()
    summary = dict(
        steps=int(state.step),
        final_loss=last.get("loss", float("nan")),
        final_ce=last.get("ce", float("nan")),
        tokens_per_s=last.get("tokens_per_s", 0.0),
        skipped_steps=int(state.nonfinite_total),
        load_ratio=load_ratio(np.asarray(last["load"])).tolist() if "load" in last else [],
    )
    return summary, state
