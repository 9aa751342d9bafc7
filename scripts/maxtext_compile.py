"""Compile MaxText's own train step for a TPU slice and save what dsjax's compile harness reads from it.

The peer side of README's pod-scale comparison. Run it with the Python of a virtualenv that has MaxText
(``maxtext[tpu]`` needs Python >= 3.12; dsjax itself is not imported here)::

    python scripts/maxtext_compile.py OUT_DIR [--recipe NAME] [key=value ...]

``--recipe`` starts from one of MaxText's published configurations (``RECIPES``: its overrides and, for V3, the
XLA flags its recipe sets in ``LIBTPU_INIT_ARGS``); ``key=value`` are MaxText overrides on top (e.g.
``per_device_batch_size=4``). It runs MaxText's ``train_compile`` (its ahead-of-time compile of
``train.train_step`` from abstract state) and writes ``memory.json`` (XLA's per-chip memory parts, compile
seconds, the overrides and versions) and ``hlo.txt`` (the optimised HLO) to ``OUT_DIR``;
``scripts/aot.py --analyse OUT_DIR`` then reports them with the same flop count, collectives and roofline as
dsjax's own steps.
"""

from __future__ import annotations

import json
import os
import sys
import time

RECIPES = {
    # tpu-recipes training/v5p/DeepSeek3-671B-MaxText (MaxText's `deepseek3_671b_v5p_1024` benchmark
    # configuration: 542 tokens/s/chip measured on v5p-1024 at 6 x 8192 per chip).
    "deepseek3-671b-v5p-1024": dict(
        overrides=dict(
            model_name="deepseek3-671b", compile_topology="v5p-1024", ici_fsdp_parallelism="-1",
            ici_tensor_parallelism="1", per_device_batch_size="6", max_target_length="8192", dtype="bfloat16",
            weight_dtype="float32", megablox="true", sparse_matmul="true", scan_layers="true",
            use_custom_sort_vjp="true", sa_block_q="2048", sa_block_kv="2048", sa_block_kv_compute="2048",
            sa_block_q_dkv="2048", sa_block_kv_dkv="2048", sa_block_kv_dkv_compute="2048", sa_block_q_dq="2048",
            sa_block_kv_dq="2048", remat_policy="custom", decoder_layer_input="offload", out_proj="offload",
            sa_use_fused_bwd_kernel="false",
        ),
        # The recipe's flags, less one internal flag (chip_config_name) that the public libtpu rejects.
        libtpu_flags=(
            "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=false "
            "--xla_tpu_enable_async_collective_fusion_fuse_all_reduce=false "
            "--xla_tpu_enable_async_collective_fusion_fuse_reduce_scatter=false "
            "--xla_tpu_enable_sparse_core_collective_offload_all_gather=true "
            "--xla_tpu_enable_sparse_core_collective_offload_reduce_scatter=true "
            "--xla_tpu_enable_sparse_core_collective_offload_all_reduce=true "
            "--xla_tpu_enable_all_gather_offload_tracing=true --xla_tpu_enable_reduce_scatter_offload_tracing=true "
            "--xla_tpu_enable_all_reduce_offload_tracing=true --xla_tpu_use_tc_device_shape_on_sc=true "
            "--xla_sc_enable_instruction_fusion=false --xla_sc_disjoint_spmem=false "
            "--xla_sc_disable_megacore_partitioning=true --xla_tpu_enable_all_experimental_scheduler_features=true "
            "--xla_tpu_enable_scheduler_memory_pressure_tracking=true --xla_tpu_host_transfer_overlap_limit=24 "
            "--xla_tpu_aggressive_opt_barrier_removal=ENABLED --xla_lhs_prioritize_async_depth_over_stall=ENABLED "
            "--xla_tpu_enable_ag_backward_pipelining=true --xla_should_allow_loop_variant_parameter_in_chain=ENABLED "
            "--xla_should_add_loop_invariant_op_in_chain=ENABLED --xla_max_concurrent_host_send_recv=100 "
            "--xla_tpu_scheduler_percent_shared_memory_limit=100 --xla_latency_hiding_scheduler_rerun=2 "
            "--xla_tpu_use_minor_sharding_for_major_trivial_input=true "
            "--xla_tpu_relayout_group_size_threshold_for_reduce_scatter=1 "
            "--xla_tpu_assign_all_reduce_scatter_layout=true --xla_tpu_enable_data_parallel_all_reduce_opt=true "
            "--xla_tpu_data_parallel_opt_different_sized_ops=true --xla_tpu_scoped_vmem_limit_kib=81920 "
            "--xla_tpu_megacore_fusion_allow_ags=false --xla_enable_async_collective_permute=true"
        ),
    ),
    # MaxText's guide to its logs ("Understand logs and metrics"): V2-Lite on v5p-8, its defaults otherwise
    # (29.4% MFU measured).
    "deepseek2-16b-v5p-8": dict(
        overrides=dict(
            model_name="deepseek2-16b", compile_topology="v5p-8", per_device_batch_size="24",
            max_target_length="2048",
        ),
        libtpu_flags="",
    ),
}  # fmt: skip


