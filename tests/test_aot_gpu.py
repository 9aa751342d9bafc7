"""Ahead-of-time compiles for NVIDIA GPUs on this CPU host: the target description, the harness's flop count and
the Mosaic-GPU grouped GEMMs of the expert FFN.

Needs the CUDA plugin (the ``gpu`` extra, ``jax[cuda12]``) but no GPU; skipped where the plugin is missing (CI).
Run with ``JAX_PLATFORMS=cpu`` so JAX does not look for a driver. XLA's GPU client gives no ``cost_analysis``, so
the flop count is checked against the exact count of the program.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

pytest.importorskip("jax_plugins.xla_cuda12", reason="needs the CUDA plugin: pip install -e '.[gpu]'")

from script_runner import run_json_script

from dsjax.aot import analyse_hlo, gpu_target, target, train_program
from dsjax.aot.targets import CHIPS
from dsjax.config import ModelConfig
from dsjax.sharding import FSDP_RULES, make_mesh
from dsjax.train.config import TrainConfig


def _abstract(mesh, shape, spec, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))


@pytest.fixture(scope="module")
def h200():
    try:
        return gpu_target("h200", 8)
    except RuntimeError as e:  # plugin present but unusable here
        pytest.skip(str(e))


def test_gpu_targets_describe_hosts_of_eight(h200):
    assert h200.num_chips == 8 and h200.chip is CHIPS["h200"]
    assert {d.device_kind for d in h200.devices} == {"NVIDIA H200 SXM"}
    h100 = gpu_target("h100", 8)
    assert {d.device_kind for d in h100.devices} == {"NVIDIA H100 SXM"}
    assert gpu_target("h200", 1).num_chips == 1
    # Several hosts: 16 x 8 GPUs, one process per host.
    cluster = target("128xh200")
    assert cluster.num_chips == 128 and cluster.name == "128xh200"
    assert len({d.process_index for d in cluster.devices}) == 16
    with pytest.raises(ValueError):
        gpu_target("h200", 12)  # more than a host and not whole hosts
    with pytest.raises(ValueError):
        gpu_target("a100", 8)


def test_matmul_flops_from_gpu_hlo(h200):
    n = 8192
    one = Mesh(np.array(h200.devices[:1]).reshape(1, 1), ("data", "expert"))
    a = _abstract(one, (n, n), (None, None))
    compiled = jax.jit(lambda a, b: a @ b).lower(a, a).compile()
    assert analyse_hlo(compiled.as_text()).matmul_flops == pytest.approx(2 * n**3, rel=0.05)

    # Sharded over the host's 8 GPUs: per-device shapes, a quarter of the columns and half of the rows each.
    mesh = Mesh(np.array(h200.devices).reshape(2, 4), ("data", "expert"))
    a = _abstract(mesh, (n, n), ("data", None))
    b = _abstract(mesh, (n, n), (None, "expert"))
    compiled = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
    assert analyse_hlo(compiled.as_text()).matmul_flops == pytest.approx(2 * n**3 / 8, rel=0.05)


def test_scanned_matmuls_count_their_trips_on_gpu(h200):
    mesh = Mesh(np.array(h200.devices).reshape(2, 4), ("data", "expert"))

    def stack(w, x):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].astype(jnp.float32).sum()

    w = _abstract(mesh, (6, 512, 512), (None, "data", None))
    x = _abstract(mesh, (256, 512), ("expert", None))
    counts = analyse_hlo(jax.jit(jax.grad(stack)).lower(w, x).compile().as_text())
    assert counts.unknown_trip_counts == 0
    assert counts.matmul_flops == pytest.approx(3 * 2 * 256 * 512 * 512 * 6 / 8, rel=0.05)
    assert counts.collectives


def test_batched_matmul_with_grad_on_gpu(h200):
    mesh = Mesh(np.array(h200.devices).reshape(2, 4), ("data", "expert"))
    n, b, d, f = 8, 1024, 2048, 4096

    def loss(x, w):  # the squared output keeps the forward matmul (a plain sum's gradient would not need it)
        return jnp.square(jnp.einsum("nbd,ndf->nbf", x, w).astype(jnp.float32)).sum()

    x = _abstract(mesh, (n, b, d), (("data", "expert"), None, None))
    w = _abstract(mesh, (n, d, f), (("data", "expert"), None, None))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile()
    assert analyse_hlo(compiled.as_text()).matmul_flops == pytest.approx(3 * 2 * n * b * d * f / 8, rel=0.05)


def _expert_ffn_hlo(h200, data=2, expert=4, dispatch="auto", fp8=None):
    """Optimised HLO of a one-MoE-layer bf16 (or ``fp8`` recipe) train step on ``data x expert`` of the host's
    GPUs (default 2 x 4: 2 local experts of 128 x 128 per GPU)."""
    # Layer 0 dense, layer 1 MoE. Head dims of 32 and LoRA ranks of 64: with tiny's 16 and 32, XLA's GPU
    # compiler finds no tiling for an input-gradient dot of the one-GPU program ("Couldn't find output tile
    # sizes", with or without the grouped GEMMs; V2-Lite's 128 / 512 compile and run on an H200).
    cfg = ModelConfig.tiny(
        hidden_size=128, moe_intermediate_size=128, num_hidden_layers=2, num_nextn_predict_layers=0,
        q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, fp8=fp8,
    )  # fmt: skip
    mesh = make_mesh(data, expert, h200.devices)
    tc = TrainConfig(compute_dtype="bfloat16", dispatch=dispatch)
    program = train_program(cfg, tc, mesh, FSDP_RULES, batch=8, seq=128)
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        return program.fn.lower(*program.args).compile().as_text()


def _ragged_dot_matmuls(text):
    """Matmuls (XLA dots, Triton GEMM fusions, cuBLAS calls) that XLA made of ``ragged_dot``: dense over the local
    expert stack (every row against every expert, masked)."""
    matmul = (" dot(", "gemm_fusion", "__cublas")
    return [
        line.strip()[:160]
        for line in text.splitlines()
        if "ragged_dot" in line and "mosaic_gpu" not in line and any(m in line for m in matmul)
    ]


@pytest.mark.slow
def test_expert_ffn_runs_mosaic_gpu_grouped_gemms(h200, monkeypatch):
    """On a GPU mesh the expert-parallel FFN takes JAX's Mosaic-GPU grouped GEMMs (``dsjax.ops.gpu_gmm``): the
    program compiles without a GPU and holds 3 kernels for the forward and 6 for the backward (input gradients
    with transposed weights, grouped weight gradients), and none of the dense matmuls XLA makes of ``ragged_dot``
    (which the same program has with the kernels switched off)."""
    text = _expert_ffn_hlo(h200)
    assert text.count('custom_call_target="mosaic_gpu_v2"') == 9
    assert _ragged_dot_matmuls(text) == []

    monkeypatch.setattr("dsjax.layers.moe.gpu_gmm_supported", lambda *args: False)
    text = _expert_ffn_hlo(h200)
    assert "mosaic_gpu_v2" not in text and len(_ragged_dot_matmuls(text)) >= 9


@pytest.mark.slow
@pytest.mark.parametrize(("data", "expert", "dispatch"), [(8, 1, "auto"), (1, 1, "auto"), (1, 1, "ragged")])
def test_gpu_meshes_without_an_expert_axis_run_the_grouped_gemms(h200, data, expert, dispatch):
    """Data parallelism alone, or one GPU: ``auto`` still takes ``ep`` on GPU (its ``shard_map`` is where the
    kernels can run; the exchange stays on each GPU), and ``ragged`` on one GPU calls them directly. Before, both
    lowered to XLA's dense matmul over every expert (measured on an H200: 24.7 ms against the kernels' 1.1 ms
    for V2-Lite's 64 experts, ``scripts/gpu_check.py gmm``)."""
    text = _expert_ffn_hlo(h200, data, expert, dispatch)
    assert text.count('custom_call_target="mosaic_gpu_v2"') == 9
    assert _ragged_dot_matmuls(text) == []


