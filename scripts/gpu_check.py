"""dsjax on a real NVIDIA Hopper GPU: what the deviceless compiles (``scripts/aot.py --topology 8xh200``) predict,
checked against one H100/H200.

Parts (each writes ``--out`` as one JSON object; with ``--json`` it is also the last line of output):

* ``gmm``: :func:`dsjax.ops.gpu_gmm.gpu_gmm` (JAX's Mosaic-GPU grouped GEMMs) against a float32 reference, one
  matmul per group (forward and both gradients, uneven groups with an empty one and rows past the last group), and timed
  next to ``ragged_dot`` as XLA:GPU compiles it (a dense matmul over every group, masked) at the expert shapes of
  DeepSeek-V2-Lite (all 64 experts on one GPU) and V3 (32 local experts of 256 on 8 GPUs).
* ``fp8k``: the FP8 GEMMs of ``Fp8Recipe(backend="auto")`` on GPU, :mod:`dsjax.ops.fp8_gpu`'s Mosaic-GPU kernels
  (E4M3 ``wgmma``, promoted every 128 of the contraction): dense (``fp8_matmul``) and grouped
  (``fp8_ragged_dot``) forward and both gradients against the ``blocked`` backend's XLA program (same recipe,
  so their difference is the fp32 summation order: ~1e-6) at a small shape, then timed next to the bf16 GEMMs
  (``jnp.dot``, :func:`dsjax.ops.gpu_gmm.gpu_gmm`) at DeepSeek-V3's shapes.
* ``train``: DeepSeek-V2-Lite's train step, ``--layers`` deep (1 dense + MoE layers; full widths), on one GPU:
  ``dsjax.aot.compile_report`` on the real device (per-GPU memory, compiled / model flops, roofline MFU) next to
  the step's measured time, MFU and peak memory, for each ``--dispatch``.
* ``decode``: DeepSeek-V2-Lite's decode step (all 27 layers, bf16 weights) at ``--batch`` x ``--context``:
  measured time per step and the bandwidth at which it reads the weights and the latent cache (bytes / time).

State and batches are random (never zeros: a zero input can run faster than real data). Timings: warm-up, then
the median over repetitions ended by ``block_until_ready``. The device image's python3 has jax with CUDA; dsjax's
other dependencies travel as wheels (``.whl``, see the device notes in README).

    PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py gmm --json --out $OUT/gmm.json

``--smoke`` runs a part with tiny shapes on any backend (CPU: ``gmm`` checks ``ragged_dot`` only).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import functools
import itertools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
    import dsjax  # noqa: F401
except ImportError as e:  # a dependency missing on the GPU image: the gmm part needs only jax and ops/gpu_gmm.py
    print(f"import dsjax failed ({e}); loading dsjax.ops.gpu_gmm alone", flush=True)
    import types

    for _name in ("dsjax", "dsjax.ops"):
        _pkg = types.ModuleType(_name)
        _pkg.__path__ = [str(Path(__file__).resolve().parents[1].joinpath(*_name.split(".")))]
        sys.modules[_name] = _pkg


def timed(fn, *args, reps: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``fn(*args)`` over ``reps`` calls, each ended by ``block_until_ready``."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rel_err(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


def random_tree(abstract, seed: int = 0):
    """Random arrays with the shapes, dtypes and shardings of an abstract pytree: floats ~ N(0, 0.02), norm
    weights ~ 1 + N(0, 0.02), AdamW's second moments |N(0, 0.02)| (a negative one would turn the update into
    NaN, and NaN routing sends every token to one expert), integers 0."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    names = [jax.tree_util.keystr(p) for p, _ in paths]
    leaves = [leaf for _, leaf in paths]

    def fill(key):
        keys = jax.random.split(key, len(leaves))
        out = []
        for name, leaf, k in zip(names, leaves, keys):
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                out.append(jnp.zeros(leaf.shape, leaf.dtype))
                continue
            v = 0.02 * jax.random.normal(k, leaf.shape, jnp.float32)
            if ".nu[" in name:
                v = jnp.abs(v)
            elif "norm']['weight" in name and ".mu[" not in name:
                v = 1 + v
            out.append(v.astype(leaf.dtype))
        return out

    shardings = [getattr(leaf, "sharding", None) for leaf in leaves]
    return jax.tree.unflatten(treedef, jax.jit(fill, out_shardings=shardings)(jax.random.key(seed)))


