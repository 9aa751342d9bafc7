"""Faults of long runs on preemptible machines: preemption notices, time limits, kills and full disks during
checkpoint saves, damaged checkpoints, NaN weights, bad documents, and a dead process of a multi-process run.
Each must cost at most the steps since the last checkpoint, and never a silently wrong resume."""

import concurrent.futures
import importlib.util
import json
import os
import pathlib
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import fault_worker
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import SMALL

import dsjax
from dsjax.checkpoint.orbax_io import load_orbax, save_orbax
from dsjax.checkpoint.safetensors_io import CheckpointReader, write_safetensors
from dsjax.config import ConfigError
from dsjax.data import ByteTokenizer, make_pretrain_iterator
from dsjax.data.pipeline import SkippedDocuments, screen_documents
from dsjax.train import checkpoint as checkpoint_lib
from dsjax.train import loop as loop_lib
from dsjax.train.checkpoint import DamagedCheckpointError, TrainCheckpointer
from dsjax.train.config import load_run_config
from dsjax.train.loop import load_documents, train
from dsjax.train.metrics import read_jsonl
from dsjax.train.preemption import PREEMPTED_EXIT_CODE, SIGTERM_REASON, TIME_LIMIT_REASON, Preempted, StopGuard

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TINY = dsjax.ModelConfig.tiny(initializer_range=0.1)


def _equal_trees(a, b) -> bool:
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ---------------------------------------------------------------------------------------------- checkpoint faults


def _limit_file_size(limit: int):
    # Writes past RLIMIT_FSIZE fail with EFBIG ("File too large") once SIGXFSZ is ignored: a real write error
    # inside tensorstore's writer threads, which no Python-level patch could inject.
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))

    def restore():
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)

    return restore


