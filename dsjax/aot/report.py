"""Compile a program for a target and report what the target's compiler says about it.

Memory is XLA's own per-chip figure (``memory_analysis``); flops and collectives come from the optimised HLO
with loop trip counts (:mod:`dsjax.aot.hlo`; XLA's ``cost_analysis`` counts a scanned layer stack's body once);
the step-time and MFU estimate is a roofline from the chip's published peak and bandwidths, an upper bound
that assumes compute, HBM traffic and collectives overlap perfectly.
"""

from __future__ import annotations

import time

import jax

from dsjax.aot.hlo import analyse_hlo, largest_buffers
from dsjax.aot.steps import Program
from dsjax.aot.targets import GIB, Target


def compile_report(
    program: Program, target: Target, mesh: jax.sharding.Mesh, *, name: str = "", hlo_path: str | None = None
) -> dict:
    """Lower and compile ``program`` on ``mesh`` (built from ``target.devices``) and report per-chip figures.

    Keys: ``fits``, ``hbm_per_chip_gib`` (arguments + outputs - aliased + temporaries), ``chip_hbm_gib``,
    ``memory`` (the parts, GiB), ``flops_per_chip`` (compiled matmul flops, loop-weighted),
    ``model_flops_per_chip``, ``flops_ratio`` (compiled / model), ``xla_cost_flops`` (XLA's cost analysis as
    reported, loop bodies once; None on GPU), ``bytes_accessed``, ``collectives`` (kind -> count, bytes),
    ``est_step_s``, ``est_mfu``, ``est_tokens_per_s_per_chip``, ``compile_s``. A program that does not fit
    (or fails to compile) gives ``fits: False`` with the compiler's message and the largest buffers it lists.
    ``hlo_path``: also write the optimised HLO text there.
    """
    chips = mesh.size
    report = dict(
        name=name,
        target=target.name,
        chip=target.chip.name,
        chips=chips,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        chip_hbm_gib=round(target.chip.hbm_bytes / GIB, 2),
        model_flops_per_chip=program.model_flops / chips,
        tokens_per_step=program.tokens,
    )
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
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
    )
    total = parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"]
    report["memory"] = {k: round(v / GIB, 3) for k, v in parts.items()}
    report["hbm_per_chip_gib"] = round(total / GIB, 2)
    report["fits"] = bool(total <= target.chip.hbm_bytes)

    text = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(text)
    hlo = analyse_hlo(text)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    report["xla_cost_flops"] = float(cost["flops"]) if cost and "flops" in cost else None
    report["bytes_accessed"] = float(cost["bytes accessed"]) if cost and "bytes accessed" in cost else None
    report["flops_per_chip"] = hlo.matmul_flops
    report["flops_ratio"] = round(hlo.matmul_flops / report["model_flops_per_chip"], 3)
    report["collectives"] = hlo.as_dict()["collectives"]
    report["collective_bytes"] = hlo.collective_bytes
    report["unknown_loop_trip_counts"] = hlo.unknown_trip_counts

    # Roofline: matmuls at the bf16 peak; HBM traffic at least the state read and written plus temporaries
    # once; collectives over the chip's interconnect. Perfect overlap -> max of the three.
    chip = target.chip
    t_compute = hlo.matmul_flops / chip.bf16_flops
    t_memory = (2 * (parts["arguments"] + parts["outputs"]) + parts["temporaries"]) / chip.hbm_bandwidth
    t_comm = hlo.collective_bytes / chip.interconnect_bandwidth
    step = max(t_compute, t_memory, t_comm)
    report["est_times_s"] = dict(compute=t_compute, memory=t_memory, collectives=t_comm)
    report["est_step_s"] = step
    report["est_mfu"] = round(report["model_flops_per_chip"] / (step * chip.bf16_flops), 4) if step else None
    report["est_tokens_per_s_per_chip"] = program.tokens / chips / step if step else None
    return report


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
        f" arguments {m['arguments']}, outputs {m['outputs']}, aliased {m['aliased']}, temporaries {m['temporaries']}",
        f"  flops per chip {r['flops_per_chip']:.4g} compiled vs {r['model_flops_per_chip']:.4g} model"
        f" (ratio {r['flops_ratio']})",
        "  collectives: "
        + (", ".join(f"{k} x{v['count']} {v['bytes'] / GIB:.3g} GiB" for k, v in r["collectives"].items()) or "none"),
        f"  roofline (upper bound): step {r['est_step_s']:.4g} s, MFU {r['est_mfu']:.1%},"
        f" {r['est_tokens_per_s_per_chip']:.4g} tokens/s/chip",
    ]
    return "\n".join(lines)
