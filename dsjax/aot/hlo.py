"""Reading a compiled program's optimised HLO text: matmul flops and collectives, with loop trip counts.

XLA's ``cost_analysis()`` counts the body of a ``while`` loop once, so for a model whose layers run under
``lax.scan`` it reports the flops of one layer's iteration, not of the whole stack; the GPU client gives no cost
analysis at all. This module walks the HLO's call graph instead: every computation is weighted by how many times
it runs (``while`` bodies by their trip count: XLA's ``known_trip_count`` where recorded, else the constant
bound of the loop condition's ``counter < N`` less the counter's constant start, which is how ``lax.scan``
loops read, also after XLA peels an iteration off), and matmul-like
instructions (``dot``, ``convolution``, ragged-dot kernels, cuBLAS GEMM calls) and collectives are counted with
that weight. Shapes in optimised HLO are per device, so the counts are per device too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import defaultdict

_DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1, "f8e8m0fnu": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
COLLECTIVES = (
    "all-to-all", "ragged-all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute",
    "collective-broadcast",
)  # fmt: skip
_FLOATS = ("bf16", "f16", "f32")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_CALLEE = re.compile(
    r"\b(calls|to_apply|body|condition|branch_computations|called_computations)=(\{[^}]*\}|%?[\w.\-]+)"
)
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_PARAM = re.compile(r"([\w.\-]+):\s*((?:\([^)]*\))|(?:\w+\[[0-9,]*\]))")


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(text)]


def _nbytes(shapes) -> int:
    return sum(_DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in shapes)


def _operands(args: str) -> str:
    """The operand list of an instruction (its text up to the matching closing parenthesis)."""
    depth = 1
    for i, ch in enumerate(args):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return args[:i]
    return args


@dataclasses.dataclass
class HloCounts:
    """Per-device totals of one program (loop-weighted)."""

    matmul_flops: float = 0.0
    collectives: dict = dataclasses.field(default_factory=lambda: defaultdict(lambda: {"count": 0, "bytes": 0}))
    unknown_trip_counts: int = 0  # while loops without a known trip count (counted once)

    @property
    def collective_bytes(self) -> int:
        return sum(v["bytes"] for v in self.collectives.values())

    def as_dict(self) -> dict:
        return {
            "matmul_flops": self.matmul_flops,
            "collectives": {k: dict(v) for k, v in sorted(self.collectives.items())},
            "collective_bytes": self.collective_bytes,
            "unknown_trip_counts": self.unknown_trip_counts,
        }


def _matmul_flops(op: str, out_text: str, ins, attrs: str) -> float:
    out = _shapes(out_text)
    if not out:
        return 0.0
    out_elems = math.prod(out[0][1])
    if op == "dot":
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attrs)
        if not ins or m is None:
            return 0.0
        lhs = ins[0][1]
        return 2.0 * out_elems * math.prod(lhs[int(d)] for d in m.group(1).split(",") if d)
    if op == "convolution":
        # A dot lowered as a convolution: out x input features x window taps that land on real input. TPU
        # lowers batched matmuls to convolutions whose window slides over a padded, dilated batch dim, where
        # most taps hit holes: count the real ones exactly, dimension by dimension.
        labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
        if len(ins) < 2 or labels is None:
            return 0.0
        lhs_labels, kernel_labels, out_labels = labels.groups()
        lhs, kernel, out_shape = ins[0][1], ins[1][1], out[0][1]
        window = re.search(r"window=\{([^}]*)\}", attrs)
        # The window lists its fields by spatial dimension number (0, 1, ...), whatever order the labels use.
        spatial = sorted((c for c in kernel_labels if c.isdigit()), key=int)
        field = {}
        if window:
            for key, value in re.findall(r"(\w+)=([0-9x_\-]+)", window.group(1)):
                field[key] = value.split("x")
        taps_total = 1
        for j, c in enumerate(spatial):
            get = lambda key, default, j=j: int(field[key][j]) if key in field else default
            size, stride = get("size", kernel[kernel_labels.index(c)]), get("stride", 1)
            lhs_d, rhs_d = get("lhs_dilate", 1), get("rhs_dilate", 1)
            pad_lo = int(field["pad"][j].split("_")[0]) if "pad" in field else 0
            length = (lhs[lhs_labels.index(c)] - 1) * lhs_d + 1
            taps = 0
            for o in range(out_shape[out_labels.index(c)]):
                for t in range(size):
                    p = o * stride - pad_lo + t * rhs_d
                    taps += 0 <= p < length and p % lhs_d == 0
            taps_total *= taps
        out_spatial = math.prod(out_shape[out_labels.index(c)] for c in spatial)
        return 2.0 * out_elems / max(out_spatial, 1) * kernel[kernel_labels.index("i")] * taps_total
    if op == "ragged-dot":
        # XLA's own ragged dot (GPU keeps it where a grouped-GEMM kernel handles it; otherwise it is expanded to
        # a dense dot over all groups before this point): every lhs row meets one group's weights.
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attrs)
        if not ins or m is None:
            return 0.0
        return 2.0 * out_elems * math.prod(ins[0][1][int(d)] for d in m.group(1).split(",") if d)
    if op == "custom-call" and 'custom_call_target="mosaic_gpu_v2"' in attrs:
        return _mosaic_gpu_flops(out[0][1], ins)
    if op == "custom-call" and "splash_mha_" in attrs and '"cost_estimate"' not in attrs:
        return _splash_flops(attrs, ins)
    if op == "custom-call" and '"cost_estimate"' in attrs:
        # Pallas / Mosaic kernels (splash attention, megablox grouped matmuls) state their own flops.
        m = re.search(r'"cost_estimate":\{[^}]*"flops":"?(\d+)', attrs)
        return float(m.group(1)) if m else 0.0
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', attrs)
        target = target.group(1) if target else ""
        # cuBLAS / cuBLASLt: "__cublas$gemm", "__cublas$lt$matmul", "__cublas$lt$matmul$f8"; the output is a
        # (result, workspace) tuple, the first shape the result, and the contraction in the backend config's
        # dot_dimension_numbers.
        if ("gemm" in target or target.startswith("__cublas$lt$matmul")) and "backend_config" in attrs and ins:
            m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', attrs)
            dims = [int(d.strip('" ')) for d in m.group(1).split(",") if d.strip('" ')] if m else []
            return 2.0 * out_elems * math.prod(ins[0][1][d] for d in dims)
        if "ragged-dot" in attrs or "ragged_dot" in attrs:
            # The TPU kernel's operands end with x [m, k] and the grouped weights; every row is computed.
            x = [s for s in ins if len(s[1]) == 2 and s[1][0] == out[0][1][0]]
            return 2.0 * out_elems * x[-1][1][1] if x else 0.0
    return 0.0


def _mosaic_gpu_flops(out, ins) -> float:
    """The Mosaic-GPU grouped GEMMs (``dsjax.ops.gpu_gmm``: JAX's bf16 kernels; ``dsjax.ops.fp8_gpu``: the FP8
    ones), which state no cost: every row meets one group's weights. ``ins``: ``(dtype, shape)`` of each operand.

    * FP8 (told apart by their E4M3 operands, the scales being fp32 and never counted): ``grouped_matmul_sum``
      (group_sizes, then per term a [m, c], its scales, b [g, n, c], its scales) -> [m, n]: 2 m n c over the
      terms; ``grouped_weight_grad`` (tile offsets, x^T [k, L], scales, g^T [n, L], scales) -> [g, k, n], the
      ``L`` tokens of the experts' padded tiles: 2 k n L;
    * ``ragged_dot`` (group_sizes, lhs [m, k], rhs [g, k, n] or [g, n, k]) -> [m, n]: 2 m n k;
    * ``transposed_ragged_dot`` (group metadata, lhs [m, k], rhs [m, n]) -> [g, k, n]: 2 m k n."""
    fp8 = [shape for dtype, shape in ins if dtype.startswith("f8") and len(shape) == 2]
    if fp8 and len(out) == 2:
        return sum(2.0 * out[0] * out[1] * c for rows, c in fp8 if rows == out[0])
    if fp8 and len(out) == 3 and len(fp8) == 2:
        return 2.0 * out[1] * out[2] * fp8[0][1]
    mats = [shape for _, shape in ins if len(shape) == 2]
    if len(out) == 2 and mats and mats[0][0] == out[0]:
        return 2.0 * out[0] * out[1] * mats[0][1]
    if len(out) == 3 and len(mats) >= 2 and mats[-2][0] == mats[-1][0]:
        return 2.0 * mats[-2][0] * out[1] * out[2]
    return 0.0


def _splash_flops(attrs: str, ins) -> float:
    """JAX's splash attention kernels state no cost: count their matmuls from the q / k / v operands
    (``[b, h, t, d]``, or ``[h, t, d]`` for one row per device), assuming the causal masks dsjax gives them
    (``t (t + 1) / 2`` query-key pairs). The forward kernel forms scores and the weighted values; the dq kernel
    recomputes the scores and forms dP and dQ; the dkv kernel recomputes the scores and forms dP, dV and dK."""
    # q, k, v: the first three float operands, [b, h, t, d], or [h, t, d] where the batch per device is 1 (the
    # kernel is then called without its batch dimension); the block masks and segment ids are integers.
    qkv = [shape if len(shape) == 4 else (1, *shape) for dt, shape in ins if dt in _FLOATS and len(shape) in (3, 4)]
    if len(qkv) < 3:
        return 0.0
    (b, h, t, d_qk), v = qkv[0], qkv[2]
    pairs = b * h * t * (t + 1) / 2
    d_v = v[-1]
    if "splash_mha_fwd" in attrs:
        return 2.0 * pairs * (d_qk + d_v)
    if "splash_mha_dq" in attrs:
        return 2.0 * pairs * (2 * d_qk + d_v)
    if "splash_mha_dkv" in attrs:
        return 2.0 * pairs * (2 * d_qk + 2 * d_v)
    return 0.0


def analyse_hlo(text: str) -> HloCounts:
    """Loop-weighted matmul flops and collectives (count, operand bytes) of an optimised HLO module's text."""
    computations: dict[str, list[str]] = {}
    shape_of: dict[str, str] = {}  # value name -> its shape text (optimised HLO names operands without shapes)
    line_of: dict[str, str] = {}  # value name -> its instruction
    entry = None
    current = None
    for line in _logical_lines(text):
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            computations[current] = []
            params = line[line.index("(") + 1 : line.rindex("->")]
            shape_of.update(_PARAM.findall(params))
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is not None and line.strip() == "}":
            current = None
            continue
        if current is not None:
            computations[current].append(line)
            instr = _INSTR.match(line)
            if instr is not None:
                shape_of[instr.group(1)] = instr.group(2)
                line_of[instr.group(1)] = line
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    # Bottom-up cost of each computation: its own instructions, plus each callee's cost times how often it runs
    # per execution (a while body / condition: the trip count). A conditional runs one of its branches: it costs
    # its most expensive one (flops; per collective kind, the largest count and bytes), an upper bound that stays
    # one step's worth for a `lax.switch` over many branches (the pipeline executor's op kinds).
    counts = HloCounts()
    memo: dict[str, tuple[float, dict]] = {}

    def add(into: dict, coll: dict, factor: float) -> None:
        for kind, v in coll.items():
            e = into.setdefault(kind, {"count": 0.0, "bytes": 0.0})
            e["count"] += factor * v["count"]
            e["bytes"] += factor * v["bytes"]

    def cost(name: str) -> tuple[float, dict]:
        if name in memo:
            return memo[name]
        memo[name] = (0.0, {})  # HLO call graphs are acyclic; this only guards against malformed text
        flops, coll = 0.0, {}
        for line in computations[name]:
            instr = _INSTR.match(line)
            if instr is None:
                continue
            name_, out_text, op, rest = instr.groups()
            operands = _operands(rest)
            attrs = name_ + " " + rest[len(operands) :]  # kernels are known by their instruction's name
            ins = [s for ref in re.findall(r"%([\w.\-]+)", operands) for s in _shapes(shape_of.get(ref, ""))]
            ins = ins or _shapes(operands)  # unoptimised HLO prints operand shapes inline
            flops += _matmul_flops(op, out_text, ins, attrs)
            kind = op.removesuffix("-start")
            if kind in COLLECTIVES and not op.endswith("-done"):
                # ragged-all-to-all's operands are (input, output buffer, offsets, sizes): count what is sent.
                sent = ins[:1] if kind == "ragged-all-to-all" else ins
                add(coll, {kind: {"count": 1, "bytes": _nbytes(sent)}}, 1)
            trip = 1
            if op == "while":
                trip = _trip_count(line, computations, line_of)
                if trip is None:
                    counts.unknown_trip_counts += 1
                    trip = 1
            branches = []
            for kind_, callee in _CALLEE.findall(line):
                for c in re.findall(r"%?([\w.\-]+)", callee.strip("{}")):
                    if c not in computations:
                        continue
                    if kind_ == "branch_computations":
                        branches.append(cost(c))
                        continue
                    f, cc = cost(c)
                    factor = trip if kind_ in ("body", "condition") else 1
                    flops += factor * f
                    add(coll, cc, factor)
            if branches:
                flops += max(f for f, _ in branches)
                kinds = {k for _, cc in branches for k in cc}
                worst = {k: {x: max(cc.get(k, {}).get(x, 0) for _, cc in branches) for x in ("count", "bytes")}
                         for k in kinds}  # fmt: skip
                add(coll, worst, 1)
        memo[name] = (flops, coll)
        return memo[name]

    flops, coll = cost(entry)  # recursion depth = call nesting depth (tens), not the number of computations
    counts.matmul_flops = flops
    for kind, v in coll.items():
        counts.collectives[kind] = {"count": int(v["count"]), "bytes": int(v["bytes"])}
    return counts