@pytest.fixture
def tmpfs(tmp_path):
    """A 6 MB tmpfs (a disk that fills up), unmounted afterwards; skipped where mounting is not permitted."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _wait_until(condition, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("fault", ["write_error", "disk_full"])
def test_failed_save_keeps_the_previous_checkpoint(fault, tmp_path, request):
    """keep=1 and the second save fails mid-write: a clear error, the first checkpoint intact and restorable. The
    partial directory stays (other processes of a multi-process run may still be writing into it) until the next
    run opens the directory, which removes it (it would hold the space a retry needs)."""
    directory = (request.getfixturevalue("tmpfs") if fault == "disk_full" else tmp_path) / "ckpt"
    ckpt = TrainCheckpointer(directory, keep=1, every=1)
    ckpt.save(1, fault_worker.state(1), {"step": 1})
    ckpt.wait()
    restore_limit = _limit_file_size(1 << 20) if fault == "write_error" else None  # a 4 MB state: 2 do not fit
    try:
        with pytest.raises(dsjax.CheckpointError) as err:
            ckpt.save(2, fault_worker.state(2), {"step": 2})
            ckpt.wait()
    finally:
        if restore_limit:
            restore_limit()
    message = str(err.value)
    assert "saving checkpoint 2" in message and "The earlier checkpoint 1 is intact" in message, message
    assert ("File too large" if fault == "write_error" else "No space left on device") in message, message
    assert sorted(os.listdir(directory)) == ["1", "2.orbax-checkpoint-tmp"]
    ckpt.close()
    ckpt = TrainCheckpointer(directory, keep=1, every=1)
    state, data = ckpt.restore(fault_worker.state(0))
    assert data == {"step": 1} and _equal_trees(state, fault_worker.state(1))
    assert _wait_until(lambda: os.listdir(directory) == ["1"]), os.listdir(directory)  # orbax cleans up async
    ckpt.close()


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    # Killed with every file of checkpoint 2 written but not committed (the worst moment): checkpoint 1 restores,
    # and the next run removes the partial directory and saves step 2 again.
    worker = subprocess.run([sys.executable, os.path.join(HERE, "fault_worker.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert worker.returncode == -signal.SIGKILL, worker.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["1", "2.orbax-checkpoint-tmp"]
    ckpt = TrainCheckpointer(tmp_path, keep=2, every=1)
    assert ckpt.all_steps() == [1]
    state, data = ckpt.restore(fault_worker.state(0))
    assert data == {"step": 1} and _equal_trees(state, fault_worker.state(1))
    ckpt.save(2, fault_worker.state(2), {"step": 2})
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def _damage(step_dir, how: str) -> str:
    """Damage a file of a checkpoint; returns its path relative to the step directory."""
    if how == "edit":  # same length, different content
        path = pathlib.Path(step_dir, "data", "metadata")
        path.write_text(path.read_text().replace('"step": 3', '"step": 9'))
        return os.path.join("data", "metadata")
    files = [pathlib.Path(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
    path = max(files, key=os.path.getsize)  # the array data
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # one flipped bit: orbax alone restores this silently as a different weight
        data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    return os.path.relpath(path, step_dir)


def _small_state(step):
    return fault_worker.state(step, size=10_000)


def test_damaged_checkpoints_are_named_and_fallback_resumes_from_the_last_good_one(tmp_path):
    ckpt = TrainCheckpointer(tmp_path / "c", keep=5, every=1)
    for step in (1, 2, 3):
        ckpt.save(step, _small_state(step), {"step": step})
    nan_state = _small_state(4)._replace(rest={"bias": jnp.asarray([0.0, jnp.nan, 1.0])})
    ckpt.save(4, nan_state, {"step": 4})  # intact files, but a NaN that training never writes
    ckpt.close()
    damaged = {step: _damage(tmp_path / "c" / str(step), how) for step, how in ((1, "flip"), (2, "truncate"),
                                                                                 (3, "edit"))}  # fmt: skip
    ckpt = TrainCheckpointer(tmp_path / "c", keep=5, every=1)
    target = _small_state(0)
    for step, rel in damaged.items():
        with pytest.raises(dsjax.CheckpointError, match=re.escape(rel)):
            ckpt.restore(target, step)
    with pytest.raises(dsjax.CheckpointError, match=r"NaN/Inf values in \['rest'\]\['bias'\]"):
        ckpt.restore(target, 4)
    with pytest.raises(dsjax.CheckpointError, match="--resume fallback"):
        ckpt.restore_latest(target)
    assert ckpt.all_steps() == [1, 2, 3, 4]  # without fallback nothing is moved
    with pytest.raises(dsjax.CheckpointError, match=r"no checkpoint could be restored \(none was moved\)"):
        ckpt.restore_latest(target, fallback=True)
    # None restores: all stay where they are, so that a new run fails again instead of silently starting over.
    assert ckpt.all_steps() == [1, 2, 3, 4] and not os.path.exists(f"{tmp_path / 'c'}.rejected")

    # The usual case: only the newest is bad; the one before restores and training saves on top of it.
    ckpt = TrainCheckpointer(tmp_path / "d", keep=2, every=1)
    for step in (1, 2):
        ckpt.save(step, _small_state(step), {"step": step})
    ckpt.wait()
    _damage(tmp_path / "d" / "2", "flip")
    state, data, step = ckpt.restore_latest(target, fallback=True)
    assert step == 1 and data == {"step": 1} and _equal_trees(state, _small_state(1))
    assert [d.split("-")[0] for d in os.listdir(f"{tmp_path / 'd'}.rejected")] == ["2"]
    ckpt.save(2, _small_state(2), {"step": 2})
    ckpt.close()
    assert TrainCheckpointer(tmp_path / "d", keep=2, every=1).all_steps() == [1, 2]


def test_fallback_with_a_changed_config_names_the_mismatch_and_moves_nothing(tmp_path):
    """Checkpoints of another model/optimizer config are good checkpoints: `--resume fallback` must not move them
    aside (the next run would silently start from step 0), whether or not a damaged one is newer."""
    ckpt = TrainCheckpointer(tmp_path, keep=5, every=1)
    for step in (1, 2, 3):
        ckpt.save(step, _small_state(step), {"step": step})
    ckpt.close()
    _damage(tmp_path / "3", "flip")
    ckpt = TrainCheckpointer(tmp_path, keep=5, every=1)
    wider = _small_state(0)._replace(params={"w": jnp.zeros(20_000), "b": jnp.zeros(7)})
    half = _small_state(0)._replace(params={"w": jnp.zeros(10_000, jnp.bfloat16), "b": jnp.zeros(7)})
    renamed = _small_state(0)._replace(params={"w": jnp.zeros(10_000), "c": jnp.zeros(7)})
    cases = [
        (wider, r"params/w \(shape \(10000,\) saved, \(20000,\) here\)"),
        (half, r"params/w \(dtype float32 saved, bfloat16 here\)"),  # orbax would cast silently
        (renamed, r"params/b \(only in the checkpoint\), params/c \(not in the checkpoint\)"),
    ]
    for target, what in cases:
        with pytest.raises(dsjax.CheckpointError, match="does not fit this run's state.*" + what) as err:
            ckpt.restore_latest(target, fallback=True)  # 3 is damaged, 2 does not fit: stop there
        assert not isinstance(err.value, DamagedCheckpointError)
        assert ckpt.all_steps() == [1, 2, 3] and not os.path.exists(f"{tmp_path}.rejected")
    with pytest.raises(dsjax.CheckpointError, match="does not fit") as err:
        ckpt.restore(wider, 1)
    assert not isinstance(err.value, DamagedCheckpointError)
    ckpt.close()


def test_a_step_after_a_save_does_not_wait_for_it(tmp_path, monkeypatch):
    """The save of step 2 is still being checksummed in the background (slowed to 2 s here): step 3, which does not
    save, returns at once instead of waiting for it; the save then commits normally."""
    slow, real = threading.Event(), checkpoint_lib.write_checksums

    def slow_write_checksums(step_dir):
        slow.set()
        time.sleep(2.0)
        real(step_dir)

    monkeypatch.setattr(checkpoint_lib, "write_checksums", slow_write_checksums)
    ckpt = TrainCheckpointer(tmp_path, keep=2, every=2)
    assert ckpt.save(2, _small_state(2), {"step": 2})
    assert slow.wait(30)  # the background write reached the checksums
    start = time.perf_counter()
    assert not ckpt.save(3, _small_state(3), {"step": 3})
    assert time.perf_counter() - start < 0.5
    ckpt.close()
    assert ckpt.all_steps() == [2] and os.path.exists(tmp_path / "2" / checkpoint_lib.CHECKSUMS_FILE)


def test_one_process_saves_each_array_from_one_replica(tmp_path, monkeypatch):
    """A state replicated over 8 devices is saved without slicing it per replica on device (orbax's
    replica-parallel default sliced every replicated array 8 ways, an eager op compiled per shape and device), and
    restores equal, replicated again."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dsjax.sharding import make_mesh

    mesh = make_mesh(data=8)
    state = jax.device_put(_small_state(3), NamedSharding(mesh, P()))
    sliced = []
    real_slice = jax.lax.slice_in_dim
    monkeypatch.setattr(jax.lax, "slice_in_dim", lambda *a, **k: sliced.append(a[0].shape) or real_slice(*a, **k))
    ckpt = TrainCheckpointer(tmp_path, keep=2, every=1)
    ckpt.save(3, state, {"step": 3})
    ckpt.close()
    assert sliced == []
    restored, data = TrainCheckpointer(tmp_path, keep=2, every=1).restore(state)
    assert data == {"step": 3} and _equal_trees(restored, state)
    assert all(leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
               for leaf in jax.tree.leaves(restored))  # fmt: skip