@pytest.mark.slow
def test_fp8_expert_ffn_runs_the_fp8_mosaic_gpu_kernels(h200):
    """``fp8.backend: auto`` on a GPU mesh: the routed experts' grouped GEMMs inside expert parallelism are
    ``dsjax.ops.fp8_gpu``'s kernels (3 for the forward, the SwiGLU pair sharing its quantised input; 5 for the
    backward, the pair's input gradient in one accumulator), ptxas builds them for sm_90a, and none of the
    dense matmuls over every local expert that XLA makes of the ``blocked`` backend's ``ragged_dot``s is left."""
    from dsjax.config import Fp8Recipe

    text = _expert_ffn_hlo(h200, fp8=Fp8Recipe(backend="auto"))
    assert text.count('custom_call_target="mosaic_gpu_v2"') >= 8
    assert _ragged_dot_matmuls(text) == []
    text = _expert_ffn_hlo(h200, fp8=Fp8Recipe())
    assert "mosaic_gpu_v2" not in text and _ragged_dot_matmuls(text)


_PTXAS_PROBE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from dsjax.aot import gpu_target
from dsjax.ops import fp8_gpu
one = Mesh(np.array(gpu_target("h200", 1).devices), ("d",))
S = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(one, P()))
e4, f32 = jnp.float8_e4m3fn, jnp.float32
mm = lambda a, sa, b, sb, gs: fp8_gpu.grouped_matmul(a, sa, b, sb, gs, out_dtype=jnp.bfloat16)
mm_args = S((1024, 512), e4), S((1024, 4), f32), S((4, 384, 512), e4), S((4, 4, 3), f32), S((4,), jnp.int32)
wg_args = S((256, 1536), e4), S((12, 256), f32), S((384, 1536), e4), S((12, 384), f32), S((4,), jnp.int32)
with jax.set_mesh(one):
    jax.jit(mm).lower(*mm_args).compile()
    jax.jit(fp8_gpu.grouped_weight_grad).lower(*wg_args).compile()
