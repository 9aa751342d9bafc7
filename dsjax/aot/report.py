"""Compile a program for a target and report what the target's compiler says about it.

Memory is XLA's own per-chip figure (``memory_analysis``); flops and collectives come from the optimised HLO
with loop trip counts (:mod:`dsjax.aot.hlo`; XLA's ``cost_analysis`` counts a scanned layer stack's body once);
the step-time and MFU estimate is a roofline from the chip's published peak and bandwidths, an upper bound
that assumes compute, HBM traffic and collectives overlap perfectly.
"""

from __future__ import annotations

import json
import os
import re
import time

import jax

from dsjax.aot.hlo import analyse_hlo, largest_buffers
from dsjax.aot.steps import Program
from dsjax.aot.targets import GIB, Target
from dsjax.sharding import use_mesh


def compile_report(
    program: Program, target: Target, mesh: jax.sharding.Mesh, *, name: str = "", hlo_path: str | None = None
) -> dict:
    """Lower and compile ``program`` on ``mesh`` (built from ``target.devices``) and report per-chip figures.

    Keys: ``fits``, ``hbm_per_chip_gib`` (arguments + outputs - aliased + temporaries), ``chip_hbm_gib``,
    ``memory`` (the parts, GiB, with XLA's ``live_peak``; ``memory_bytes`` in bytes), ``flops_per_chip``
    (compiled matmul flops, loop-weighted), ``model_flops_per_chip``, ``flops_ratio`` (compiled / model),
    ``xla_cost_flops`` (XLA's cost analysis as reported, loop bodies once; None on GPU), ``bytes_accessed``,
    ``collectives`` (kind -> count, bytes), ``est_step_s``, ``est_mfu``, ``est_tokens_per_s_per_chip``,
    ``compile_s``. A program that does not fit
    (or fails to compile) gives ``fits: False`` with the compiler's message and the largest buffers it lists.
    ``hlo_path``: also write the optimised HLO text there (and report the path as ``hlo_path``).
    """
    mesh_sizes = {k: int(v) for k, v in mesh.shape.items()}
    report = _header(name, target, mesh.size, mesh_sizes, model_flops=program.model_flops, tokens=program.tokens)
    start = time.perf_counter()
    try:
        with use_mesh(mesh, program.rules):
            lowered = program.fn.lower(*program.args)
            compiled = lowered.compile()
    except Exception as e:  # the compiler's verdict is the result: report it instead of a traceback
        message = str(e)
        report.update(
            fits=False,
            compile_s=round(time.perf_counter() - start, 1),
            error=message.splitlines()[0][:2000] if message else type(e).__name__,
            out_of_memory="RESOURCE_EXHAUSTED" in message or "exceeds available" in message,
            largest_buffers=largest_buffers(message),
            hbm_per_chip_gib=None,
            flops_ratio=None,
            est_mfu=None,
        )
        return report
    report["compile_s"] = round(time.perf_counter() - start, 1)

    mem = compiled.memory_analysis()
    parts = dict(
        arguments=mem.argument_size_in_bytes,
        outputs=mem.output_size_in_bytes,
        aliased=mem.alias_size_in_bytes,
        temporaries=mem.temp_size_in_bytes,
        code=mem.generated_code_size_in_bytes,
        # What remat offload keeps in the host's memory (per chip; not part of HBM).
        host_temporaries=getattr(mem, "host_temp_size_in_bytes", 0),
        # XLA's peak of live buffers, arguments included: what the allocation would be without the gaps its
        # packing of the temporaries leaves (on v5p the two differed by up to 4 GiB; only the allocation must fit).
        live_peak=getattr(mem, "peak_memory_in_bytes", 0),
    )
    text = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(text)
        report["hlo_path"] = hlo_path
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    report["xla_cost_flops"] = float(cost["flops"]) if cost and "flops" in cost else None
    report["bytes_accessed"] = float(cost["bytes accessed"]) if cost and "bytes accessed" in cost else None
    _add_figures(report, parts, text, target.chip, tokens=program.tokens)
    return report


def _header(name: str, target: Target, chips: int, mesh_sizes: dict, *, model_flops: float, tokens: int) -> dict:
    return dict(
        name=name,
        target=target.name,
        chip=target.chip.name,
        chips=chips,
        mesh=mesh_sizes,
        chip_hbm_gib=round(target.chip.hbm_bytes / GIB, 2),
        model_flops_per_chip=model_flops / chips,
        tokens_per_step=tokens,
    )