def test_checksum_read_errors_are_reported_not_raised(tmp_path, monkeypatch):
    """A file that cannot be read is one more problem in the report (the other processes wait for this one's
    verdict in a collective); a commit hook that finds no temporary directory fails the save clearly."""
    (tmp_path / "a").write_bytes(b"x" * 100)
    (tmp_path / "b").write_bytes(b"y" * 100)
    checkpoint_lib.write_checksums(str(tmp_path))
    assert checkpoint_lib.verify_checksums(str(tmp_path)) == []

    def unreadable(path):
        if path.endswith("a"):
            raise OSError(5, "Input/output error")
        return real(path)

    real = checkpoint_lib._crc32
    monkeypatch.setattr(checkpoint_lib, "_crc32", unreadable)
    problems = checkpoint_lib.verify_checksums(str(tmp_path))
    assert problems == [f"{tmp_path / 'a'} cannot be read ([Errno 5] Input/output error)"]

    ckpt = TrainCheckpointer(tmp_path / "c", keep=2, every=1)
    ckpt._saving = 7  # as while step 7 commits, but orbax wrote no 7.orbax-checkpoint-tmp
    with pytest.raises(dsjax.CheckpointError, match=r"expected one temporary directory 7\.orbax-checkpoint-tmp"):
        ckpt._before_commit()
    ckpt._saving = None
    ckpt.close()


# ------------------------------------------------------------------------------------------- non-finite weights


@pytest.fixture(scope="module")
def tiny_model():
    return dsjax.create_model(TINY, seed=3)


@pytest.fixture(scope="module")
def saved_tiny(tiny_model, tmp_path_factory):
    """``saved_tiny(kind)``: the tiny model saved in HF format as f32, bf16 or fp8 (E4M3 + scales), once each."""
    root, options = tmp_path_factory.mktemp("hf"), {"f32": {}, "bf16": {"dtype": jnp.bfloat16}, "fp8": {"fp8": True}}

    def path(kind):
        if not (root / kind).exists():
            dsjax.save_pretrained(tiny_model, root / kind, **options[kind])
        return root / kind

    return path


