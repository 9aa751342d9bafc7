"""GRPO on a Hugging Face checkpoint with a JSONL dataset (the same trainer as scripts/r1_zero.py).

  python scripts/grpo.py --config configs/grpo_hf.yaml [--set section.field=value ...]

Loads the checkpoint (sharded over ``model.mesh_data`` x ``model.mesh_expert`` devices), its ``tokenizer.json``
and the dataset, evaluates held-out pass@1, runs GRPO with the rule rewards (accuracy via math-verify, format,
tags), evaluates again, and writes metrics, plots, checkpoints, ``results.json`` and the final weights (``hf/``).

Exit codes: 0 done; 1 a checkpoint that cannot be loaded, restored or saved, or an invalid ``config.json``
(message on stderr); 75 (``PREEMPTED_EXIT_CODE``) a preemption notice (SIGTERM), or ``max_runtime_s`` seconds (a
field one may add under ``train:`` in the config), stopped the run after a checkpointed step: the same command
resumes.
"""

import argparse
import json
import os
import sys

import yaml

from dsjax.runtime import preload_allocator


def load_config(path: str, overrides: list[str]) -> dict:
    with open(path) as f:
        cfg = yaml.safe_load(f)
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        if not field or section not in cfg or not isinstance(cfg[section], dict) or field not in cfg[section]:
            raise SystemExit(f"error: --set {item}: no field {key!r} in {path}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        # A string field keeps the raw text (a template like "{question}=" is not YAML).
        cfg[section][field] = value if isinstance(cfg[section][field], str) and not isinstance(parsed, str) else parsed
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/grpo_hf.yaml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--out", help="output directory (default: the config's)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)

    import jax
    import jax.numpy as jnp

    import dsjax
    from dsjax.data.tokenizer import HFTokenizer
    from dsjax.rl.grpo import GRPOConfig
    from dsjax.rl.tasks import JsonlTask
    from dsjax.rl.trainer import RLTrainConfig, evaluate, train_grpo
    from dsjax.sharding import make_mesh
    from dsjax.train.preemption import PREEMPTED_EXIT_CODE, Preempted

    m, d = cfg["model"], cfg["data"]
    mesh = make_mesh(m["mesh_data"], m["mesh_expert"])
    tok_path = m["tokenizer"] or os.path.join(m["path"], "tokenizer.json")
    tokenizer = HFTokenizer.from_file(tok_path)
    task = JsonlTask(d["path"], question_key=d["question_key"], answer_key=d["answer_key"])
    grpo = GRPOConfig(**cfg["grpo"])
    tc = RLTrainConfig(template=d["template"], **cfg["train"])
    out = args.out or cfg["out"]
    with jax.set_mesh(mesh):
        try:
            model = dsjax.from_pretrained(m["path"], dtype=jnp.dtype(m["dtype"]), mesh=mesh)
            before = evaluate(model, tokenizer, task, grpo, d["template"], problems=64, samples=4)
            model = train_grpo(model, tokenizer, task, grpo, tc, out)
        except Preempted as e:
            print(f"preempted: {e}", file=sys.stderr)
            return PREEMPTED_EXIT_CODE
        except (dsjax.CheckpointError, dsjax.ConfigError) as e:  # a bad checkpoint or config.json, a failed save
            print(f"error: {e}", file=sys.stderr)
            return 1
        after = evaluate(model, tokenizer, task, grpo, d["template"], problems=64, samples=4)
    results = dict(base_pass1=before["pass1"], rl_pass1=after["pass1"], base_format=before["format"],
                   rl_format=after["format"])  # fmt: skip
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    preload_allocator()  # re-executes once with mimalloc (see dsjax/runtime.py)
    sys.exit(main())