def _logical_lines(text: str) -> list[str]:
    """The HLO text's lines with each instruction on one line. Newer XLA:TPU versions print string attributes
    verbatim, so a kernel's metadata holding a newline continues its instruction on lines that start in column
    0; everything else that starts there (module, computation headers, closing braces) begins a line."""
    lines: list[str] = []
    for line in text.splitlines():
        continues = lines and line and not line[0].isspace() and line.strip() != "}"
        if continues and not line.startswith(("HloModule", "ENTRY", "%")) and not _HEADER.match(line):
            lines[-1] += line
        else:
            lines.append(line)
    return lines


def _trip_count(while_line: str, computations: dict[str, list[str]], line_of: dict[str, str]) -> int | None:
    """Iterations of a ``while``: XLA's ``known_trip_count``, else ``bound - start`` for a condition
    ``counter < bound`` with a constant bound, the counter being tuple element 0 as in ``lax.scan`` loops, and
    ``start`` its constant initial value (0 when it is not a constant). XLA peels iterations off a loop (one
    copy of the body before it, the loop then starting its counter at 1), so the start matters."""
    m = _TRIP.search(while_line)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", while_line)
    lines = computations.get(cond.group(1), []) if cond else []
    constants = {}
    for line in lines:
        c = _CONSTANT.match(line)
        if c:
            constants[c.group(1)] = int(c.group(2))
    for line in lines:
        if "ROOT" in line and "compare(" in line and "direction=LT" in line:
            refs = re.findall(r"%([\w.\-]+)", line[line.index("compare(") :])
            bounds = [constants[r] for r in refs if r in constants]
            if len(bounds) == 1:
                return bounds[0] - _initial_counter(while_line, line_of)
    return None