def _rewrite(src, dst, edit):
    """Copy an HF checkpoint into one file, passing every tensor through ``edit(name, array)``."""
    reader = CheckpointReader(src)
    os.makedirs(dst, exist_ok=True)
    tensors = {k: edit(k, np.array(reader.get(k))) for k in sorted(reader.keys())}
    write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
    shutil.copy(os.path.join(src, "config.json"), dst)
    return dst


def _poison(targets, value):
    def edit(name, array):
        if name in targets:
            array.reshape(-1)[min(7, array.size - 1)] = value
        return array

    return edit


@pytest.mark.parametrize(
    ("kind", "tensor", "value"),
    [
        ("f32", "model.layers.1.mlp.experts.2.down_proj.weight", np.nan),
        # bf16, and in the MTP module's copy too (which must equal the shared embedding, NaN for NaN)
        ("bf16", "model.embed_tokens.weight", np.inf),
        ("fp8", "model.layers.0.self_attn.kv_b_proj.weight", np.nan),  # E4M3 (NaN is S.1111.111)
        ("fp8", "model.layers.1.mlp.shared_experts.up_proj.weight_scale_inv", np.inf),
    ],
)
def test_nonfinite_weight_in_safetensors_is_an_error_naming_it(saved_tiny, tmp_path, kind, tensor, value):
    copy = "model.layers.3.embed_tokens.weight" if "embed" in tensor else None
    bad = _rewrite(saved_tiny(kind), tmp_path / "bad", _poison({tensor, copy}, value))
    weight = tensor.removesuffix("_scale_inv")
    with pytest.raises(dsjax.CheckpointError, match=re.escape(weight) + r".*NaN/Inf.*check_finite=False"):
        dsjax.from_pretrained(bad, dtype=jnp.float32)
    if kind == "fp8":  # dequantised on load: the check sees weight x scale
        with pytest.raises(dsjax.CheckpointError, match=re.escape(weight)):
            dsjax.from_pretrained(bad, dtype=jnp.float32, dequantize=True)
    loaded = dsjax.from_pretrained(bad, dtype=jnp.float32, check_finite=False)  # opt-out: inspect it
    leaves = [np.asarray(v.get_value(), np.float32) for _, v in nnx.to_flat_state(nnx.state(loaded))]
    assert sum(int((~np.isfinite(x)).sum()) for x in leaves) >= 1


def test_nonfinite_weight_in_orbax_is_an_error_naming_it(tiny_model, tmp_path):
    state = nnx.state(tiny_model)
    poisoned = dsjax.create_model(TINY, seed=3)
    poisoned.lm_head.set_value(poisoned.lm_head.get_value().at[3, 5].set(jnp.nan))
    save_orbax(poisoned, tmp_path / "bad")
    with pytest.raises(dsjax.CheckpointError, match=r"NaN/Inf values in \['lm_head'\]"):
        load_orbax(tmp_path / "bad")
    loaded = load_orbax(tmp_path / "bad", check_finite=False)
    assert np.isnan(np.asarray(loaded.lm_head.get_value())).sum() == 1
    assert np.array_equal(np.asarray(loaded.embed.get_value()), np.asarray(state["embed"].get_value()))


# ---------------------------------------------------------------------------------------------------- bad data

GOOD_IDS = [72, 105, 33]
BAD_LINES = {  # JSONL line -> why it is left out
    b'{"text": "unterminated': "corrupt",
    b'{"title": "no text field"}': "corrupt",
    b'{"text": 5}': "corrupt",
    b'{"ids": [1.5, 2]}': "corrupt",
    b'{"text": ""}': "empty",
    b'{"text": "  \\n "}': "empty",
    b'{"ids": []}': "empty",
    b'{"text": "caf\xe9 au lait"}': "non_utf8",  # Latin-1 bytes
    b'{"text": "lone \\udc80 surrogate"}': "non_utf8",  # valid JSON, no valid UTF-8 for it
    b'{"ids": [65, 66, 300]}': "bad_ids",  # the byte tokenizer has 264 ids
    b'{"ids": [-1, 65]}': "bad_ids",
    b'{"text": "' + b"x" * 3000 + b'"}': "too_long",
}
EXPECTED_SKIPS = {"corrupt": 4, "empty": 3, "non_utf8": 2, "too_long": 1, "bad_ids": 2}