def top_kernels(trace_dir: str, *, steps: int, limit: int = 30) -> dict:
    """Device time per (thread, event name), ms per step, from the Perfetto trace ``jax.profiler.trace`` wrote:
    complete events on the GPU's threads (CUDA streams hold kernels; "XLA Ops" / "XLA Modules" the HLO ops and
    whole programs over the same time), the largest first, and each thread's busy total per step."""
    import gzip

    path = max(Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    meta = [e for e in events if e.get("ph") == "M"]
    gpu_pids = {e["pid"] for e in meta if e.get("name") == "process_name" and "GPU" in str(e["args"].get("name"))}
    threads = {(e["pid"], e["tid"]): str(e["args"].get("name")) for e in meta if e.get("name") == "thread_name"}
    totals: dict[tuple[str, str], float] = {}
    busy: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and (e.get("pid") in gpu_pids or not gpu_pids):  # no GPU: every thread (smoke)
            thread = threads.get((e["pid"], e.get("tid")), str(e.get("tid")))
            ms = e.get("dur", 0) / 1e3 / steps
            totals[thread, e["name"]] = totals.get((thread, e["name"]), 0.0) + ms
            busy[thread] = busy.get(thread, 0.0) + ms
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:limit]
    for thread, ms in sorted(busy.items(), key=lambda kv: -kv[1])[:6]:
        print(f"  thread {thread[:60]}: {ms:.3f} ms/step busy", flush=True)
    for (thread, name), ms in top:
        print(f"  {ms:8.3f} ms/step  [{thread[:24]}]  {name[:140]}", flush=True)
    return dict(trace=str(path), busy_ms_per_step=busy, top=[[t, n, ms] for (t, n), ms in top])


# ----------------------------------------------------------------------------------------------------------- gmm


def _groups(rng, m: int, e: int) -> np.ndarray:
    """Uneven group sizes over ``m - 37`` rows (37 rows past the last group), group 1 empty."""
    weights = rng.gamma(1.0, size=e)
    weights[1] = 0
    sizes = np.floor(weights / weights.sum() * (m - 37)).astype(np.int32)
    sizes[0] += m - 37 - sizes.sum()
    return sizes


def _gmm_case(name, e, k, n, m, *, kernel: bool, reps: int, seed: int) -> dict:
    from dsjax.ops.gpu_gmm import gpu_gmm

    r = dict(name=name, experts=e, k=k, n=n, rows=m, kernel=kernel)
    kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = (jax.random.normal(kw, (e, k, n), jnp.float32) * k**-0.5).astype(jnp.bfloat16)
    dy = jax.random.normal(kd, (m, n), jnp.bfloat16)
    sizes_np = _groups(np.random.default_rng(seed), m, e)
    sizes = jnp.asarray(sizes_np)
    rows = int(sizes.sum())
    useful = 2.0 * rows * k * n
    bounds = np.concatenate([[0], np.cumsum(sizes_np)])

    def exact(x, w):
        # One float32 matmul per group on static slices: XLA:GPU's float32 ragged_dot is dense over every group,
        # and at V3's shapes its compile ran past the part's time limit (autotuning).
        parts = [jnp.dot(x[a:b], w[g], precision="highest") for g, (a, b) in enumerate(itertools.pairwise(bounds))]
        return jnp.concatenate([*parts, jnp.zeros((m - rows, w.shape[-1]), x.dtype)])

    # float32 primals, so the reference gradients are not rounded back to bf16
    y_ref, vjp_ref = jax.jit(lambda x, w: jax.vjp(exact, x, w))(x.astype(jnp.float32), w.astype(jnp.float32))
    dx_ref, dw_ref = vjp_ref(dy.astype(jnp.float32))
    impls = {"ragged_dot (XLA)": functools.partial(jax.lax.ragged_dot, group_sizes=sizes)}
    if kernel:
        impls["gpu_gmm (Mosaic)"] = functools.partial(gpu_gmm, group_sizes=sizes)
    for label, f in impls.items():
        try:
            fwd = jax.jit(f)
            y = fwd(x, w)
            tail = float(jnp.abs(y[rows:].astype(jnp.float32)).max()) if m > rows else 0.0
            grads = jax.jit(lambda x, w, dy, f=f: jax.vjp(f, x, w)[1](dy))
            dx, dw = grads(x, w, dy)
            t_fwd = timed(fwd, x, w, reps=reps)
            t_both = timed(lambda x, w, dy, f=fwd, g=grads: (f(x, w), g(x, w, dy)), x, w, dy, reps=reps)
            r[label] = dict(
                rel_err_y=rel_err(y, y_ref), rel_err_dx=rel_err(dx, dx_ref), rel_err_dw=rel_err(dw, dw_ref),
                rows_past_groups_max_abs=tail, finite=bool(jnp.isfinite(y).all()),
                fwd_ms=t_fwd * 1e3, fwd_tflops=useful / t_fwd / 1e12,
                fwd_bwd_ms=t_both * 1e3, fwd_bwd_tflops=3 * useful / t_both / 1e12,
            )  # fmt: skip
        except Exception as ex:  # a failure is a result of this check, reported with the others
            r[label] = dict(error=f"{type(ex).__name__}: {str(ex)[:600]}")
        print(name, label, json.dumps(r[label]), flush=True)
    return r


