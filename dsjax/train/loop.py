"""The pretraining loop: data -> jitted sharded step -> metrics, checkpoints, resume, plots.

One code path for a CPU laptop and a multi-host accelerator cluster: the mesh comes from the run config, each
process feeds its slice of the global batch, and the step is compiled with explicit shardings. With a
``pipeline`` section the mesh gains a ``stage`` axis and the step computes its loss and gradients with the
pipeline schedule (`dsjax.pipeline.train`); state, checkpoints, metrics and exports are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
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
from dsjax.data.pipeline import SkippedDocuments, make_pretrain_iterator, screen_documents
from dsjax.data.repo import REPO_PREFIX, load_repository_corpus
from dsjax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from dsjax.model import create_model
from dsjax.pipeline.train import make_pipeline_mesh, make_pipeline_train_step
from dsjax.sharding import DEFAULT_RULES, FSDP_RULES, make_mesh, use_mesh
from dsjax.train.checkpoint import TrainCheckpointer
from dsjax.train.config import RunConfig, run_config_to_dict
from dsjax.train.metrics import MetricsLog, load_ratio, plot_run, read_jsonl
from dsjax.train.optim import make_optimizer
from dsjax.train.preemption import Preempted, StopGuard
from dsjax.train.step import init_train_state, jit_train_step, make_train_step

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def load_tokenizer(spec: str) -> Tokenizer:
    return ByteTokenizer() if spec == "byte" else HFTokenizer.from_file(spec)


def load_documents(
    spec: str, num_docs: int, seed: int, *, skipped: SkippedDocuments | None = None, locations: list | None = None
) -> list:
    """The embedded corpus (``default``), a ``.txt`` file (documents separated by blank lines), ``.jsonl``
    (one ``{"text": ...}`` or pre-tokenised ``{"ids": [...]}`` per line) or ``repo:<dir or .jsonl>``
    (repository-level code, :mod:`dsjax.data.repo`).

    For files, unparseable JSONL lines are counted in ``skipped`` (raised as ``ConfigError`` without it) and
    ``locations`` (if given) receives each returned document's place in the file, for
    :func:`~dsjax.data.pipeline.screen_documents`'s messages.
    """
    if spec == "default":
        return default_corpus(num_docs=num_docs, seed=seed)
    if spec.startswith(REPO_PREFIX):
        try:
            return load_repository_corpus(spec[len(REPO_PREFIX) :])
        except ValueError as e:
            raise ConfigError(f"data.corpus: {e}") from e
    if not os.path.exists(spec):
        raise ConfigError(f"data.corpus: {spec} does not exist")
    # Undecodable bytes become lone surrogates instead of failing the whole file: screen_documents counts the
    # documents that hold them as non-UTF-8 and leaves them out.
    with open(spec, encoding="utf-8", errors="surrogateescape") as f:
        if spec.endswith(".jsonl"):
            docs = _parse_jsonl(f, skipped, locations)
        else:
            docs = [d.strip() for d in f.read().split("\n\n") if d.strip()]
            if locations is not None:
                locations += [f"document {i + 1}" for i in range(len(docs))]
    if not docs and not (skipped and skipped.total):
        raise ConfigError(f"data.corpus: no documents in {spec}")
    return docs


def _parse_jsonl(lines, skipped: SkippedDocuments | None, locations: list[str] | None) -> list:
    # One {"text": str} or {"ids": [int, ...]} (pre-tokenised content) per line; a line that is not that is
    # counted as corrupt (with its line number), not fatal.
    docs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            doc = record["text"] if "text" in record else record["ids"]
            if not isinstance(doc, str) and not (isinstance(doc, list) and all(type(i) is int for i in doc)):
                raise TypeError(f"expected a string or a list of ints, got {type(doc).__name__}")
        except (ValueError, KeyError, TypeError):  # JSONDecodeError is a ValueError
            if skipped is None:
                raise ConfigError(
                    f"data.corpus: line {number} is not a {{'text': ...}} or {{'ids': ...}} record"
                ) from None
            skipped.add("corrupt", f"line {number}")
            continue
        docs.append(doc)
        if locations is not None:
            locations.append(f"line {number}")
    return docs


def check_skipped(skipped: SkippedDocuments, kept: int, corpus: str, max_fraction: float) -> None:
    """Raise :class:`ConfigError` when no document of ``corpus`` is usable, or more than ``max_fraction`` of them
    were left out (``data.max_skipped_fraction``): a wrong field name or encoding would otherwise train on the few
    documents that happen to fit, with only a warning."""
    if not kept:
        raise ConfigError(f"data.corpus: no usable documents in {corpus} ({skipped.describe()})")
    total = skipped.total + kept
    if skipped.total > max_fraction * total:
        raise ConfigError(
            f"data.corpus: {skipped.total} of {total} documents in {corpus} ({skipped.total / total:.0%}) cannot be "
            f"trained on, more than data.max_skipped_fraction={max_fraction:g}: {skipped.describe()}. Fix the corpus "
            '(JSONL lines need a "text" string or an "ids" list), or raise data.max_skipped_fraction to train on '
            "the rest."
        )


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
    data_skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # documents left out, by reason


RESUME_MODES = ("latest", "fallback", "none")


def _resume_mode(resume: bool | str) -> str:
    mode = ("latest" if resume else "none") if isinstance(resume, bool) else resume
    if mode not in RESUME_MODES:
        raise ValueError(f"resume must be True, False or one of {RESUME_MODES}, got {resume!r}")
    return mode


def train(run: RunConfig, out_dir: str, *, resume: bool | str = True, progress: bool = True) -> RunSummary:
    """Train ``run`` writing checkpoints, ``metrics.jsonl``, TensorBoard logs, plots and the final weights in HF
    format (``out_dir/hf``, single-process runs) into ``out_dir``.

    ``resume``: ``True``/``"latest"`` continues from the newest checkpoint in ``out_dir/checkpoints`` (weights,
    routing biases, optimizer moments, step and data position, so the losses continue exactly) and fails with a
    ``CheckpointError`` naming the damaged file if it cannot be restored; ``"fallback"`` then resumes from the
    newest older one that restores and moves the damaged newer ones aside (nothing is moved if none restores, or
    if a checkpoint does not fit the run's model/optimizer config: that is an error naming the differing arrays);
    ``False``/``"none"`` starts afresh. Under several processes every process calls this with the same
    ``out_dir`` on a shared filesystem.

    Documents that cannot be trained on (corrupt JSONL lines, empty or non-UTF-8 text, token ids outside the
    vocabulary, more than ``train.max_doc_tokens`` tokens) are left out and counted: a warning at the start,
    ``data/skipped_<reason>`` in every metrics record and ``data_skipped`` in the summary. More than
    ``data.max_skipped_fraction`` of the corpus left out stops the run before it starts (``ConfigError``).

    Raises:
      ConfigError: an invalid config or corpus (including too many unusable documents).
      Preempted: a preemption notice (SIGTERM) or ``train.max_runtime_s`` stopped the run after a step; that
        step is checkpointed and the logs are flushed (the final HF weights, plots and summary are not written).
      TrainingDiverged: ``train.max_nonfinite_run`` consecutive non-finite steps.
      CheckpointError: a checkpoint could not be saved (e.g. the disk is full; the previous one stays intact) or
        restored.
    """
    started = time.monotonic()
    mode = _resume_mode(resume)
    tc = run.train
    tokenizer = load_tokenizer(run.data.tokenizer)
    if tokenizer.vocab_size > run.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={run.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}"
        )
    skipped, locations = SkippedDocuments(), []
    docs = load_documents(run.data.corpus, run.data.num_docs, tc.seed, skipped=skipped, locations=locations)
    docs = screen_documents(docs, tokenizer, max_doc_tokens=tc.max_doc_tokens, skipped=skipped,
                            where=locations if len(locations) == len(docs) else None)  # fmt: skip
    check_skipped(skipped, len(docs), run.data.corpus, run.data.max_skipped_fraction)
    if skipped.total and jax.process_index() == 0:
        log.warning("data.corpus: left out %d of %d documents: %s", skipped.total, skipped.total + len(docs),
                    skipped.describe())  # fmt: skip
    entropy = unigram_entropy((tokenizer.encode(d) if isinstance(d, str) else d) for d in docs[:2000])

    stages = run.pipeline.stages if run.pipeline.enabled else 1
    if jax.process_count() > 1 and stages * run.mesh.data * run.mesh.expert != jax.device_count():
        # A smaller mesh would take the first processes' devices only and leave the others without batch rows.
        raise ConfigError(
            f"mesh: {stages}x{run.mesh.data}x{run.mesh.expert} must cover all {jax.device_count()} devices of the "
            f"{jax.process_count()} processes"
        )
    if run.pipeline.enabled:  # a `stage` axis in front of data x expert; everything else is unchanged
        if stages * run.mesh.data * run.mesh.expert > jax.device_count():
            raise ConfigError(
                f"pipeline: {stages}x{run.mesh.data}x{run.mesh.expert} devices needed, {jax.device_count()} available"
            )
        mesh = make_pipeline_mesh(stages, run.mesh.data, run.mesh.expert)
    else:
        mesh = make_mesh(run.mesh.data, run.mesh.expert)
    compute_dtype = jnp.dtype(tc.compute_dtype)
    # Every process runs this function; orbax coordinates the checkpoint writes of all processes itself (into
    # out_dir/checkpoints, which must be one shared directory), and process 0 alone writes the other files.
    is_writer = jax.process_index() == 0
    if is_writer:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "run_config.json"), "w") as f:
            json.dump(run_config_to_dict(run), f, indent=2)

    # Entered early so that a SIGTERM during compilation stops the run after its first step.
    rules = FSDP_RULES if run.mesh.fsdp else DEFAULT_RULES
    with use_mesh(mesh, rules), StopGuard(max_runtime_s=tc.max_runtime_s, start_time=started) as guard:
        model = create_model(
            run.model, seed=tc.seed, mesh=mesh, rules=rules, dtype=compute_dtype, param_dtype=jnp.float32
        )
        tx = make_optimizer(tc, nnx.state(model, nnx.Param))
        graphdef, state = init_train_state(model, tx)
        del model
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        batch_sharding = NamedSharding(mesh, P(("data", "expert")))
        if run.pipeline.enabled:
            make_step = make_pipeline_train_step(graphdef, run.model, tc, tx, run.pipeline.make_schedule(), mesh)
        else:
            make_step = make_train_step(graphdef, run.model, tc, tx)
        step_fn = jit_train_step(make_step, state_shardings, batch_sharding)

        data = make_pretrain_iterator(
            docs, tokenizer, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=tc.seed, fim_rate=run.data.fim_rate,
            fim_spm_rate=run.data.fim_spm_rate,
        )  # fmt: skip
        ckpt = TrainCheckpointer(
            os.path.join(out_dir, "checkpoints"), keep=tc.keep_checkpoints, every=tc.checkpoint_every,
            checksums=tc.checkpoint_checksums,
        )  # fmt: skip
        start = 0
        restored = ckpt.restore_latest(state, fallback=mode == "fallback") if mode != "none" else None
        if restored is not None:
            state, data_state, _ = restored
            data.set_state(data_state)
            start = int(state.step)
        guard.start(start)
        metrics_log = MetricsLog(out_dir, resume_step=start) if is_writer else None
        # A resumed (or already finished) run reports its last logged step until it logs a new one.
        previous = read_jsonl(metrics_log.path) if is_writer else []
        summary, state, stopped = _loop(
            run, state, step_fn, data, ckpt, metrics_log, batch_sharding, start, progress and is_writer,
            previous[-1:], guard, skipped.metrics(),
        )  # fmt: skip
        if stopped is not None:
            raise Preempted(summary["steps"], stopped, ckpt.directory)
        if jax.process_count() == 1:  # multi-host runs convert the orbax checkpoint instead (scripts/convert.py)
            # The final weights in HF format, for generation, evaluation and other tools (scripts/generate.py).
            save_pretrained(nnx.merge(graphdef, state.params, state.rest), os.path.join(out_dir, "hf"))
    summary.update(unigram_entropy=entropy, out_dir=out_dir, data_skipped=dict(skipped.counts))
    if is_writer:
        first = run.model.first_k_dense_replace
        names = [f"layer {first + i}" for i in range(run.model.num_moe_layers)]
        names += [f"MTP {k + 1}" for k in range(run.model.num_nextn_predict_layers)]
        plot_run(read_jsonl(metrics_log.path), out_dir, unigram_entropy=entropy, layer_names=names)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return RunSummary(**summary)


def _to_global(batch: dict, sharding: NamedSharding) -> dict:
    # Each process holds its rows of the global batch; assemble the global (sharded) arrays from them.
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def _loop(run, state, step_fn, data, ckpt, metrics_log, batch_sharding, start, progress, previous, guard, extra):
    from tqdm import tqdm

    tc = run.train
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, dynamic_ncols=True, unit="step")
    tokens_seen, timer, last = 0, time.perf_counter(), (previous[0] if previous else {})
    compile_end, stopped = None, None
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
            # Every process asks after every step (JAX's preemption sync requires it); the last step ends anyway.
            stop = guard.check(done)
            stopped = stop if done < tc.steps else None
            if done % tc.log_every == 0 or done == tc.steps or stopped:
                host = jax.device_get(metrics)
                elapsed = time.perf_counter() - timer
                record = {k: float(v) for k, v in host.items() if k != "load"}
                record.update(step=done, tokens_per_s=tokens_seen / elapsed if elapsed > 0 else 0.0)
                if "load" in host:
                    record["load"] = np.asarray(host["load"]).tolist()
                    record["load_ratio_max"] = float(load_ratio(np.asarray(host["load"])).max())
                record.update(extra)
                if metrics_log is not None:  # None on processes other than 0
                    metrics_log.write(record)
                last = record
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                run_length = int(state.nonfinite_run)
                if run_length >= tc.max_nonfinite_run:
                    raise TrainingDiverged(
                        f"{run_length} consecutive steps with a non-finite loss or gradient at step {done}; "
                        "updates were skipped and no checkpoint holds them. Lower train.lr or check the data."
                    )
            saved = ckpt.save(done, state, data.get_state(), force=stopped is not None)
            bar.update(1)
            if stopped is not None:
                break
        if start < tc.steps and not saved:  # the final state is always checkpointed
            ckpt.save(tc.steps, state, data.get_state(), force=True)
    except BaseException:
        bar.close()
        _close_quietly(ckpt, metrics_log)  # keep the original error, not a secondary one from the cleanup
        raise
    bar.close()
    try:
        ckpt.close()  # waits for the last save: raises if it failed
    finally:
        if metrics_log is not None:
            metrics_log.close()
    summary = dict(
        steps=int(state.step),
        final_loss=last.get("loss", float("nan")),
        final_ce=last.get("ce", float("nan")),
        tokens_per_s=last.get("tokens_per_s", 0.0),
        skipped_steps=int(state.nonfinite_total),
        load_ratio=load_ratio(np.asarray(last["load"])).tolist() if "load" in last else [],
    )
    return summary, state, stopped


def _close_quietly(ckpt, metrics_log) -> None:
    for close in (ckpt.close, metrics_log.close if metrics_log is not None else None):
        if close is not None:
            try:
                close()
            except Exception as e:
                log.warning("while stopping after an error: %s", e)