def _bad_corpus(path, good_texts) -> str:
    """Good documents with every kind of bad one mixed in (and one good pre-tokenised document)."""
    lines = [json.dumps({"text": t}).encode() for t in good_texts]
    for k, bad in enumerate([*BAD_LINES, json.dumps({"ids": GOOD_IDS}).encode()]):
        lines.insert(3 + 7 * k, bad)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_bad_documents_are_left_out_counted_and_named(tmp_path):
    good = dsjax.data.default_corpus(num_docs=40, seed=1)
    path = _bad_corpus(tmp_path / "corpus.jsonl", good)
    skipped, where = SkippedDocuments(), []
    docs = load_documents(path, 0, 0, skipped=skipped, locations=where)
    kept = screen_documents(docs, ByteTokenizer(), max_doc_tokens=2000, skipped=skipped, where=where)
    assert skipped.counts == EXPECTED_SKIPS
    assert skipped.metrics()["data/skipped_bad_ids"] == 2 and "line 4" in skipped.describe()
    # The good documents, in order and unchanged, so their packed stream is what it would be without the bad ones.
    assert [d for d in kept if isinstance(d, str)] == good
    ids = [d for d in kept if not isinstance(d, str)]
    assert len(ids) == 1 and ids[0].tolist() == GOOD_IDS
    options = dict(batch_size=4, seq_len=64, seed=0, fim_rate=0.5, process_count=1, process_index=0)
    texts_only = make_pretrain_iterator([d for d in kept if isinstance(d, str)], ByteTokenizer(), **options)
    clean = make_pretrain_iterator(good, ByteTokenizer(), **options)
    for _ in range(5):
        a, b = next(texts_only), next(clean)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    # A pre-tokenised document enters the stream as BOS + ids + EOS, never truncated.
    stream = make_pretrain_iterator(ids * 3, ByteTokenizer(), **{**options, "num_epochs": 1, "fim_rate": 0.0})
    row = next(stream)["tokens"][0]
    tok = ByteTokenizer()
    assert row[: 2 * (len(GOOD_IDS) + 2)].tolist() == [tok.bos_id, *GOOD_IDS, tok.eos_id] * 2
    with pytest.raises(ValueError, match=r"docs\[1\]: token ids outside \[0, 264\)"):
        make_pretrain_iterator(["fine", np.asarray([3, 264])], ByteTokenizer(), **options)
    # A .txt corpus with undecodable bytes keeps its other documents.
    txt = tmp_path / "corpus.txt"
    txt.write_bytes(b"first doc\n\nbad \xff\xfe bytes\n\nthird doc\n")
    skipped = SkippedDocuments()
    assert screen_documents(load_documents(str(txt), 0, 0, skipped=skipped), ByteTokenizer(), skipped=skipped) == [
        "first doc",
        "third doc",
    ]
    assert skipped.counts["non_utf8"] == 1