def check_gmm(args) -> dict:
    from dsjax.ops.gpu_gmm import gpu_gmm_supported

    on_gpu = jax.default_backend() == "gpu"
    shapes = [
        ("V2-Lite w_gate/up", 64, 2048, 1408, 49152),
        ("V2-Lite w_down", 64, 1408, 2048, 49152),
        ("V3 w_gate/up (8 GPUs)", 32, 7168, 2048, 32768),
        ("V3 w_down (8 GPUs)", 32, 2048, 7168, 32768),
    ]
    if args.smoke:
        shapes = [("smoke", 4, 256, 128, 512)]
    results = [
        _gmm_case(*shape, kernel=on_gpu and gpu_gmm_supported(*shape[2:4], jnp.bfloat16), reps=args.reps, seed=i)
        for i, shape in enumerate(shapes)
    ]
    return dict(part="gmm", device=str(jax.devices()[0]), results=results)


# ---------------------------------------------------------------------------------------------------------- fp8k


def _fp8_case(name, e, k, n, m, *, reps: int, seed: int, check: bool) -> dict:
    """One GEMM shape (``e`` = 0: dense ``[m, k] x [k, n]``; else grouped over ``e`` experts): the kernels'
    forward and forward + backward times next to bf16's, and with ``check`` their values and gradients against
    the ``blocked`` backend's."""
    from dsjax.config import Fp8Recipe
    from dsjax.ops.fp8 import fp8_matmul
    from dsjax.ops.fp8_grouped import fp8_ragged_dot
    from dsjax.ops.gpu_gmm import gpu_gmm

    kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = (jax.random.normal(kw, (e, k, n) if e else (k, n), jnp.float32) * k**-0.5).astype(jnp.bfloat16)
    dy = jax.random.normal(kd, (m, n), jnp.bfloat16)
    sizes = jnp.asarray(_groups(np.random.default_rng(seed), m, e)) if e else None
    rows = int(sizes.sum()) if e else m
    if e:
        impls = {
            "bf16": functools.partial(gpu_gmm, group_sizes=sizes),
            "fp8 kernels": lambda x, w: fp8_ragged_dot(x, w, sizes, Fp8Recipe(backend="auto")),
            "fp8 blocked (XLA)": lambda x, w: fp8_ragged_dot(x, w, sizes, Fp8Recipe()),
        }
    else:
        impls = {
            "bf16": jnp.dot,
            "fp8 kernels": lambda x, w: fp8_matmul(x, w, Fp8Recipe(backend="auto")),
            "fp8 blocked (XLA)": lambda x, w: fp8_matmul(x, w, Fp8Recipe()),
        }
    if not check:
        del impls["fp8 blocked (XLA)"]  # at V3's grouped shapes XLA's dense-over-experts program is the slow path
    useful = 2.0 * rows * k * n
    r = dict(name=name, experts=e, k=k, n=n, rows=m)
    outs = {}
    for label, f in impls.items():
        try:
            fwd = jax.jit(f)
            grads = jax.jit(lambda x, w, dy, f=f: jax.vjp(f, x, w)[1](dy))
            outs[label] = (fwd(x, w), *grads(x, w, dy))
            t_fwd = timed(fwd, x, w, reps=reps)
            # the forward, then the vjp (which runs the forward again): counted as 3 GEMMs, as in the gmm part
            t_both = timed(lambda x, w, dy, f=fwd, g=grads: (f(x, w), g(x, w, dy)), x, w, dy, reps=reps)
            r[label] = dict(
                fwd_ms=t_fwd * 1e3, fwd_tflops=useful / t_fwd / 1e12,
                fwd_bwd_ms=t_both * 1e3, fwd_bwd_tflops=3 * useful / t_both / 1e12,
                finite=bool(all(jnp.isfinite(o).all() for o in outs[label])),
            )  # fmt: skip
        except Exception as ex:  # a failure is a result of this check, reported with the others
            r[label] = dict(error=f"{type(ex).__name__}: {str(ex)[:600]}")
        print(name, label, json.dumps(r[label]), flush=True)
    if "fp8 kernels" in outs:
        if "fp8 blocked (XLA)" in outs:  # the same recipe: only the summation order may differ
            pairs = zip(("y", "dx", "dw"), outs["fp8 kernels"], outs["fp8 blocked (XLA)"], strict=True)
            r["kernels_vs_blocked_rel_err"] = {nm: rel_err(a, b) for nm, a, b in pairs}
        if "bf16" in outs:  # FP8 against bf16: the recipe's own quantisation error, a few percent
            pairs = zip(("y", "dx", "dw"), outs["fp8 kernels"], outs["bf16"], strict=True)
            r["kernels_vs_bf16_rel_err"] = {nm: rel_err(a, b) for nm, a, b in pairs}
        if r["bf16"].get("fwd_bwd_ms") and r["fp8 kernels"].get("fwd_bwd_ms"):
            r["speedup_vs_bf16_fwd_bwd"] = r["bf16"]["fwd_bwd_ms"] / r["fp8 kernels"]["fwd_bwd_ms"]
        print(name, {k_: v for k_, v in r.items() if "rel_err" in k_ or "speedup" in k_}, flush=True)
    return r