_CONSTANT = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*s(?:32|64)\[\]\S*\s+constant\((-?\d+)\)")


def _initial_counter(while_line: str, line_of: dict[str, str]) -> int:
    """The constant the loop's counter (element 0 of its initial tuple) starts from; 0 if not a constant."""
    init = re.search(r"\bwhile\(%?([\w.\-]+)\)", while_line)
    tuple_line = line_of.get(init.group(1), "") if init else ""
    first = re.search(r"\btuple\(%?([\w.\-]+)", tuple_line)
    line = line_of.get(first.group(1), "") if first else ""
    for _ in range(4):  # through the copies XLA puts between a constant and the loop's tuple
        copied = re.search(r"\s(?:copy|bitcast)\(%?([\w.\-]+)\)", line)
        if copied is None:
            break
        line = line_of.get(copied.group(1), "")
    start = _CONSTANT.match(line)
    return int(start.group(2)) if start else 0


def largest_buffers(message: str, limit: int = 8) -> list[str]:
    """The largest allocations an out-of-memory compile error lists (XLA prints them after the summary)."""
    lines = [ln.strip() for ln in message.splitlines()]
    picked = [ln for ln in lines if re.search(r"(Size|size):\s*[\d.]+[KMGT]?", ln) or "Shape:" in ln]
    return picked[:limit] if picked else lines[1 : 1 + limit]


def json_safe(obj):
    """Round-trip through JSON types (defaultdicts and numpy scalars become plain values)."""
    return json.loads(json.dumps(obj, default=float))