def test_a_corpus_mostly_left_out_is_an_error_before_training(tmp_path):
    """A schema mistake ({"content": ...}) on most lines must not train on the few lines that fit: more than
    data.max_skipped_fraction of the documents left out stops the run before the model is even built."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"content": f"doc {i}"}) + "\n" for i in range(99)) + '{"text": "ok"}\n')
    run = _run([f"data.corpus={corpus}"])
    with pytest.raises(ConfigError, match=r"99 of 100 documents .*\(99%\) .*data\.max_skipped_fraction=0\.5.*line 1"):
        train(run, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    skipped = SkippedDocuments()
    for i in range(5):
        skipped.add("empty", f"line {i}")
    loop_lib.check_skipped(skipped, 5, "c.jsonl", 0.5)  # half: at the limit, trains
    with pytest.raises(ConfigError, match="5 of 9 documents"):
        loop_lib.check_skipped(skipped, 4, "c.jsonl", 0.5)
    loop_lib.check_skipped(skipped, 1, "c.jsonl", 1.0)  # 1: never stops while something is left
    with pytest.raises(ConfigError, match="no usable documents"):
        loop_lib.check_skipped(skipped, 0, "c.jsonl", 1.0)
    for bad in ("-0.1", "1.5"):
        with pytest.raises(ConfigError, match="data.max_skipped_fraction"):
            load_run_config(None, [f"data.max_skipped_fraction={bad}"])


# -------------------------------------------------------------------------------------------------- preemption


def _main_thread_only():
    # Python installs signal handlers from the main thread only; without one, the test's SIGTERM would kill it.
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("the test runner does not run tests in the main thread")


def test_stop_guard_handler_only_sets_a_flag_and_is_restored():
    _main_thread_only()
    before = signal.getsignal(signal.SIGTERM)
    with StopGuard() as guard:
        guard.start(0)
        assert guard.check(1) is None
        os.kill(os.getpid(), signal.SIGTERM)  # the process survives: the handler only records it
        assert guard.check(2) == SIGTERM_REASON
    assert signal.getsignal(signal.SIGTERM) is before
    with StopGuard(max_runtime_s=0.2) as guard:
        assert guard.check(1) is None
        time.sleep(0.25)
        assert guard.check(2) == TIME_LIMIT_REASON
    with pytest.raises(ConfigError, match="train.max_runtime_s"):
        load_run_config(None, ["train.max_runtime_s=-1"])
    with pytest.raises(ConfigError, match="train.max_doc_tokens"):
        load_run_config(None, ["train.max_doc_tokens=-5"])


def test_a_second_sigterm_restores_the_previous_handler_and_re_raises(monkeypatch):
    """A run that does not stop after the first notice (a hung step or save) must still yield to a second one
    without SIGKILL: the guard hands the signal to the handler that was there before."""
    _main_thread_only()
    received = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        previous = signal.getsignal(signal.SIGTERM)
        with StopGuard() as guard:
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.check(1) == SIGTERM_REASON and received == []
            os.kill(os.getpid(), signal.SIGTERM)
            assert signal.getsignal(signal.SIGTERM) is previous
            assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, before)

    # With the default handler the process ends at once, killed by the signal (in a child process).
    # preemption.py loaded alone: importing the dsjax package would take most of this test's time.
    script = ("import importlib.util, os, signal, sys, time\n"
              "spec = importlib.util.spec_from_file_location('preemption', sys.argv[1])\n"
              "preemption = importlib.util.module_from_spec(spec)\n"
              "spec.loader.exec_module(preemption)\n"
              "with preemption.StopGuard() as guard:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    print('first:', guard.check(1), flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(30)\n"
              "    print('still running', flush=True)\n")  # fmt: skip
    module = os.path.join(ROOT, "dsjax", "train", "preemption.py")
    child = subprocess.run([sys.executable, "-c", script, module], capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGTERM, child.stderr[-3000:]
    assert child.stdout == f"first: {SIGTERM_REASON}\n" and "second SIGTERM" in child.stderr

    # signal.signal returns None when the previous handler was installed from C: the guard restores the default.
    calls = []
    monkeypatch.setattr(signal, "signal", lambda signum, handler: calls.append(handler))
    with StopGuard() as guard:
        pass
    assert calls == [guard._on_sigterm, signal.SIG_DFL]


def test_stop_guard_without_jax_sync_manager_falls_back_with_a_warning(monkeypatch, caplog):
    """The sync manager is private JAX state: if a JAX version drops or renames it, the guard must not crash but
    fall back to agreeing through an allgather."""
    from jax._src import distributed

    from dsjax.train import preemption

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "global_state", object())  # no preemption_sync_manager attribute
    assert not preemption._jax_sync_available()
    assert "preemption sync service is not available" in caplog.text


def _train_script():
    spec = importlib.util.spec_from_file_location("train_script", os.path.join(ROOT, "scripts", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _signal_at_step(monkeypatch, step: int) -> None:
    """Make the next training run send itself SIGTERM while computing ``step`` (from inside the loop, so the
    signal can never arrive after the run has finished and its handler is gone)."""
    jit_train_step = loop_lib.jit_train_step

    def signalling_jit_train_step(*a, **kw):
        step_fn, calls = jit_train_step(*a, **kw), []

        def step_and_signal(state, batch):
            calls.append(1)
            if len(calls) == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_fn(state, batch)

        return step_and_signal

    monkeypatch.setattr(loop_lib, "jit_train_step", signalling_jit_train_step)


SIGTERM_STEPS = 12
# The step to interrupt is random but reproducible: DSJAX_TEST_SEED picks another one; the test id shows it.
SIGTERM_SEED = int(os.environ.get("DSJAX_TEST_SEED", "17"))
SIGTERM_AT = random.Random(SIGTERM_SEED).randint(1, SIGTERM_STEPS - 1)


@pytest.mark.slow
@pytest.mark.parametrize("k", [SIGTERM_AT], ids=[f"step{SIGTERM_AT}-seed{SIGTERM_SEED}"])
def test_sigterm_at_a_random_step_checkpoints_that_step_and_resumes_exactly(k, tmp_path, monkeypatch, capsys, caplog):
    """scripts/train.py gets SIGTERM in the middle of a random step: it finishes that step, checkpoints it and
    returns PREEMPTED_EXIT_CODE. Run again, it resumes and logs exactly the losses of an uninterrupted run. Every
    kind of bad document is in the corpus: left out and counted, no crash."""
    _main_thread_only()
    corpus = _bad_corpus(tmp_path / "corpus.jsonl", dsjax.data.default_corpus(num_docs=200, seed=0))
    steps = SIGTERM_STEPS
    sets = [*SMALL, *FAST, f"data.corpus={corpus}", f"train.steps={steps}", "train.checkpoint_every=5",
            "train.keep_checkpoints=2", "train.max_doc_tokens=2000"]  # fmt: skip
    script, parts = _train_script(), tmp_path / "parts"
    args = ["--quiet", "--out", str(parts), *[a for s in sets for a in ("--set", s)]]

    with monkeypatch.context() as patch:
        _signal_at_step(patch, k)
        assert script.main(args) == PREEMPTED_EXIT_CODE, f"SIGTERM during step {k}"
    err = capsys.readouterr().err
    assert f"preempted: stopped after step {k} on a preemption notice (SIGTERM); checkpoint {k} is saved" in err
    assert "left out 12 of 213 documents" in caplog.text
    assert max(int(d) for d in os.listdir(parts / "checkpoints") if d.isdigit()) == k
    assert read_jsonl(str(parts / "metrics.jsonl"))[-1]["step"] == k
    assert not (parts / "hf").exists() and not (parts / "summary.json").exists()
    assert script.main(args) == 0

    whole = train(_run(sets), str(tmp_path / "whole"), resume=False, progress=False)
    a, b = read_jsonl(str(tmp_path / "whole" / "metrics.jsonl")), read_jsonl(str(parts / "metrics.jsonl"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "ce", "grad_norm"):
            assert ra[key] == rb[key], (ra["step"], key)
    summary = json.loads((parts / "summary.json").read_text())
    assert summary["final_loss"] == whole.final_loss
    assert summary["data_skipped"] == whole.data_skipped == EXPECTED_SKIPS
    assert {f"data/skipped_{k}": v for k, v in EXPECTED_SKIPS.items()}.items() <= b[-1].items()


def _run(sets):
    return load_run_config(os.path.join(ROOT, "configs", "train_tiny.yaml"), sets)


@pytest.mark.slow
def test_grpo_run_stops_on_sigterm_after_the_round_and_checkpoints_it(tmp_path):
    from dsjax.rl import ArithmeticTask, GRPOConfig, Reward
    from dsjax.rl.trainer import RLTrainConfig, train_grpo

    class SignalledTask(ArithmeticTask):
        """Its reward function sends the preemption notice in the middle of round 2."""

        def rewards(self):
            calls = []

            def reward(prompts, completions, **_):
                calls.append(1)
                if len(calls) == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                return [float(len(c) % 3) for c in completions]

            return [Reward(reward, 1.0, "accuracy")]

    _main_thread_only()
    grpo = GRPOConfig(G=2, max_completion_length=4, learning_rate=1e-3, beta=0.0)
    tc = RLTrainConfig(steps=4, questions=2, template="{question}=", checkpoint_every=100)
    cfg = dsjax.ModelConfig.tiny(vocab_size=264, num_hidden_layers=1, num_nextn_predict_layers=0)  # fast to compile
    model = dsjax.create_model(cfg, seed=0)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="stopped after step 2 on a preemption notice") as stop:
        train_grpo(model, ByteTokenizer(), SignalledTask(digits=1, ops="+"), grpo, tc, str(tmp_path), progress=False)
    assert stop.value.step == 2 and signal.getsignal(signal.SIGTERM) is handler
    assert os.listdir(tmp_path / "checkpoints") == ["2"]
    assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2]
    assert not (tmp_path / "hf").exists()  # an unfinished run exports nothing


# ------------------------------------------------------------------------------------------------- multi-host


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


MULTI_STEPS = 20
# One dense layer: the model does not matter here, process start-up and compilation do.
FAST = ["model.num_hidden_layers=1", "model.num_nextn_predict_layers=0"]
MULTI_SETS = ["mesh.data=2", "mesh.expert=1", "train.dispatch=auto", f"train.steps={MULTI_STEPS}", *FAST]


class _Job:
    """A 2-process run of tests/multihost_worker.py (1 CPU device each, data-parallel over both)."""

    def __init__(self, tmp_path, name, *extra, extra_for_1=()):
        common = ["--num-processes", "2", "--port", str(_free_port()), "--out", str(tmp_path / "run"),
                  "--total-devices", "2", "--heartbeat-timeout", "5", "--compile-cache", str(tmp_path / "cache"),
                  "--step-seconds", "0.25", *[a for s in MULTI_SETS for a in ("--set", s)], *extra]  # fmt: skip
        self.logs = [(tmp_path / f"{name}{i}.out", tmp_path / f"{name}{i}.err") for i in range(2)]
        self.procs = []
        for i, (out, err) in enumerate(self.logs):
            with open(out, "w") as fo, open(err, "w") as fe:
                worker = [sys.executable, os.path.join(HERE, "multihost_worker.py"), "--process-id", str(i)]
                self.procs.append(subprocess.Popen([*worker, *common, *(extra_for_1 if i else ())], stdout=fo,
                                                   stderr=fe))  # fmt: skip

    def wait(self, timeout: float) -> list[int | None]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        return [p.poll() for p in self.procs]

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def stderr(self, i, tail: int | None = 3000) -> str:
        text = self.logs[i][1].read_text(errors="replace")
        return text[-tail:] if tail else text


def _wait_for_line(job, i, text, timeout=180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.procs[i].poll() is None:
        lines = [line for line in job.logs[i][0].read_text().splitlines() if text in line]
        if lines:
            return json.loads(lines[-1])
        time.sleep(0.05)
    raise AssertionError(f"process {i} printed no {text} line\n{job.stderr(i)}")


def _wait_for(condition, job, what, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in job.procs):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen\n{job.stderr(0)}\n{job.stderr(1)}")


def _logged_steps(metrics) -> list[int]:
    return [r["step"] for r in read_jsonl(str(metrics))] if metrics.exists() else []


@pytest.mark.slow
def test_two_processes_killed_then_preempted_then_resumed_exactly(tmp_path):
    """One process of two is SIGKILLed: the other stops within seconds with JAX's error instead of hanging.
    Restarted, the job resumes from the last checkpoint, and one process reaches its time limit, which it delivers
    as a SIGTERM to itself: both stop after the same step (JAX's preemption sync) with a checkpoint of it, and
    resume from it. The losses of the whole run equal an uninterrupted run's, bit for bit (the reference runs one
    process with both devices: a sum over two devices is exact in either order)."""
    import multihost_worker

    metrics, checkpoints = tmp_path / "run" / "metrics.jsonl", tmp_path / "run" / "checkpoints"
    # The reference trains in this process meanwhile, in a thread (the test thread only waits).
    reference = concurrent.futures.ThreadPoolExecutor(1).submit(
        train, _run(multihost_worker.OVERRIDES + MULTI_SETS), str(tmp_path / "reference"), resume=False, progress=False
    )
    jobs = []
    try:
        job = _Job(tmp_path, "a")
        jobs.append(job)
        _wait_for(lambda: (checkpoints / "2").exists() and max(_logged_steps(metrics), default=0) >= 3, job,
                  "checkpoint 2")  # fmt: skip
        killed_at = time.monotonic()
        job.procs[1].kill()
        codes = job.wait(60)
        assert codes[0] not in (None, 0), "the surviving process hung or exited as if nothing happened"
        assert time.monotonic() - killed_at < 60
        assert "JAX distributed service detected fatal errors" in job.stderr(0, tail=None), job.stderr(0)
        restart = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())

        limit = ("--set", "train.max_runtime_s=0.001")  # on process 1 only: reached after its first step
        job = _Job(tmp_path, "b", "--resume", "--resume-after-preemption", extra_for_1=limit)
        jobs.append(job)
        stops = [_wait_for_line(job, i, '"preempted"') for i in range(2)]
        stopped = stops[0]["preempted"]
        assert stops[1]["preempted"] == stopped and restart < stopped < MULTI_STEPS, stops
        assert str(stopped) in os.listdir(checkpoints)
        # Process 1's own limit, seen by process 0 as a notice from another process.
        assert (stops[0]["reason"], stops[1]["reason"]) == (SIGTERM_REASON, TIME_LIMIT_REASON)
        codes = job.wait(300)
        assert codes == [0, 0], f"{codes}\n{job.stderr(0)}\n{job.stderr(1)}"
    finally:
        for job in jobs:
            job.kill()
    assert reference.result(timeout=300).steps == MULTI_STEPS
    logged, expected = read_jsonl(str(metrics)), read_jsonl(str(tmp_path / "reference" / "metrics.jsonl"))
    assert [r["step"] for r in logged] == [r["step"] for r in expected] == list(range(1, MULTI_STEPS + 1))
    for got, want in zip(logged, expected):
        assert (got["loss"], got["ce"]) == (want["loss"], want["ce"]), got["step"]