def check_fp8_kernels(args) -> dict:
    shapes = [  # (name, experts (0: dense), k, n, rows, check against blocked)
        ("dense, small", 0, 1024, 768, 2048, True),
        ("grouped, small", 8, 1024, 768, 2048, True),
        ("V3 dense 7168 -> 2048 (shared expert)", 0, 7168, 2048, 8192, False),
        ("V3 attention output 16384 -> 7168", 0, 16384, 7168, 4096, False),
        ("V3 w_gate/up (8 GPUs)", 32, 7168, 2048, 32768, False),
        ("V3 w_down (8 GPUs)", 32, 2048, 7168, 32768, False),
    ]
    if args.smoke:
        shapes = shapes[:2]
    results = [_fp8_case(*shape[:5], reps=args.reps, seed=i, check=shape[5]) for i, shape in enumerate(shapes)]
    return dict(part="fp8k", device=str(jax.devices()[0]), results=results)


# --------------------------------------------------------------------------------------------------------- train


def _v2_lite(layers: int, **model):
    from dsjax.yaml_config import model_config_from_dict

    return model_config_from_dict({"preset": "deepseek_v2_lite", "model": dict(num_hidden_layers=layers, **model)})


def _real_target():
    from dsjax.aot.targets import CHIPS, Target

    name = jax.devices()[0].device_kind.lower()
    kind = "h200" if "h200" in name else "h100"
    return Target(f"1x{kind} (real)", tuple(jax.devices()[:1]), CHIPS[kind])


