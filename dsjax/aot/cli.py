"""``scripts/aot.py``: compile one of dsjax's steps for a TPU slice or GPU host and report per-chip figures."""

from __future__ import annotations

import argparse
import json
import sys

from dsjax.config import ConfigError

RULES = ("fsdp", "default", "fsdp+tp")


def _mesh_sizes(text: str) -> dict[str, int]:
    sizes = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or name not in ("data", "expert", "model") or not value.isdigit():
            raise ConfigError(f"--mesh {text!r}: expected e.g. data=8,expert=64[,model=1]")
        sizes[name] = int(value)
    return sizes


def _schedule(text: str):
    """``--pipeline NAME:RANKS:MICROBATCHES`` -> the schedule (validated by its generator)."""
    from dsjax.pipeline import GENERATORS

    name, ranks, microbatches = [*text.split(":"), "", ""][:3]
    if name not in GENERATORS or not ranks.isdigit() or not microbatches.isdigit():
        raise ConfigError(f"--pipeline {text!r}: expected NAME:RANKS:MICROBATCHES, NAME one of {sorted(GENERATORS)}")
    return GENERATORS[name](int(ranks), int(microbatches))


def build(args) -> tuple:
    """``(program, target, mesh)`` from parsed arguments."""
    import jax.numpy as jnp

    from dsjax.aot import steps
    from dsjax.aot.targets import target as make_target
    from dsjax.sharding import DEFAULT_RULES, FSDP_RULES, TP_RULES, combine_rules, make_mesh
    from dsjax.train.config import TrainConfig, _build, apply_overrides
    from dsjax.yaml_config import model_config_from_dict

    d = apply_overrides(
        {"model": {}, "train": {"compute_dtype": "bfloat16", "remat": "full", "moment_dtype": "bfloat16"}}, args.set
    )
    unknown = set(d) - {"model", "train", "grpo"}
    if unknown:
        raise ConfigError(f"--set: unknown sections {sorted(unknown)} (model, train, grpo)")
    cfg = model_config_from_dict({"preset": args.model, "model": d["model"]})
    tc = _build(TrainConfig, "train", d["train"])
    tgt = make_target(args.topology)
    sizes = _mesh_sizes(args.mesh) if args.mesh else {"data": 1, "expert": tgt.num_chips}
    schedule = _schedule(args.pipeline) if args.pipeline else None
    ranks = schedule.ranks if schedule else 1
    if sizes.get("data", 1) * sizes.get("expert", 1) * sizes.get("model", 1) * ranks != tgt.num_chips:
        what = f"--mesh {sizes}" + (f" x {ranks} stage ranks" if schedule else "")
        raise ConfigError(f"{what} does not cover the {tgt.num_chips} chips of {tgt.name}")
    if schedule:
        from dsjax.pipeline.train import make_pipeline_mesh

        if args.step != "train" or sizes.get("model", 1) > 1 or args.rules == "fsdp+tp":
            raise ConfigError("--pipeline: the train step, no model axis (--rules default or fsdp)")
        mesh = make_pipeline_mesh(ranks, sizes.get("data", 1), sizes.get("expert", 1), tgt.devices)
    else:
        mesh = make_mesh(sizes.get("data", 1), sizes.get("expert", 1), tgt.devices, model=sizes.get("model", 1))
    rules = {"fsdp": FSDP_RULES, "default": DEFAULT_RULES, "fsdp+tp": combine_rules(FSDP_RULES, TP_RULES)}[args.rules]
    batch = args.batch if args.per_chip_batch is None else args.per_chip_batch * tgt.num_chips
    if batch is None:
        raise ConfigError("give --batch (global rows) or --per-chip-batch")
    if schedule:
        program = steps.pipelined_train_program(cfg, tc, mesh, rules, schedule, batch=batch, seq=args.seq)
    elif args.step == "train":
        program = steps.train_program(cfg, tc, mesh, rules, batch=batch, seq=args.seq)
    elif args.step == "prefill":
        program = steps.prefill_program(
            cfg, mesh, rules, batch=batch, seq=args.seq, dispatch=tc.dispatch, attention=tc.attention
        )
    elif args.step == "grpo":
        from dsjax.rl.grpo import GRPOConfig

        gc = _build(GRPOConfig, "grpo", d.get("grpo", {}))
        program = steps.grpo_program(cfg, gc, tc, mesh, rules, batch=batch, seq=args.seq)
    else:
        program = steps.decode_program(
            cfg, mesh, rules, batch=batch, context=args.seq, dispatch=tc.dispatch, dtype=jnp.bfloat16
        )
    return program, tgt, mesh


