"""A tour of dsjax on a tiny random DeepSeek-V3-architecture model (no download, about a minute on CPU).

Creates the model, writes it as a Hugging Face checkpoint, streams it back onto a simulated 8-device
data x expert mesh, and checks that naive / absorbed attention, ragged / dense expert dispatch, MTP logits and
the sharded run all agree. Usage: python scripts/demo.py [--out runs/demo]
"""

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

import dsjax
from dsjax.runtime import preload_allocator
from dsjax.sharding import make_mesh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="where the HF checkpoint is written")
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    start = time.perf_counter()

    cfg = dsjax.ModelConfig.tiny(initializer_range=0.1)
    model = dsjax.create_model(cfg, seed=0)
    main_params = dsjax.count_params(model)
    mtp_params = dsjax.count_params(model, include_mtp=True) - main_params
    print(f"model: {main_params:,} parameters + {mtp_params:,} in MTP")
    files = dsjax.save_pretrained(model, args.out, max_shard_bytes=256 * 1024)
    print(f"saved {len(files)} safetensors shards + index + config.json to {args.out}")

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(8, 32))
    logits, mtp_logits = model(tokens, return_mtp=True)
    rows = [("logits", logits.shape, 0.0), ("MTP logits", mtp_logits.shape, 0.0)]
    for name, kwargs in (
        ("absorbed attention", dict(attention="absorbed")),
        ("dense dispatch", dict(dispatch="dense")),
    ):
        rows.append((name, logits.shape, float(jnp.abs(model(tokens, **kwargs) - logits).max())))

    mesh = make_mesh(data=2, expert=4)
    loaded = dsjax.from_pretrained(args.out, dtype=jnp.float32, mesh=mesh)
    with jax.set_mesh(mesh):
        sharded_logits = loaded(tokens)
    rows.append(("reloaded on 2x4 mesh", sharded_logits.shape, float(jnp.abs(sharded_logits - logits).max())))
    spec = loaded.moe_layers.ffn.w_gate.get_value().sharding.spec

    print(f"\n{'check':<24}{'shape':<18}max |diff| vs reference")
    for name, shape, diff in rows:
        print(f"{name:<24}{tuple(shape)!s:<18}{diff:.2e}")
    print(f"\nexpert weights sharded as {spec}; done in {time.perf_counter() - start:.1f} s")
    worst = max(diff for _, _, diff in rows)
    if worst > 1e-4:
        raise SystemExit(f"disagreement of {worst:.2e} between paths that should agree")


if __name__ == "__main__":
    preload_allocator()  # re-executes once with mimalloc (see dsjax/runtime.py)
    main()