def check_train(args) -> dict:
    from dsjax.aot import steps
    from dsjax.aot.report import compile_report
    from dsjax.sharding import FSDP_RULES, make_mesh
    from dsjax.train.config import TrainConfig

    if args.smoke:
        from dsjax.config import PRESETS

        name, cfg, batch, seq = "tiny", PRESETS["tiny"](), 2, 64
    else:
        name, cfg, batch, seq = "deepseek_v2_lite", _v2_lite(args.layers), args.batch, args.seq
    tgt = _real_target() if jax.default_backend() == "gpu" else None
    # compile_report compiles the step, then it is compiled again to run: the second comes from this cache
    jax.config.update("jax_compilation_cache_dir", "/tmp/dsjax_gpu_check_cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    mesh = make_mesh(1, 1, jax.devices()[:1])
    results = []
    for dispatch in args.dispatch:
        tc = TrainConfig(compute_dtype="bfloat16", moment_dtype="bfloat16", remat=args.remat, dispatch=dispatch,
                         loss_chunk=512)  # fmt: skip
        r = dict(model=f"{name} x {cfg.num_hidden_layers} layers", batch=batch, seq=seq, dispatch=dispatch,
                 remat=args.remat)  # fmt: skip
        try:
            program = steps.train_program(cfg, tc, mesh, FSDP_RULES, batch=batch, seq=seq)
            if tgt is not None:
                r["report"] = compile_report(program, tgt, mesh, name=r["model"])
            with jax.set_mesh(mesh):
                compiled = program.fn.lower(*program.args).compile()
            state = random_tree(program.args[0])
            rng = np.random.default_rng(1)
            ids = rng.integers(0, cfg.vocab_size, (2, batch, seq))
            data = dict(
                tokens=ids[0], targets=ids[1], positions=np.broadcast_to(np.arange(seq), (batch, seq)),
                segment_ids=np.ones((batch, seq)), loss_mask=np.ones((batch, seq), bool),
            )  # fmt: skip
            data = {k: jax.device_put(np.asarray(v, a.dtype), a.sharding) for (k, v), a in zip(data.items(),
                    program.args[1].values())}  # fmt: skip
            times = []
            for i in range(args.steps + 2):
                t = time.perf_counter()
                state, metrics = compiled(state, data)
                jax.block_until_ready((state, metrics))
                if i >= 2:
                    times.append(time.perf_counter() - t)
            step_s = statistics.median(times)
            if args.profile:
                with jax.profiler.trace(args.profile, create_perfetto_trace=True):
                    for _ in range(3):
                        state, metrics = compiled(state, data)
                    jax.block_until_ready((state, metrics))
                r["profile"] = top_kernels(args.profile, steps=3)
            stats = jax.devices()[0].memory_stats() or {}
            peak = stats.get("peak_bytes_in_use")
            flops = program.model_flops
            r.update(step_s=step_s, tokens_per_s=batch * seq / step_s, model_tflops=flops / step_s / 1e12,
                     loss=float(metrics["loss"]) if "loss" in metrics else None,
                     peak_gib=peak / 2**30 if peak else None)  # fmt: skip
            if tgt is not None:
                r["measured_mfu"] = flops / step_s / tgt.chip.bf16_flops
                r["compiled_tflops_per_s"] = r["report"].get("flops_per_chip", 0) / step_s / 1e12
            del state
        except Exception as ex:
            r["error"] = f"{type(ex).__name__}: {str(ex)[:800]}"
        slim = {k: v for k, v in r.items() if k != "report"}
        if "report" in r:
            slim.update({k: r["report"].get(k) for k in ("hbm_per_chip_gib", "flops_ratio", "est_mfu", "compile_s")})
        print(json.dumps(slim, default=float), flush=True)
        results.append(r)
    return dict(part="train", device=str(jax.devices()[0]), results=results)


# -------------------------------------------------------------------------------------------------------- decode


def check_decode(args) -> dict:
    from dsjax.aot import steps
    from dsjax.config import PRESETS
    from dsjax.sharding import DEFAULT_RULES, make_mesh

    name, cfg = ("tiny", PRESETS["tiny"]()) if args.smoke else ("deepseek_v2_lite", _v2_lite(27))
    batch, context = (2, 32) if args.smoke else (args.batch, args.context)
    mesh = make_mesh(1, 1, jax.devices()[:1])
    r = dict(model=f"{name} x {cfg.num_hidden_layers} layers", batch=batch, context=context)
    try:
        program = steps.decode_program(cfg, mesh, DEFAULT_RULES, batch=batch, context=context)
        t = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = program.fn.lower(*program.args).compile()
        r["compile_s"] = time.perf_counter() - t
        state, cache = random_tree(program.args[0]), random_tree(program.args[1], seed=1)
        rng = np.random.default_rng(2)
        token = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, 1)), jnp.int32)
        position = jnp.full((batch, 1), context - 1, jnp.int32)
        times = []
        for i in range(args.steps + 2):
            t = time.perf_counter()
            logits, cache = compiled(state, cache, token, position)
            jax.block_until_ready((logits, cache))
            if i >= 2:
                times.append(time.perf_counter() - t)
        step_s = statistics.median(times)
        weights, cache_bytes = (sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t)) for t in (state, cache))
        r.update(step_ms=step_s * 1e3, tokens_per_s=batch / step_s, weight_gb=weights / 1e9,
                 cache_gb=cache_bytes / 1e9, achieved_tb_per_s=(weights + cache_bytes) / step_s / 1e12,
                 finite=bool(jnp.isfinite(logits).all()))  # fmt: skip
    except Exception as ex:
        r["error"] = f"{type(ex).__name__}: {str(ex)[:800]}"
    print(json.dumps(r, default=float), flush=True)
    return dict(part="decode", device=str(jax.devices()[0]), results=[r])