def make_parser() -> argparse.ArgumentParser:
    """The command line of ``scripts/aot.py``."""
    from dsjax.aot.steps import STEPS
    from dsjax.config import PRESETS

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--topology", required=True, help="TPU slice (v5p:8x8x8, v5p-1024) or GPU host (8xh200)")
    parser.add_argument("--model", default="deepseek_v3", choices=sorted(PRESETS), help="model preset")
    parser.add_argument("--step", default="train", choices=STEPS)
    parser.add_argument("--mesh", help="axis sizes, e.g. data=8,expert=64 (default: expert over all chips)")
    parser.add_argument("--rules", default="fsdp", choices=RULES, help="sharding rules table")
    parser.add_argument("--batch", type=int, help="global batch rows")
    parser.add_argument("--per-chip-batch", type=int, help="batch rows per chip (instead of --batch)")
    parser.add_argument("--seq", type=int, default=4096, help="sequence length (decode: cached context)")
    parser.add_argument("--set", action="append", default=[], metavar="model.FIELD=V|train.FIELD=V|grpo.FIELD=V")
    parser.add_argument(
        "--pipeline",
        metavar="NAME:RANKS:MICROBATCHES",
        help="train step pipelined over a `stage` mesh axis of RANKS chips (e.g. dualpipev:4:8)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--dump-hlo", metavar="PATH", help="write the compiled (optimised) HLO text here")
    parser.add_argument(
        "--analyse",
        metavar="DIR",
        help="report a train step another project compiled for --topology (memory.json + hlo.txt, as "
        "scripts/maxtext_compile.py writes them) instead of compiling dsjax's; --model/--set/--seq/--per-chip-batch "
        "describe the model it trains (model flops), e.g. --set model.num_nextn_predict_layers=0 for no MTP",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from dsjax.aot.report import compile_report, format_report

    args = make_parser().parse_args(argv)
    if args.analyse:
        return _analyse(args)
    try:
        program, tgt, mesh = build(args)
    except (ConfigError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    name = f"{args.model} {args.step} batch {program.tokens // (args.seq if args.step != 'decode' else 1)}"
    name += f" x {args.seq}" if args.step != "decode" else f" context {args.seq}"
    report = compile_report(program, tgt, mesh, name=name, hlo_path=args.dump_hlo)
    print(format_report(report), flush=True)
    if args.json:
        print(json.dumps(report, default=float), flush=True)
    return 0 if report.get("fits") else 2


def _analyse(args) -> int:
    """``--analyse DIR``: the report of a saved peer compile, with this model's flops as the reference."""
    from dsjax.aot.flops import train_flops
    from dsjax.aot.report import format_report, saved_compile_report
    from dsjax.aot.targets import target as make_target
    from dsjax.train.config import apply_overrides
    from dsjax.yaml_config import model_config_from_dict

    try:
        if args.step != "train":
            raise ConfigError("--analyse reads a train step (--step train)")
        d = apply_overrides({"model": {}}, args.set)
        cfg = model_config_from_dict({"preset": args.model, "model": d["model"]})
        tgt = make_target(args.topology)
        batch = args.batch if args.per_chip_batch is None else args.per_chip_batch * tgt.num_chips
        if batch is None:
            raise ConfigError("give --batch (global rows) or --per-chip-batch")
        name = f"{args.analyse}: {args.model} train batch {batch} x {args.seq}"
        report = saved_compile_report(
            args.analyse, tgt, model_flops=train_flops(cfg, batch, args.seq), tokens=batch * args.seq, name=name
        )
    except (ConfigError, ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_report(report), flush=True)
    if args.json:
        print(json.dumps(report, default=float), flush=True)
    return 0 if report.get("fits") else 2