"""


@pytest.mark.slow
def test_fp8_gpu_kernels_do_not_spill_registers():
    """ptxas' report for the FP8 kernels (``MOSAIC_GPU_DUMP_PTXAS``): no register spills. With 128 x 128 output
    tiles the running accumulator and a slice's product took 255 registers and spilled (80 / 524 bytes)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _PTXAS_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = proc.stdout + proc.stderr
    spills = re.findall(r"(\d+) bytes spill stores", report)
    assert len(spills) >= 2 and set(spills) == {"0"}, report[-2000:]


def test_fp8_gpu_kernels_flops_counted_from_their_operands(h200):
    """The FP8 kernels state no cost: the HLO count takes a GEMM's ``2 m k n`` from the operand shapes, the
    weight gradient's over its padded token tiles (``(m / 128 + E) x 128`` tokens for a grouped one)."""
    from dsjax.config import Fp8Recipe
    from dsjax.ops.fp8 import fp8_matmul
    from dsjax.ops.fp8_grouped import fp8_ragged_dot

    one = Mesh(np.array(h200.devices[:1]).reshape(1, 1), ("data", "expert"))
    m, k, n, e = 1024, 256, 384, 4
    x, g = _abstract(one, (m, k), (None, None)), _abstract(one, (m, n), (None, None))
    sizes = jnp.asarray([300, 0, 500, 100], jnp.int32)
    recipe = Fp8Recipe(backend="auto")
    cases = [
        (lambda x, w: fp8_matmul(x, w, recipe), (k, n), 3 * 2 * m * k * n),
        # the grouped kernels run where the rows are the device's own: inside a shard_map, as expert parallelism
        (
            jax.shard_map(
                lambda x, w: fp8_ragged_dot(x, w, sizes, recipe), mesh=one, in_specs=P(), out_specs=P(), check_vma=False
            ),
            (e, k, n),
            2 * 2 * m * k * n + 2 * k * n * (m + e * 128),
        ),
    ]
    for gemm, w_shape, flops in cases:
        w = _abstract(one, w_shape, (None,) * len(w_shape))

        def step(x, w, g, gemm=gemm):
            y, pullback = jax.vjp(gemm, x, w)
            return y, *pullback(g)

        with jax.set_mesh(one):
            text = jax.jit(step).lower(x, w, g).compile().as_text()
        assert text.count('custom_call_target="mosaic_gpu_v2"') == 3
        counts = analyse_hlo(text)
        assert counts.matmul_flops == pytest.approx(flops, rel=0.01)