PARTS = {"gmm": check_gmm, "fp8k": check_fp8_kernels, "train": check_train, "decode": check_decode}

# ``all``: each part in its own process (a hang or a crash costs that part only), most telling first, with
# wall-clock limits that keep the whole run inside one device lease's command (at most 9.5 minutes).
# (``scripts/fp8_gpu_check.py``, XLA's FP8 GEMM forms, was part of it; it has answered its questions and runs
# alone.)
ALL = [
    ("fp8k", ["fp8k", "--reps", "5"], 150),
    ("gmm", ["gmm", "--reps", "5"], 130),
    ("train", ["train", "--dispatch", "auto", "ragged"], 170),
    ("decode", ["decode", "--batch", "64"], 110),
]


def run_all(out_dir: str, smoke: bool = False) -> None:
    import subprocess

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, argv, limit in ALL:
        script = Path(__file__)
        out = str(Path(out_dir) / f"{name}.json")
        start = time.perf_counter()
        try:
            extra = ["--smoke"] if smoke else []
            proc = subprocess.run([sys.executable, str(script), *argv, *extra, "--out", out], timeout=limit,
                                  capture_output=True, text=True)  # fmt: skip
            log, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            log, rc = (e.stdout or b"").decode() + (e.stderr or b"").decode(), "timeout"
        Path(out_dir, f"{name}.log").write_text(log)
        summary[name] = dict(rc=rc, seconds=round(time.perf_counter() - start, 1))
        print(f"== {name}: rc={rc} in {summary[name]['seconds']} s", flush=True)
        print("\n".join(line[:400] for line in log.splitlines()[-12:]), flush=True)
    print(json.dumps(summary), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=[*sorted(PARTS), "all"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any backend")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5, help="timed train / decode steps after 2 warm-up steps")
    parser.add_argument("--layers", type=int, default=4, help="train: V2-Lite layers (1 dense + MoE)")
    parser.add_argument("--batch", type=int, default=4, help="train: rows per step; decode: sequences")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--context", type=int, default=4096, help="decode: cached tokens per sequence")
    parser.add_argument("--dispatch", nargs="+", default=["auto"], help="train: MoE dispatch(es) to compare")
    parser.add_argument("--remat", default="full")
    parser.add_argument("--profile", metavar="DIR", help="train: also trace 3 steps here and list the top kernels")
    parser.add_argument("--out", help="write the part's JSON object here (all: the folder for each part's files)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.part == "all":
        return run_all(args.out or "gpu_check", args.smoke)
    result = PARTS[args.part](args)
    result["versions"] = {m: __import__(m).__version__ for m in ("jax", "flax", "optax")}
    if args.out:
        Path(args.out).write_text(json.dumps(result, default=float, indent=1))
    if args.json:
        print(json.dumps(result, default=float), flush=True)


if __name__ == "__main__":
    main()