def _add_figures(report: dict, parts: dict[str, int], hlo_text: str, chip, *, tokens: int) -> None:
    """Memory, flops, collectives and the roofline from a compiled program's memory parts (bytes) and HLO."""
    total = parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"]
    report["memory"] = {k: round(v / GIB, 3) for k, v in parts.items()}
    report["memory_bytes"] = dict(parts)
    report["hbm_per_chip_gib"] = round(total / GIB, 2)
    report["fits"] = bool(total <= chip.hbm_bytes)
    hlo = analyse_hlo(hlo_text)
    report["flops_per_chip"] = hlo.matmul_flops
    report["flops_ratio"] = round(hlo.matmul_flops / report["model_flops_per_chip"], 3)
    report["collectives"] = hlo.as_dict()["collectives"]
    report["collective_bytes"] = hlo.collective_bytes
    report["unknown_loop_trip_counts"] = hlo.unknown_trip_counts

    # Roofline: matmuls at the bf16 peak; HBM traffic at least the state read and written plus temporaries
    # once; collectives over the chip's interconnect. Perfect overlap -> max of the three.
    chips = report["chips"]
    t_compute = hlo.matmul_flops / chip.bf16_flops
    t_memory = (2 * (parts["arguments"] + parts["outputs"]) + parts["temporaries"]) / chip.hbm_bandwidth
    t_comm = hlo.collective_bytes / chip.interconnect_bandwidth
    step = max(t_compute, t_memory, t_comm)
    report["est_times_s"] = dict(compute=t_compute, memory=t_memory, collectives=t_comm)
    report["est_step_s"] = step
    report["est_mfu"] = round(report["model_flops_per_chip"] / (step * chip.bf16_flops), 4) if step else None
    report["est_tokens_per_s_per_chip"] = tokens / chips / step if step else None


def saved_compile_report(directory: str, target: Target, *, model_flops: float, tokens: int, name: str = "") -> dict:
    """The same report for a program another project compiled and saved: ``directory`` holds ``memory.json``
    (``memory_bytes``: arguments, outputs, aliased, temporaries, code, optionally host_temporaries; ``compile_s``;
    the rest is kept as ``peer``) and ``hlo.txt`` (the optimised HLO), as ``scripts/maxtext_compile.py`` writes them.
    ``model_flops`` / ``tokens``: of the whole step (all chips), for the model that program trains."""
    with open(os.path.join(directory, "memory.json")) as f:
        record = json.load(f)
    with open(os.path.join(directory, "hlo.txt")) as f:
        text = f.read()
    chips = target.num_chips
    report = _header(name, target, chips, {}, model_flops=model_flops, tokens=tokens)
    report.update(
        compile_s=record.get("compile_s"),
        peer={k: v for k, v in record.items() if k not in ("memory_bytes", "compile_s")},
        xla_cost_flops=None,
        bytes_accessed=None,
    )
    devices = _device_count(text)
    if devices is not None and devices != chips:
        raise ValueError(f"{directory}: the saved program runs on {devices} devices, {target.name} has {chips}")
    _add_figures(report, record["memory_bytes"], text, target.chip, tokens=tokens)
    return report


def _device_count(hlo_text: str) -> int | None:
    """``num_partitions`` from the HLO module header (None if absent)."""
    head = hlo_text[: hlo_text.find("\n")]
    match = re.search(r"num_partitions=(\d+)", head)
    return int(match.group(1)) if match else None


def format_report(r: dict) -> str:
    """A few human-readable lines."""
    head = f"{r['name']} on {r['target']} ({r['chips']} x {r['chip']}, mesh {r['mesh']}): compile {r['compile_s']} s"
    if r.get("error"):
        lines = [head, f"  DOES NOT COMPILE/FIT: {r['error']}"]
        lines += [f"    {b}" for b in r.get("largest_buffers", [])]
        return "\n".join(lines)
    m = r["memory"]
    lines = [
        head,
        f"  HBM per chip {r['hbm_per_chip_gib']} GiB of {r['chip_hbm_gib']}"
        f" ({'fits' if r['fits'] else 'DOES NOT FIT'}):"
        f" arguments {m['arguments']}, outputs {m['outputs']}, aliased {m['aliased']}, temporaries {m['temporaries']}"
        + (f"; host memory {m['host_temporaries']} GiB" if m.get("host_temporaries") else "")
        + (f"; XLA's live peak {m['live_peak']} GiB" if m.get("live_peak") else ""),
        f"  flops per chip {r['flops_per_chip']:.4g} compiled vs {r['model_flops_per_chip']:.4g} model"
        f" (ratio {r['flops_ratio']})",
        "  collectives: "
        + (", ".join(f"{k} x{v['count']} {v['bytes'] / GIB:.3g} GiB" for k, v in r["collectives"].items()) or "none"),
        f"  roofline (upper bound): step {r['est_step_s']:.4g} s, MFU {r['est_mfu']:.1%},"
        f" {r['est_tokens_per_s_per_chip']:.4g} tokens/s/chip",
    ]
    return "\n".join(lines)