def main(argv: list[str]) -> int:
    args = argv[1:]
    recipe = None
    if "--recipe" in args:
        i = args.index("--recipe")
        recipe = args[i + 1] if i + 1 < len(args) else ""
        del args[i : i + 2]
        if recipe not in RECIPES:
            print(f"--recipe {recipe!r}: one of {sorted(RECIPES)}", file=sys.stderr)
            return 2
    if not args or "=" in args[0] or any("=" not in a for a in args[1:]):
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = args[0]
    overrides = dict(RECIPES[recipe]["overrides"]) if recipe else {}
    overrides.update(a.split("=", 1) for a in args[1:])
    fixed = dict(compile_topology_num_slices="1", dataset_type="synthetic", enable_checkpointing="false",
                 skip_jax_distributed_system="true", run_name="compile", base_output_directory=out_dir)  # fmt: skip
    overrides = {**fixed, **overrides}
    # The compile targets TPU devices from the topology; JAX itself stays on the CPU. libtpu reads its flags
    # when it is loaded, so they are set before MaxText imports jax.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if recipe and RECIPES[recipe]["libtpu_flags"]:
        os.environ["LIBTPU_INIT_ARGS"] = (
            os.environ.get("LIBTPU_INIT_ARGS", "") + " " + RECIPES[recipe]["libtpu_flags"]
        ).strip()
    from importlib import resources

    from maxtext.trainers.pre_train import train_compile

    captured = {}
    jit_and_compile = train_compile.jit_and_compile

    def capture(*a, **kw):
        start = time.perf_counter()
        captured["compiled"] = jit_and_compile(*a, **kw)
        captured["compile_s"] = time.perf_counter() - start
        return captured["compiled"]

    train_compile.jit_and_compile = capture
    base_yml = str(resources.files("maxtext") / "configs" / "base.yml")
    train_compile.main([argv[0], base_yml, *(f"{k}={v}" for k, v in overrides.items())])
    compiled = captured["compiled"]
    mem = compiled.memory_analysis()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "hlo.txt"), "w") as f:
        f.write(compiled.as_text())
    import importlib.metadata as md

    import jax

    record = dict(
        peer="maxtext",
        recipe=recipe,
        overrides=overrides,
        libtpu_flags=os.environ.get("LIBTPU_INIT_ARGS", ""),
        compile_s=round(captured["compile_s"], 1),
        versions={"maxtext": md.version("maxtext"), "jax": jax.__version__, "libtpu": md.version("libtpu")},
        memory_bytes=dict(
            arguments=mem.argument_size_in_bytes,
            outputs=mem.output_size_in_bytes,
            aliased=mem.alias_size_in_bytes,
            temporaries=mem.temp_size_in_bytes,
            code=mem.generated_code_size_in_bytes,
            host_temporaries=getattr(mem, "host_temp_size_in_bytes", 0),
        ),
    )
    with open(os.path.join(out_dir, "memory.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
