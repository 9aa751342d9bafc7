"""One-shot FP8 GEMM check for an H100/H200: does any JAX formulation reach an FP8 tensor-core kernel, and what
does DeepSeek's fine-grained recipe (``dsjax.ops.fp8``) cost next to a bf16 GEMM?

It answers the open GPU questions of ``shared/reference/fp8.md`` §6:

* does the ``blocked`` backend's batched fp8 x fp8 -> fp32 dot reach an FP8 kernel (cuBLASLt ``$f8`` custom call,
  cuDNN, or a Triton gemm fusion whose ``dot`` still has f8 operands), or does XLA upcast it to bf16/f32 first?
* blocked (and reference) vs bf16 time on the DeepSeek-V3 GEMM shapes (8192 x 7168 x 2048 first);
* does a per-tensor-scaled fp8 dot (scalar scales, the pattern XLA rewrites to ``__cublas$lt$matmul$f8``) get the
  FP8 speedup, and do ``jax.lax.scaled_dot`` / ``jax.nn.scaled_matmul`` have a Hopper fast path at all?

For every (shape, variant) it compiles once (``jax.jit(f).lower(...).compile()``), greps the optimised HLO for
FP8 kernels, times the compiled executable (warmup, then the median over repetitions of back-to-back calls ended
by ``block_until_ready``) and reports ms, TFLOP/s (``2*M*K*N / t``), the speedup over bf16 and the relative
Frobenius difference from the bf16 result (about 3-4% is expected for FP8; ~0 means nothing was quantised).
Then fwd+bwd (``jax.vjp``) of ``fp8_matmul`` vs bf16 at the headline shape, and the grouped expert GEMM
(``fp8_ragged_dot`` vs ``lax.ragged_dot``). Errors (OOM, no lowering) are reported per variant, not fatal; a
time budget skips what is left, least important last (the M=4096 sweep).

Variants (forward, bf16 in and out): ``bf16`` jnp.dot; ``fp8_tensor`` lax.dot_general(e4m3, e4m3) -> bf16 times
one scalar scale; ``fp8_tensor_qdq`` the same written as dequantise-then-dot (``convert * broadcast(scale)``, the
form XLA's FP8 GEMM rewriter pattern-matches); ``fp8_tensor_dyn`` per-tensor current scaling of x inside the step;
``blocked_gemm`` / ``reference_gemm`` the two backends of ``fp8.gemm`` on pre-quantised operands (GEMM alone);
``fp8_matmul_blocked`` / ``fp8_matmul_reference`` the whole op (quantising x and w each call, as training does);
``lax.scaled_dot`` (1x128 activation scales, weight scales expanded to 128x1) and ``nn.scaled_matmul`` (the
cuDNN block-scaled custom call). "jax f8 dot" in the summary says whether the HLO JAX emits holds an fp8 x fp8 dot
at all, so an upcast can be told apart from one JAX wrote itself.

Run (GPU; about 3-4 minutes on an H200 including compiles, ``--budget-s`` caps the sweep; the device image's
python3 has jax with CUDA but not all of dsjax's dependencies, so only ``dsjax/config.py`` and the
``dsjax/ops/fp8*.py`` modules are loaded when ``import dsjax`` fails):

    PYTHONUNBUFFERED=1 python3 scripts/fp8_gpu_check.py --json --out $OUT/fp8_gpu_check.json

``XLA_FLAGS=--xla_gpu_enable_triton_gemm=false`` (for one) shows what cuBLAS alone does with the same HLO.

Smoke test (any backend, tiny shapes, one repetition, < 30 s on CPU):

    python scripts/fp8_gpu_check.py --small --json

With ``--json`` the last line of output is one JSON object (per shape and variant: ms, tflops, speedup_vs_bf16,
rel_err_vs_bf16, compile_s, fp8_ops, fp8_ops_pre_opt, gemm_kernels or error; plus ``fp8_kernel_reached``
{variant: bool}); ``--out`` also writes it after every task, so a run cut short still leaves its figures.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import importlib.metadata
import json
import re
import statistics
import time
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp

try:
    from dsjax.config import Fp8Recipe
    from dsjax.ops import fp8, fp8_grouped
except ImportError:  # dsjax/__init__ pulls in the framework (flax, grain, ...), maybe absent on a bare GPU image:
    for _name in ("dsjax", "dsjax.ops"):  # load just config.py and the ops/fp8 modules, which need only jax and numpy
        _pkg = types.ModuleType(_name)
        _pkg.__path__ = [str(Path(__file__).resolve().parents[1].joinpath(*_name.split(".")))]
        sys.modules[_name] = _pkg
    from dsjax.config import Fp8Recipe
    from dsjax.ops import fp8, fp8_grouped

E4M3 = jnp.float8_e4m3fn

# DeepSeek-V3 GEMMs (K, N, name): MLA projections, dense MLP, routed/shared expert.
V3_SHAPES = [
    (7168, 2048, "expert gate/up 7168->2048"),
    (2048, 7168, "expert down 2048->7168"),
    (7168, 1536, "q_a 7168->1536"),
    (7168, 576, "kv_a 7168->576"),
    (1536, 24576, "q_b 1536->24576"),
    (512, 32768, "kv_b 512->32768"),
    (16384, 7168, "o_proj 16384->7168"),
    (7168, 18432, "mlp gate/up 7168->18432"),
    (18432, 7168, "mlp down 18432->7168"),
]
SMALL_SHAPES = [(512, 384, "small 512->384"), (384, 200, "small 384->200 (ragged N)")]

# ---- HLO inspection ----------------------------------------------------------------------------------------

_F8 = {"f8e4m3fn", "f8e5m2", "f8e4m3fnuz", "f8e5m2fnuz", "f8e4m3", "f8e3m4", "f8e4m3b11fnuz"}
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = ([a-z][a-z0-9]*)\[")
_OP = re.compile(r"\b(dot|scaled-dot|ragged-dot|convolution|custom-call)\(([^)]*)\)")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) ")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_KIND = re.compile(r'"kind":"([\w$]+)"')


def hlo_fp8_report(hlo: str) -> dict:
    """FP8 evidence in optimised HLO text: matmul-like ops (dot / custom-call ...) whose two first operands are
    fp8, labelled with the custom-call target or the kind of the fusion that holds them; plus the GEMM kernels
    seen (cuBLAS/cuDNN custom calls, gemm fusion kinds) for diagnosis."""
    dtype_of: dict[str, str] = {}
    comp_of_line: list[str | None] = []
    comp = None
    lines = hlo.splitlines()
    fusion_kind: dict[str, str] = {}  # called computation -> kind of the fusion / custom call that calls it
    gemm_kernels: set[str] = set()
    for line in lines:
        if not line.startswith(" "):
            m = _COMP.match(line)
            comp = m.group(1) if m else comp
        comp_of_line.append(comp)
        if m := _DEF.match(line):
            dtype_of[m.group(1)] = m.group(2)
        kind = _KIND.search(line)
        for called in _CALLS.findall(line):
            if kind:
                fusion_kind[called] = kind.group(1)
        t = _TARGET.search(line)
        if t and any(s in t.group(1) for s in ("cublas", "cudnn", "gemm", "matmul", "dot")):
            gemm_kernels.add(t.group(1))
        if kind and any(s in kind.group(1) for s in ("gemm", "dot", "cudnn", "cublas", "ynn", "onednn")):
            gemm_kernels.add(kind.group(1))
    evidence: set[str] = set()
    for line, comp in zip(lines, comp_of_line):
        m = _OP.search(line)
        if not m:
            continue
        operands = [o.strip().lstrip("%") for o in m.group(2).split(",")]
        op_types = [dtype_of.get(o, "?") for o in operands[:2]]
        if len(op_types) == 2 and all(t in _F8 for t in op_types):
            if m.group(1) == "custom-call":
                t = _TARGET.search(line)
                where = t.group(1) if t else "?"
            else:
                where = fusion_kind.get(comp or "", comp or "?")
            evidence.add(f"{m.group(1)}({op_types[0]},{op_types[1]}) in {where}")
    return {"fp8_ops": sorted(evidence), "gemm_kernels": sorted(gemm_kernels)}


# ---- timing ------------------------------------------------------------------------------------------------


def _median_time(compiled, args, reps: int, warmup: int, target_s: float) -> float:
    """Seconds per call: warmup calls, then the median over ``reps`` of ``inner`` back-to-back calls (sized so a
    repetition lasts about ``target_s``, to hide dispatch overhead for small GEMMs) ended by one block."""
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        jax.block_until_ready(compiled(*args))
    inner = max(1, min(50, int(target_s / max(first, 1e-6)))) if warmup > 0 else 1
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = compiled(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def _short_error(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:240] if msg else ''}"


@jax.jit
def _rel_fro(y, ref):
    """``||y - ref|| / ||ref||`` on the device (outputs can be GBs; no host copy)."""
    y, ref = y.astype(jnp.float32), ref.astype(jnp.float32)
    return jnp.linalg.norm(y - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30)


class Runner:
    def __init__(self, args, platform: str):
        self.args = args
        self.platform = platform
        self.start = time.perf_counter()
        self.kernel_reached: dict[str, bool] = {}
        self.fp8_hlo: dict[str, list[str]] = {}
        self.fp8_pre_opt: dict[str, bool] = {}  # JAX emitted an fp8 x fp8 matmul (before XLA's passes)
        self.skipped: list[str] = []

    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.args.budget_s

    def measure(self, name: str, fn: Callable, args: tuple, flops: float, ref=None, out_index=None, keep=False):
        """Compile ``fn`` on ``args``, inspect its HLO, time it, compare output ``out_index`` with ``ref``; never
        raises. Returns ``(record, output if keep else None)``."""
        rec: dict = {}
        kept = None
        try:
            t0 = time.perf_counter()
            lowered = jax.jit(fn).lower(*args)
            rec["fp8_ops_pre_opt"] = hlo_fp8_report(lowered.as_text(dialect="hlo"))["fp8_ops"]
            self.fp8_pre_opt[name] = self.fp8_pre_opt.get(name, False) or bool(rec["fp8_ops_pre_opt"])
            compiled = lowered.compile()
            rec["compile_s"] = round(time.perf_counter() - t0, 2)
            hlo = hlo_fp8_report(compiled.as_text())
            reached = bool(hlo["fp8_ops"]) and self.platform != "cpu"
            rec["fp8_kernel"] = reached
            rec["fp8_ops"] = hlo["fp8_ops"]
            rec["gemm_kernels"] = hlo["gemm_kernels"]
            self.kernel_reached[name] = self.kernel_reached.get(name, False) or reached
            self.fp8_hlo[name] = sorted(set(self.fp8_hlo.get(name, [])) | set(hlo["fp8_ops"]))
            t = _median_time(compiled, args, self.args.reps, self.args.warmup, self.args.target_s)
            rec["ms"] = round(t * 1e3, 4)
            rec["tflops"] = round(flops / t / 1e12, 3)
            if ref is not None or keep:
                y = compiled(*args)
                y = y if out_index is None else y[out_index]
                if ref is not None:
                    rec["rel_err_vs_bf16"] = round(float(_rel_fro(y, ref)), 5)
                kept = y if keep else None
                del y
        except Exception as e:  # OOM, no lowering, compile failure: report and go on
            rec["error"] = _short_error(e)
            self.kernel_reached.setdefault(name, False)
        return rec, kept

    def run_variants(self, where: str, key: str, fns: dict, flops: float, out_index=None) -> dict:
        """Measure ``{name: (fn, args)}`` in order; the first one ("bf16") is the time and output baseline.
        ``key + name`` labels the variant in the fp8-kernel summary (shapes of one sweep share it)."""
        out: dict = {}
        ref = bf16_ms = None
        for i, (name, (fn, args)) in enumerate(fns.items()):
            if self.over_budget():
                self.skipped.append(f"{where} {name}")
                continue
            rec, y = self.measure(key + name, fn, args, flops, ref=ref, out_index=out_index, keep=i == 0)
            if i == 0 and "error" not in rec:
                ref, bf16_ms = y, rec["ms"]
            if bf16_ms and rec.get("ms"):
                rec["speedup_vs_bf16"] = round(bf16_ms / rec["ms"], 3)
            out[name] = rec
            _print_row(name, rec, bf16_ms)
        return out


def _versions() -> dict:
    out = {}
    for pkg in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def _print_row(name: str, rec: dict, bf16_ms: float | None):
    if "error" in rec:
        print(f"    {name:<22} ERROR {rec['error']}", flush=True)
        return
    speed = f"{bf16_ms / rec['ms']:6.2f}x" if bf16_ms and rec.get("ms") else "     - "
    err = f"{rec['rel_err_vs_bf16']:.4f}" if "rel_err_vs_bf16" in rec else "   -  "
    fp8 = ", ".join(rec["fp8_ops"]) if rec["fp8_ops"] else "no fp8 op (upcast)"
    print(
        f"    {name:<22} {rec['ms']:10.3f} ms {rec['tflops']:9.2f} TFLOP/s {speed} vs bf16  err {err}  "
        f"compile {rec['compile_s']:5.1f}s  {fp8}",
        flush=True,
    )


# ---- the variants ------------------------------------------------------------------------------------------


def _per_tensor_quantize(v):
    """Current (online) per-tensor scaling: one fp32 scale ``amax / 448``."""
    s = jnp.maximum(jnp.max(jnp.abs(v.astype(jnp.float32))), 1e-4) / fp8.E4M3_MAX
    return jnp.clip(v.astype(jnp.float32) / s, -fp8.E4M3_MAX, fp8.E4M3_MAX).astype(E4M3), s


_DN = (((1,), (0,)), ((), ()))


def gemm_variants(blocked: Fp8Recipe, reference: Fp8Recipe, block: int) -> dict[str, tuple[Callable, str]]:
    """name -> (fn, which inputs it takes); inputs: 'x'/'w' bf16, 'q' block-quantised, 't' per-tensor."""

    def bf16(x, w):
        return jnp.dot(x, w, preferred_element_type=jnp.bfloat16)

    def fp8_tensor(xq, sx, wq, sw):  # fp8 x fp8 dot, scalar scales applied to the output
        y = jax.lax.dot_general(xq, wq, _DN, preferred_element_type=jnp.bfloat16)
        return (y * (sx * sw).astype(jnp.bfloat16)).astype(jnp.bfloat16)

    def fp8_tensor_qdq(xq, sx, wq, sw):  # dequantise-then-dot: the convert * broadcast(scale) pattern XLA matches
        x = xq.astype(jnp.bfloat16) * sx.astype(jnp.bfloat16)
        w = wq.astype(jnp.bfloat16) * sw.astype(jnp.bfloat16)
        return jax.lax.dot_general(x, w, _DN, preferred_element_type=jnp.bfloat16)

    def fp8_tensor_dyn(x, wq, sw):  # per-tensor current scaling of x inside the step, weight pre-quantised
        xq, sx = _per_tensor_quantize(x)
        y = jax.lax.dot_general(xq, wq, _DN, preferred_element_type=jnp.float32)
        return (y * (sx * sw)).astype(jnp.bfloat16)

    def blocked_gemm(xq, sx, wq, sw):  # the blocked backend's GEMM alone, operands already quantised
        return fp8.gemm(xq, sx, wq, sw, col_block=block, recipe=blocked).astype(jnp.bfloat16)

    def reference_gemm(xq, sx, wq, sw):
        return fp8.gemm(xq, sx, wq, sw, col_block=block, recipe=reference).astype(jnp.bfloat16)

    def fp8_matmul_blocked(x, w):  # what a training step pays: quantise x and w, then the GEMM
        return fp8.fp8_matmul(x, w, blocked)

    def fp8_matmul_reference(x, w):
        return fp8.fp8_matmul(x, w, reference)

    def scaled_dot(xq, sx, wq, sw):  # 1x128 activation tiles; weight scales expanded to 128x1 (N must match)
        n = wq.shape[1]
        sw_cols = jnp.repeat(sw, block, axis=1)[:, :n]
        return jax.lax.scaled_dot(xq, wq, lhs_scale=sx, rhs_scale=sw_cols, preferred_element_type=jnp.bfloat16)

    def scaled_matmul(xq, sx, wq, sw):  # (B, M, K) x (B, N, K), block size inferred as K / scales.shape[-1]
        n = wq.shape[1]
        sw_cols = jnp.repeat(sw, block, axis=1)[:, :n]
        return jax.nn.scaled_matmul(xq[None], wq.T[None], sx[None], sw_cols.T[None], jnp.bfloat16)[0]

    return {
        "bf16": (bf16, "x w"),
        "fp8_tensor": (fp8_tensor, "tq"),
        "fp8_tensor_qdq": (fp8_tensor_qdq, "tq"),
        "fp8_tensor_dyn": (fp8_tensor_dyn, "x twq"),
        "blocked_gemm": (blocked_gemm, "q"),
        "fp8_matmul_blocked": (fp8_matmul_blocked, "x w"),
        "reference_gemm": (reference_gemm, "q"),
        "fp8_matmul_reference": (fp8_matmul_reference, "x w"),
        "lax.scaled_dot": (scaled_dot, "q"),
        "nn.scaled_matmul": (scaled_matmul, "q"),
    }


def _inputs(m: int, k: int, n: int, recipe: Fp8Recipe, seed: int = 0) -> dict:
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = (0.02 * jax.random.normal(kw, (k, n), jnp.float32)).astype(jnp.bfloat16)
    xq, sx = jax.jit(lambda v: fp8.quantize_rows(v, recipe))(x)
    wq, sw = jax.jit(lambda v: fp8.quantize_blocks(v, recipe))(w)
    txq, tsx = jax.jit(_per_tensor_quantize)(x)
    twq, tsw = jax.jit(_per_tensor_quantize)(w)
    return {
        "x w": (x, w),
        "q": (xq, sx, wq, sw),
        "tq": (txq, tsx, twq, tsw),
        "x twq": (x, twq, tsw),
    }


def run_gemm_shape(runner: Runner, m: int, k: int, n: int, label: str, variants: dict, recipe: Fp8Recipe) -> dict:
    flops = 2.0 * m * k * n
    print(f"\n  M={m} K={k} N={n}  ({label}, {flops / 1e9:.1f} GFLOP)", flush=True)
    entry: dict = {"M": m, "K": k, "N": n, "name": label, "variants": {}}
    try:
        inputs = _inputs(m, k, n, recipe)
    except Exception as e:
        entry["error"] = _short_error(e)
        print(f"    inputs ERROR {entry['error']}", flush=True)
        return entry
    fns = {name: (fn, inputs[kind]) for name, (fn, kind) in variants.items()}
    entry["variants"] = runner.run_variants(f"M={m} {label}", "", fns, flops)
    del inputs, fns
    return entry


def run_fwd_bwd(runner: Runner, m: int, k: int, n: int, blocked: Fp8Recipe, reference: Fp8Recipe) -> dict:
    """y, dx, dw of one linear: bf16 autodiff vs the fp8_matmul custom_vjp (3 GEMMs, 6*M*K*N flops)."""
    flops = 6.0 * m * k * n
    print(f"\n  fwd+bwd M={m} K={k} N={n} ({flops / 1e9:.1f} GFLOP)", flush=True)
    out: dict = {"M": m, "K": k, "N": n, "variants": {}}
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = (0.02 * jax.random.normal(kw, (k, n), jnp.float32)).astype(jnp.bfloat16)
    g = jax.random.normal(kg, (m, n), jnp.bfloat16)

    def make(mm):
        def f(x, w, g):
            y, pull = jax.vjp(mm, x, w)
            dx, dw = pull(g)
            return y, dx, dw

        return f

    fns = {
        "bf16": make(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.bfloat16)),
        "fp8_matmul_blocked": make(lambda x, w: fp8.fp8_matmul(x, w, blocked)),
        "fp8_matmul_reference": make(lambda x, w: fp8.fp8_matmul(x, w, reference)),
    }
    fns = {name: (fn, (x, w, g)) for name, fn in fns.items()}
    out["variants"] = runner.run_variants(
        "fwd_bwd", "fwd_bwd:", fns, flops, out_index=2
    )  # rel_err: the weight gradients
    return out


def run_ragged(runner: Runner, s: int, k: int, n: int, e: int, blocked: Fp8Recipe, reference: Fp8Recipe) -> dict:
    """Grouped expert GEMM, forward: rows split evenly over ``e`` experts."""
    flops = 2.0 * s * k * n
    print(f"\n  ragged S={s} K={k} N={n} E={e} ({flops / 1e9:.1f} GFLOP)", flush=True)
    out: dict = {"S": s, "K": k, "N": n, "E": e, "variants": {}}
    kx, kw = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (s, k), jnp.bfloat16)
    w = (0.02 * jax.random.normal(kw, (e, k, n), jnp.float32)).astype(jnp.bfloat16)
    sizes = jnp.full((e,), s // e, jnp.int32)
    fns = {
        "bf16": lambda x, w, gs: jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.bfloat16),
        "fp8_ragged_blocked": lambda x, w, gs: fp8_grouped.fp8_ragged_dot(x, w, gs, blocked),
        "fp8_ragged_reference": lambda x, w, gs: fp8_grouped.fp8_ragged_dot(x, w, gs, reference),
    }
    fns = {name: (fn, (x, w, sizes)) for name, fn in fns.items()}
    out["variants"] = runner.run_variants("ragged", "ragged:", fns, flops)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes, 1 repetition (CPU smoke test)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--out", help="also write the JSON object to this file (rewritten after every task)")
    p.add_argument("--tokens", type=int, nargs="+", help="M values (default 8192 4096; --small: 256)")
    p.add_argument("--reps", type=int, help="timed repetitions (default 5; --small: 1)")
    p.add_argument("--warmup", type=int, help="warmup calls (default 2; --small: 1)")
    p.add_argument("--target-s", type=float, help="length of one repetition (default 0.02 s; --small: 0)")
    p.add_argument("--budget-s", type=float, default=200.0, help="skip what is left after this many seconds")
    p.add_argument("--no-ragged", action="store_true", help="skip the grouped (expert) GEMM")
    args = p.parse_args(argv)
    args.tokens = args.tokens or ([256] if args.small else [8192, 4096])
    args.reps = args.reps or (1 if args.small else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 2)
    args.target_s = args.target_s if args.target_s is not None else (0.0 if args.small else 0.02)

    dev = jax.devices()[0]
    platform = dev.platform
    blocked, reference = Fp8Recipe(backend="blocked"), Fp8Recipe(backend="reference")
    block = blocked.block
    print(f"device: {dev.device_kind} ({platform}, {jax.device_count()} devices)  jax {jax.__version__}", flush=True)
    print(f"packages: {_versions()}  platform_version: {getattr(dev.client, 'platform_version', None)}", flush=True)
    print(f"tokens {args.tokens}, reps {args.reps}, warmup {args.warmup}, budget {args.budget_s:.0f}s", flush=True)

    runner = Runner(args, platform)
    result: dict = {
        "device": dev.device_kind,
        "platform": platform,
        "jax": jax.__version__,
        "packages": _versions(),
        "platform_version": getattr(dev.client, "platform_version", None),
        "small": args.small,
        "gemm": [],
        "fwd_bwd": None,
        "ragged": None,
    }

    def snapshot():
        result["fp8_kernel_reached"] = dict(runner.kernel_reached)
        result["fp8_hlo"] = dict(runner.fp8_hlo)
        result["fp8_emitted_by_jax"] = dict(runner.fp8_pre_opt)
        result["skipped"] = list(runner.skipped)
        result["elapsed_s"] = round(time.perf_counter() - runner.start, 1)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))

    variants = gemm_variants(blocked, reference, block)
    shapes = SMALL_SHAPES if args.small else V3_SHAPES
    head_k, head_n, _ = shapes[0]
    # order of importance: the headline shape, its fwd+bwd, experts grouped, the rest of the sweep, smaller M
    tasks: list[tuple[str, tuple]] = [("gemm", (args.tokens[0], *shapes[0]))]
    tasks.append(("fwd_bwd", (args.tokens[0], head_k, head_n)))
    if not args.no_ragged:
        tasks.append(("ragged", (args.tokens[0], head_k, head_n, 4 if args.small else 8)))
    tasks += [("gemm", (args.tokens[0], *s)) for s in shapes[1:]]
    tasks += [("gemm", (m, *s)) for m in args.tokens[1:] for s in shapes]

    print("\nforward GEMMs (bf16 in/out; fp8 variants quantise to E4M3):", flush=True)
    for kind, spec in tasks:
        if runner.over_budget():
            runner.skipped.append(f"{kind} {spec}")
            continue
        if kind == "gemm":
            result["gemm"].append(run_gemm_shape(runner, *spec, variants, blocked))
        elif kind == "fwd_bwd":
            result["fwd_bwd"] = run_fwd_bwd(runner, *spec, blocked, reference)
        else:
            result["ragged"] = run_ragged(runner, *spec, blocked, reference)
        snapshot()
    snapshot()

    print("\nfp8 kernel reached (an fp8 x fp8 matmul op survives in the optimised HLO, on an accelerator);")
    print("'jax f8 dot': the HLO JAX emits has an fp8 x fp8 dot, i.e. any upcast is XLA's doing:")
    for name, reached in runner.kernel_reached.items():
        ops = "; ".join(runner.fp8_hlo.get(name, [])) or "-"
        pre = "yes" if runner.fp8_pre_opt.get(name) else "no "
        print(f"  {name:<32} {'YES' if reached else 'no ':<4} jax f8 dot: {pre}  {ops}")
    if platform == "cpu":
        print("  (CPU: no fp8 tensor cores; fp8 dots are upcast, so every entry is 'no' by construction)")
    if runner.skipped:
        print(f"skipped (time budget): {len(runner.skipped)} items, first: {runner.skipped[0]}")
    print(f"elapsed {result['elapsed_s']}s")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