_V3_LAYER_STEP = (
    "scripts/aot.py --topology 64xh200 --model deepseek_v3 --step train --mesh data=4,expert=16 --per-chip-batch 1 "
    "--seq 4096 --set model.num_hidden_layers=2 --set train.layers=scan --set model.first_k_dense_replace=0 "
    "--set model.num_nextn_predict_layers=0 --set model.moe_capacity_factor=1.0 --set train.loss_chunk=1024 --json"
)


@pytest.mark.slow
@pytest.mark.parametrize(("fp8", "most_gib"), [(None, 9.5), ("{backend: auto}", 8.5)])
def test_v3_layer_step_on_h200_gathers_weights_not_activations(fp8, most_gib):
    """README's V3 layer step on 64 H200s (two layers scanned, 1 x 4096 tokens per GPU), bf16 and FP8 with the
    Mosaic-GPU kernels: FSDP's weights are gathered for the projections (``dsjax.layers.common.project``; left
    free, XLA:GPU all-gathered a bf16[64, 4096, 128, 192] activation, 12 GiB, and the bf16 step took 15.83 GiB
    of temporaries; FP8's ``blocked`` dense GEMMs materialised an f32[56, 4096, 16384] partial sum, 19.02 GiB),
    and the FP8 step's compiled flops are the bf16 step's (the ``blocked`` grouped GEMMs were 5.77x)."""
    args = _V3_LAYER_STEP.split() + ([] if fp8 is None else ["--set", f"model.fp8={fp8}"])
    report = run_json_script(args, timeout=600)
    assert report["memory"]["temporaries"] < most_gib
    assert report["flops_ratio"] == pytest.approx(1.10, abs=0.02)


@pytest.mark.slow
def test_v3_train_row_on_256_h200_gathers_mla_weights():
    """README's 256 x H200 V3-671B train row, its command as README gives it: 57.34 GiB per GPU. Before MLA's
    ``wkv_b`` was constrained to FSDP's gathered layout on GPU (``dsjax.layers.common.gathered_on_gpu``), XLA:GPU
    all-gathered a bf16[256, 4096, 128, 256] activation (64 GiB) for its gradient instead: 105.66 GiB."""
    command = "scripts/aot.py --topology 256xh200 --model deepseek_v3 --step train --mesh data=4,expert=64"
    options = "--per-chip-batch 1 --seq 4096 --set model.moe_capacity_factor=1.0 --set train.remat=offload_attn"
    report = run_json_script(f"{command} {options} --set train.loss_chunk=1024 --json".split(), timeout=600)
    assert report["fits"] and report["hbm_per_chip_gib"] < 70
    assert report["flops_ratio"] == pytest.approx(1.09, abs=0.02)


def test_v3_decode_on_h200_compiles_to_the_model_flops(h200):
    """README's 8 x H200 V3 decode row, its command as README gives it: compiled matmul flops equal the model's.
    Without the barrier on MLA's summed absorbed scores (`dsjax.ops.attention.mla_absorbed`) XLA:GPU recomputed
    the rope product (q_pe . k_pe) inside each of the softmax's fusions: 1.10x. (A small stand-alone attention
    loop does not show it; the whole decode step compiles here in seconds.)"""
    command = "scripts/aot.py --topology 8xh200 --model deepseek_v3 --step decode --mesh data=1,expert=8"
    options = "--batch 128 --seq 32768 --set model.fp8_weights=true --set model.moe_capacity_factor=1.0 --json"
    args = f"{command} {options}".split()
    report = run_json_script(args, timeout=600)
    assert report["flops_ratio"] == pytest.approx(1.0, abs=0.01)
