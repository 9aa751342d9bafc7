"""Ahead-of-time compiles for TPU on this CPU host: the harness's counts, the state's shardings, the report.

Needs libtpu (``jax[tpu]``, in the test extra). Compile-only TPU devices come from
``jax.experimental.topologies``; JAX itself keeps running on the CPU.
"""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import dsjax
from dsjax.aot import analyse_hlo, compile_report, decode_program, target, train_program
from dsjax.aot.cli import main as aot_main
from dsjax.aot.cli import make_parser as aot_parser
from dsjax.aot.flops import active_matmul_params, train_flops
from dsjax.aot.targets import GIB
from dsjax.layers.moe import resolve_dispatch
from dsjax.model import abstract_model
from dsjax.sharding import FSDP_RULES, make_mesh, state_shardings
from dsjax.train.config import TrainConfig
from dsjax.train.optim import make_optimizer
from dsjax.train.step import abstract_train_state, init_train_state


@pytest.fixture(scope="module")
def v5p():
    return target("v5p:2x2x1")


def _abstract(mesh, shape, spec, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))


def test_hlo_flops_agree_with_xla_and_count_loop_trips(v5p):
    mesh = Mesh(np.array(v5p.devices).reshape(2, 2), ("data", "expert"))
    a = _abstract(mesh, (1024, 2048), ("data", None))
    b = _abstract(mesh, (2048, 4096), (None, "expert"))
    matmul = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
    xla = matmul.cost_analysis()["flops"]
    ours = analyse_hlo(matmul.as_text()).matmul_flops
    assert xla == pytest.approx(2 * 1024 * 2048 * 4096 / 4)  # per chip
    assert ours == pytest.approx(xla, rel=0.05)

    # A scanned stack of 6 matmuls, forward and backward: XLA's cost analysis counts the loop body once, the
    # harness weights it by the trip count read from the loop condition.
    def stack(w, x):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].astype(jnp.float32).sum()

    w = _abstract(mesh, (6, 512, 512), (None, "data", None))
    x = _abstract(mesh, (256, 512), ("expert", None))
    scanned = jax.jit(jax.grad(stack)).lower(w, x).compile()
    counts = analyse_hlo(scanned.as_text())
    assert counts.unknown_trip_counts == 0
    assert counts.matmul_flops == pytest.approx(3 * 2 * 256 * 512 * 512 * 6 / 4, rel=0.05)
    assert counts.matmul_flops == pytest.approx(6 * scanned.cost_analysis()["flops"], rel=0.05)
    assert counts.collectives  # FSDP-style gathers / reductions inside the loop

    # Multi-head projections (MLA's q up-projection, its output projection) and their gradients: XLA:TPU lowers
    # them to convolutions whose window lists fields by spatial dimension number while the labels order the
    # dimensions otherwise; the count must follow the numbers (reading the window in label order counted 8%).
    def heads(x, wq, wo):
        q = jnp.einsum("btc,chd->bthd", x, wq)[..., :128]
        return jnp.einsum("bthd,hdo->bto", q, wo).astype(jnp.float32).sum()

    one = Mesh(np.array(v5p.devices[:1]).reshape(1), ("data",))
    x, wq, wo = (_abstract(one, s, (None,) * len(s)) for s in ((4, 1024, 1536), (1536, 32, 192), (32, 128, 2048)))
    for fn in (lambda x, wq, wo: jnp.einsum("btc,chd->bthd", x, wq), jax.grad(heads, argnums=(0, 1, 2))):
        compiled = jax.jit(fn).lower(x, wq, wo).compile()
        assert "convolution(" in compiled.as_text()
        assert analyse_hlo(compiled.as_text()).matmul_flops == pytest.approx(
            compiled.cost_analysis()["flops"], rel=0.01
        )

    # A switch runs one branch: it costs its most expensive one (2 matmuls here), not the sum of all (3).
    def switch(i, x):
        return jax.lax.switch(i, [lambda x: x @ x, lambda x: x, lambda x: x @ x @ x], x)

    sq = _abstract(mesh, (512, 512), (None, None))
    branched = jax.jit(switch).lower(jax.ShapeDtypeStruct((), jnp.int32), sq).compile()
    assert analyse_hlo(branched.as_text()).matmul_flops == pytest.approx(2 * 2 * 512**3, rel=0.05)


# What newer XLA:TPU versions print: a loop with its first iteration peeled off (the copy before the loop, the
# counter then starting at 1, behind a copy), and a kernel whose metadata string holds a newline.
_PEELED_HLO = """HloModule peeled, entry_computation_layout={(f32[8,8]{1,0})->(s32[], f32[8,8]{1,0})}

%body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,8]{1,0} get-tuple-element(%p), index=1
  %d = f32[8,8]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %n = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8,8]{1,0}) tuple(%n, %d)
}

%cond (p.1: (s32[], f32[8,8])) -> pred[] {
  %p.1 = (s32[], f32[8,8]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %bound = s32[] constant(6)
  ROOT %lt = pred[] compare(%i.1, %bound), direction=LT
}

ENTRY %main (x.1: f32[8,8]) -> (s32[], f32[8,8]) {
  %x.1 = f32[8,8]{1,0} parameter(0)
  %peeled = f32[8,8]{1,0} dot(%x.1, %x.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %kernel = f32[8,8]{1,0} custom-call(%peeled), custom_call_target="tpu_custom_call", frontend_attributes={
kernel_metadata={
"xprof_metadata":"{\\"tiling\\": 8}"
}}, backend_config={"custom_call_config":{"cost_estimate":{"flops":"1000","transcendentals":"0"}}}
  %start = s32[] constant(1)
  %counter = s32[] copy(%start)
  %init = (s32[], f32[8,8]{1,0}) tuple(%counter, %kernel)
  ROOT %w = (s32[], f32[8,8]{1,0}) while(%init), condition=%cond, body=%body
}

FileNames
1 "model.py"
"""


def test_splash_kernels_are_counted_with_one_row_per_device():
    """With one row per device the splash kernels take q / k / v without their batch dimension; their flops are
    those of the batched call with b = 1 (they were counted as 0: a V3 layer's attention at 1 x 4096 per chip)."""
    from dsjax.aot.hlo import _splash_flops

    masks = [("s8", (1, 8, 8)), ("s8", (1, 8, 8))]
    qkv = [("bf16", (128, 4096, 192)), ("bf16", (128, 4096, 192)), ("bf16", (128, 4096, 128))]
    for kernel in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
        unbatched = _splash_flops(kernel, [*masks, *qkv, ("s32", (4096, 128))])
        assert unbatched > 0
        assert unbatched == _splash_flops(kernel, [*masks, *[(dt, (1, *shape)) for dt, shape in qkv]])
    assert _splash_flops("splash_mha_fwd", [*masks, *qkv]) == 2 * 128 * 4096 * 4097 / 2 * (192 + 128)


def test_hlo_counts_peeled_loops_and_multiline_kernels():
    counts = analyse_hlo(_PEELED_HLO)
    assert counts.unknown_trip_counts == 0
    # 5 loop iterations (counter 1..5) + the peeled one = 6 dots, and the kernel's stated cost once.
    assert counts.matmul_flops == 6 * 2 * 8**3 + 1000
    assert analyse_hlo(_PEELED_HLO.replace("constant(1)\n  %counter", "constant(0)\n  %counter")).matmul_flops == (
        7 * 2 * 8**3 + 1000
    )


def test_fp8_grouped_gemm_temporaries_are_bounded_on_tpu(v5p, monkeypatch):
    """The FP8 grouped GEMM (forward and both gradients) compiled for v5p: chunked rows and weight-gradient
    tiles bound XLA's fp32 temporaries. All at once they are ~5.5x what the chunks need here (at V3's expert
    shapes, 4.09 GiB against 1.02); budgets scaled down so that small shapes chunk."""
    from dsjax.config import Fp8Recipe
    from dsjax.ops import fp8_grouped

    mesh = Mesh(np.array(v5p.devices[:1]), ("x",))
    x = _abstract(mesh, (4096, 512), ())
    w = _abstract(mesh, (4, 512, 256), ())
    sizes = _abstract(mesh, (4,), (), jnp.int32)

    def temporaries():  # traced anew for each call (the budgets are read at trace time)
        def grads(x, w, sizes):
            loss = lambda x, w: jnp.sum(fp8_grouped.fp8_ragged_dot(x, w, sizes, Fp8Recipe()).astype(jnp.float32))
            return jax.grad(loss, argnums=(0, 1))(x, w)

        return jax.jit(grads).lower(x, w, sizes).compile().memory_analysis().temp_size_in_bytes

    whole = temporaries()
    monkeypatch.setattr(fp8_grouped, "_ROW_CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(fp8_grouped, "_WGRAD_CHUNK_BYTES", 1 << 20)
    chunked = temporaries()
    assert chunked < 0.3 * whole, (chunked, whole)


def test_fp8_pallas_kernels_compile_for_tpu_with_a_fraction_of_the_temporaries(v5p):
    """The dense FP8 GEMM's forward and both gradients as Pallas kernels, compiled by Mosaic for v5p over 4
    chips (rows split like the batch, the weight FSDP-sharded): XLA's emulation keeps fp32 copies of the
    quantised and re-tiled operands (0.27 GiB here), the kernels none (0.05: the bf16 output and the weight
    gradient's partial). Their stated flops are what the HLO count reads: the GEMMs' 3 x 2MKN exactly."""
    from dsjax.config import Fp8Recipe
    from dsjax.ops import fp8

    mesh = make_mesh(4, 1, v5p.devices)
    m, k, n = 16384, 1536, 8192
    x, g = _abstract(mesh, (m, k), ("data", None)), _abstract(mesh, (m, n), ("data", None))
    w = _abstract(mesh, (k, n), (None, "data"), jnp.float32)

    def compiled(backend, pow2=False):
        def step(x, w, g):
            recipe = Fp8Recipe(backend=backend, pow2_scales=pow2)
            y, pullback = jax.vjp(lambda x, w: fp8.fp8_matmul(x, w, recipe), x, w)
            return y, pullback(g)

        with jax.set_mesh(mesh):
            return jax.jit(step).lower(x, w, g).compile()

    kernels, emulated = compiled("pallas"), compiled("blocked")
    assert "dsjax_fp8_weight_grad" in kernels.as_text() and "dsjax_fp8_matmul" in kernels.as_text()
    temp = lambda c: c.memory_analysis().temp_size_in_bytes
    assert temp(kernels) < 0.3 * temp(emulated), (temp(kernels), temp(emulated))
    assert analyse_hlo(kernels.as_text()).matmul_flops == 3 * 2 * m * k * n / 4
    # power-of-two scales: the kernels round them with integer bit operations, which Mosaic lowers too
    assert "dsjax_fp8_quantize" in compiled("pallas", pow2=True).as_text()


def test_fp8_grouped_pallas_kernels_compile_for_tpu_with_a_fraction_of_the_temporaries(v5p):
    """The routed experts' grouped FP8 GEMM (forward and both gradients) as Pallas kernels inside an
    expert-parallel ``shard_map`` over 4 v5p chips (4 local experts each), compiled by Mosaic: XLA's chunked
    emulation keeps fp32 partials and re-tiled copies of its operands (0.14 GiB here), the kernels next to
    none (1 MiB: the outputs are the step's own). Their stated flops are the GEMMs' 3 x 2MKN exactly, whatever
    the expert sizes (XLA's emulation: 2% more, its weight gradient's partial tiles)."""
    from dsjax.config import Fp8Recipe
    from dsjax.ops import fp8_grouped

    mesh = make_mesh(1, 4, v5p.devices)
    m, k, n, local = 8192, 1024, 512, 4  # per chip
    rows = ("expert", None)
    x, g = _abstract(mesh, (4 * m, k), rows), _abstract(mesh, (4 * m, n), rows)
    w = _abstract(mesh, (4 * local, k, n), ("expert", None, None), jnp.float32)
    sizes = _abstract(mesh, (4 * local,), ("expert",), jnp.int32)

    def compiled(backend):
        def local_step(x, w, g, sizes):
            y, pullback = jax.vjp(
                lambda x, w: fp8_grouped.fp8_ragged_dot(x, w, sizes, Fp8Recipe(backend=backend)), x, w
            )
            return y, pullback(g)

        specs = (P(*rows), P("expert", None, None), P(*rows), P("expert"))
        out_specs = (P(*rows), (P(*rows), P("expert", None, None)))
        step = jax.shard_map(local_step, in_specs=specs, out_specs=out_specs, check_vma=False)
        with jax.set_mesh(mesh):
            return jax.jit(step).lower(x, w, g, sizes).compile()

    kernels, emulated = compiled("pallas"), compiled("blocked")
    text = kernels.as_text()
    assert "dsjax_fp8_grouped_matmul" in text and "dsjax_fp8_grouped_weight_grad" in text
    temp = lambda c: c.memory_analysis().temp_size_in_bytes
    assert temp(kernels) < 0.05 * temp(emulated), (temp(kernels), temp(emulated))
    assert analyse_hlo(text).matmul_flops == 3 * 2 * m * k * n


def test_fp8_weights_are_quantised_on_their_shards_and_gathered_in_e4m3(v5p):
    """Weights under FSDP, quantised ahead of their FP8 GEMMs: a dense projection (split over ``data`` x
    ``expert`` by its input width, gathered whole for the kernels) and experts (split over ``data`` by their
    width, gathered whole by expert parallelism's ``shard_map``). Traced under ``use_mesh`` with the rules they
    were placed with, each chip quantises its own shard and XLA gathers E4M3 values. Left to itself XLA:TPU
    gathers them in fp32 (in the V3 layer step the dense ones as fp32 sums over all chips)."""
    from dsjax.config import Fp8Recipe
    from dsjax.layers.common import project
    from dsjax.ops import fp8_grouped
    from dsjax.sharding import use_mesh, weight_spec

    mesh = make_mesh(2, 2, v5p.devices)
    recipe = Fp8Recipe(backend="pallas", wgrad_dtype="compute")  # gradients summed in bf16: fp32 is the weights'
    rows = (("data", "expert"), None)
    w = _abstract(mesh, (4, 512, 256), ("expert", "data", None), jnp.float32)
    dense = _abstract(mesh, (512, 256), (("data", "expert"), None), jnp.float32)
    narrow = _abstract(mesh, (256, 384), (("data", "expert"), None), jnp.float32)  # 64 rows a shard: half a block
    x = _abstract(mesh, (4096, 512), rows)
    sizes = _abstract(mesh, (8,), (("data", "expert"),), jnp.int32)  # two local experts' group sizes per chip

    def loss(w, dense, narrow, x, sizes):
        spec = weight_spec(("experts", "embed", "moe_mlp"), w.shape)
        experts = fp8_grouped.fp8_experts(w, recipe, x.dtype, spec)
        gmm = fp8_grouped.grouped_matmul(recipe)
        y = jax.shard_map(
            lambda x, experts, sizes: gmm(x, experts, sizes),
            in_specs=(P(*rows), P("expert"), P(rows[0])),
            out_specs=P(*rows),
            check_vma=False,
        )(x, experts, sizes)
        y = y + project(x, dense, None, n_in=1, fp8=recipe, axes=("embed", "mlp"))
        z = project(x[:, :256], narrow, None, n_in=1, fp8=recipe, axes=("embed", "mlp"))
        return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(z.astype(jnp.float32) ** 2)

    def moved(rules):  # {weight: {(collective, dtype)}} for the collectives of weight-shaped values
        with use_mesh(mesh, rules):
            text = jax.jit(jax.grad(loss, (0, 1, 2))).lower(w, dense, narrow, x, sizes).compile().as_text()
        found = re.findall(r"= (\w+)\[(2,512,256|512,256|256,384)\]\S* (all-gather|all-reduce)\(", text)
        shapes = ("2,512,256", "512,256", "256,384")
        return {shape: {(kind, dtype) for dtype, s, kind in found if s == shape} for shape in shapes}

    # pinned: E4M3 gathered forward (the gradients, bf16, summed backward), nothing of the weights moved in fp32
    for shape, collectives in moved(FSDP_RULES).items():
        assert ("all-gather", "f8e4m3fn") in collectives and all(d != "f32" for _, d in collectives), shape
    unpinned = moved(None)  # no rules declared
    assert all(("all-gather", "f32") in collectives for collectives in unpinned.values()), unpinned


def test_fp8_tokens_cross_the_expert_exchange_in_e4m3(v5p):
    """An FP8 MoE's routed experts under expert parallelism, forward and backward, compiled for v5p (data 2 x
    expert 2, the real ``ragged_all_to_all``): with ``fp8.quantized_dispatch`` the token rows go to their
    experts as E4M3 bytes (``u8``, half of bf16's) with their fp32 scales, each in place of one bf16 exchange of
    the step without it (no exchange added but the scales'; results and gradients still go back in bf16)."""
    from dsjax.config import Fp8Recipe
    from dsjax.ops import fp8_grouped
    from dsjax.ops.ep import moe_expert_parallel

    mesh = make_mesh(2, 2, v5p.devices)
    tokens = (("data", "expert"), None)
    x, weights = _abstract(mesh, (512, 256), tokens), _abstract(mesh, (512, 2), tokens, jnp.float32)
    experts = _abstract(mesh, (512, 2), tokens, jnp.int32)
    w_up, w_down = _abstract(mesh, (8, 256, 128), ("expert",)), _abstract(mesh, (8, 128, 256), ("expert",))

    def exchanges(quantized):
        gmm = fp8_grouped.grouped_matmul(Fp8Recipe(backend="pallas", quantized_dispatch=quantized))

        def loss(x, weights, w_up, w_down, experts):
            y = moe_expert_parallel(
                x, weights, experts, w_up, w_up, w_down, gmm=gmm, capacity_factor=1.0, exchange="ragged",
                check_vma=False,
            )  # fmt: skip
            return jnp.sum(y.astype(jnp.float32) ** 2)

        with jax.set_mesh(mesh):
            text = jax.jit(jax.grad(loss, (0, 1, 2, 3))).lower(x, weights, w_up, w_down, experts).compile().as_text()
        # XLA:TPU reshapes the rows for the exchange: told apart by dtype (s32: the rows' expert ids)
        return collections.Counter(re.findall(r"= (\w+)\[[\d,]+\]\S* ragged-all-to-all\(", text))

    sent, unsent = exchanges(True), exchanges(False)
    assert sent["u8"] == sent["f32"] > 0 and unsent["u8"] == unsent["f32"] == 0, (sent, unsent)
    assert sent["u8"] + sent["bf16"] == unsent["bf16"] and sent["s32"] == unsent["s32"], (sent, unsent)


def test_optimizer_state_is_sharded_like_the_parameters():
    cfg = dsjax.ModelConfig.tiny()
    tc = TrainConfig()
    mesh = make_mesh(data=2, expert=4)
    with jax.set_mesh(mesh):
        model = dsjax.create_model(cfg, mesh=mesh, rules=FSDP_RULES)
        tx = make_optimizer(tc, nnx.state(model, nnx.Param))
        _, state = init_train_state(model, tx)
    params = jax.tree.leaves(state.params)
    mu, nu = state.opt_state[1][0].mu, state.opt_state[1][0].nu
    for moments in (mu, nu):
        for p, m in zip(params, jax.tree.leaves(moments)):
            assert m.sharding == p.sharding, (p.shape, p.sharding, m.sharding)
    assert not any(p.sharding.is_fully_replicated for p in params)
    # The abstract state the compile harness builds has the same shardings, leaf for leaf.
    _, abstract, _ = abstract_train_state(cfg, functools.partial(make_optimizer, tc), mesh, FSDP_RULES)
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
        assert (a.shape, a.dtype, a.sharding) == (s.shape, s.dtype, s.sharding)


@pytest.mark.parametrize(("preset", "topology", "data", "expert"), [
    ("deepseek_v3", "v5p:8x8x8", 8, 64),
    ("deepseek_v2_lite", "v5p:2x2x1", 1, 4),
])  # fmt: skip
def test_no_weight_is_replicated_under_fsdp(preset, topology, data, expert):
    cfg = getattr(dsjax.ModelConfig, preset)(num_nextn_predict_layers=1)
    mesh = make_mesh(data, expert, target(topology).devices)
    state = nnx.state(abstract_model(cfg), nnx.Param)
    shardings = state_shardings(state, mesh, FSDP_RULES)
    per_chip = 0
    for (path, var), (_, sharding) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings)):
        s = sharding.get_value()
        assert not s.is_fully_replicated, f"{'.'.join(map(str, path))} {var.get_value().shape} is replicated"
        per_chip += np.prod(s.shard_shape(var.get_value().shape))
    total = sum(np.prod(v.get_value().shape) for _, v in nnx.to_flat_state(state))
    # Evenly spread: each chip holds 1/chips of the parameters, within 2% (dims that do not split evenly).
    assert per_chip <= total / mesh.size * 1.02


def test_dispatch_follows_the_mesh_platform(v5p):
    cfg = dsjax.ModelConfig.tiny()
    with jax.set_mesh(make_mesh(2, 2, v5p.devices)):
        assert resolve_dispatch("auto", 64, cfg) == "ep"
    with jax.set_mesh(make_mesh(4, 1, v5p.devices)):
        assert resolve_dispatch("auto", 64, cfg) == "ragged"
    with jax.set_mesh(make_mesh(2, 2)):
        assert resolve_dispatch("auto", 512, cfg) == "blocked"


def test_model_flops_count_v3():
    v3 = dsjax.ModelConfig.deepseek_v3()
    # DeepSeek-V3: 37B activated parameters per token (0.93B of them the embedding table, not a matmul).
    assert 36e9 < active_matmul_params(v3) < 37.5e9
    # MaxText's measured V3 run: 152.4 TFLOP/s/chip at 542 tokens/s/chip = 281 GFLOP per token (no MTP).
    assert train_flops(v3, 1, 8192, mtp=False) / 8192 == pytest.approx(281e9, rel=0.03)


@pytest.fixture(scope="module")
def tiny_reports(v5p, tmp_path_factory):
    cfg = dsjax.ModelConfig.tiny()
    mesh = make_mesh(2, 2, v5p.devices)
    tc = TrainConfig(compute_dtype="bfloat16", remat="offload_attn")
    # conftest asks for "highest" matmul precision (fp32 tests on CPU); the TPU ragged-dot kernel has no fp32
    # pass for bf16 operands, and a real TPU run uses the default.
    with jax.default_matmul_precision("default"):
        hlo = str(tmp_path_factory.mktemp("tiny_train") / "hlo.txt")
        train = compile_report(
            train_program(cfg, tc, mesh, FSDP_RULES, batch=8, seq=64), v5p, mesh, name="train", hlo_path=hlo
        )
        decode = compile_report(decode_program(cfg, mesh, FSDP_RULES, batch=8, context=128), v5p, mesh, name="decode")
    return train, decode


@pytest.mark.slow
def test_tiny_train_and_decode_compile_for_v5p(tiny_reports):
    for report in tiny_reports:
        assert report["fits"] is True and not report.get("error"), report.get("error")
        assert report["chips"] == 4 and report["chip_hbm_gib"] == pytest.approx(95.74)
        assert 0 < report["hbm_per_chip_gib"] < 1
        assert report["memory"]["temporaries"] > 0 and report["compile_s"] > 0
        # XLA's live peak counts the arguments and at most the whole allocation
        mem = report["memory_bytes"]
        assert mem["arguments"] <= mem["live_peak"] <= mem["arguments"] + mem["outputs"] + mem["temporaries"]
        assert report["flops_per_chip"] > 0 and report["model_flops_per_chip"] > 0
        assert 0.5 < report["flops_ratio"] < 10
        assert 0 < report["est_mfu"] <= 1
        # Expert parallelism over the `expert` axis: tokens travel by (ragged) all-to-all.
        assert {"all-to-all", "ragged-all-to-all"} & set(report["collectives"])
    train, decode = tiny_reports
    assert train["memory"]["aliased"] > 0  # the state is donated
    # remat=offload_attn keeps two [rows, seq, d] tensors per layer in host memory; decode keeps nothing there
    assert train["memory_bytes"]["host_temporaries"] > 0 and decode["memory_bytes"]["host_temporaries"] == 0
    assert train["tokens_per_step"] == 8 * 64 and decode["tokens_per_step"] == 8


@pytest.mark.slow
def test_a_saved_compile_gets_the_same_report(tiny_reports, v5p, tmp_path, capsys):
    """``--analyse``: a program compiled elsewhere (MaxText's, through scripts/maxtext_compile.py) is reported
    from its saved memory parts and HLO exactly as dsjax's own compile is."""
    import json
    import shutil

    from dsjax.aot.report import saved_compile_report

    train = tiny_reports[0]
    shutil.copy(train["hlo_path"], tmp_path / "hlo.txt")
    (tmp_path / "memory.json").write_text(json.dumps(dict(memory_bytes=train["memory_bytes"], compile_s=1.5, jax="x")))
    model_flops = train["model_flops_per_chip"] * train["chips"]
    saved = saved_compile_report(str(tmp_path), v5p, model_flops=model_flops, tokens=train["tokens_per_step"])
    for key in ("hbm_per_chip_gib", "memory", "fits", "flops_per_chip", "flops_ratio", "collectives", "est_mfu"):
        assert saved[key] == train[key], key
    assert saved["compile_s"] == 1.5 and saved["peer"] == {"jax": "x"}
    with pytest.raises(ValueError, match="runs on 4 devices, v5p:2x2x2 has 8"):
        saved_compile_report(str(tmp_path), target("v5p:2x2x2"), model_flops=model_flops, tokens=1)
    # The command line: the model named describes what the saved program trains (its model flops).
    args = ["--topology", "v5p:2x2x1", "--model", "tiny", "--per-chip-batch", "2", "--seq", "64", "--json"]
    assert aot_main([*args, "--analyse", str(tmp_path)]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli["flops_per_chip"] == train["flops_per_chip"]
    assert cli["model_flops_per_chip"] == pytest.approx(train["model_flops_per_chip"])
    assert aot_main([*args, "--analyse", str(tmp_path / "missing")]) == 1
    assert "No such file" in capsys.readouterr().err


def test_a_program_that_does_not_fit_is_a_report(v5p):
    mesh = Mesh(np.array(v5p.devices[:1]).reshape(1), ("data",))
    n = 240_000  # a [n, n] fp32 intermediate kept whole by the barrier: 107 GiB

    def outer_then_matmul(x, z):
        return jax.lax.optimization_barrier(jnp.outer(x, x)) @ z

    from dsjax.aot.steps import Program

    x = _abstract(mesh, (n,), (None,), jnp.float32)
    z = _abstract(mesh, (n, 8), (None, None), jnp.float32)
    report = compile_report(Program(jax.jit(outer_then_matmul), (x, z), 1.0, 1), v5p, mesh, name="oom")
    assert report["fits"] is False and report["out_of_memory"] is True
    assert "HBM" in report["error"] or "memory" in report["error"].lower()
    assert report["hbm_per_chip_gib"] is None


def test_cli_rejects_bad_arguments(capsys):
    assert aot_main(["--topology", "v5p:2x2x1", "--model", "tiny", "--mesh", "data=3", "--batch", "8"]) == 1
    assert "does not cover the 4 chips" in capsys.readouterr().err
    assert aot_main(["--topology", "v9x:2x2", "--model", "tiny", "--batch", "8"]) == 1
    assert "unknown TPU topology" in capsys.readouterr().err
    assert aot_main(["--topology", "v5p:2x2x1", "--model", "tiny", "--mesh", "data=4,expert=x"]) == 1
    assert "expected e.g. data=8,expert=64" in capsys.readouterr().err
    assert GIB == 2**30
    tiny_pipeline = ["--topology", "v5p:2x2x1", "--model", "tiny", "--rules", "default", "--batch", "8"]
    assert aot_main([*tiny_pipeline, "--pipeline", "gpipe:2:4"]) == 1
    assert "NAME:RANKS:MICROBATCHES" in capsys.readouterr().err
    assert aot_main([*tiny_pipeline, "--pipeline", "1f1b:2:4", "--mesh", "expert=4"]) == 1
    assert "x 2 stage ranks does not cover the 4 chips" in capsys.readouterr().err


def test_pipelined_train_step_lowers_for_v5p_with_the_stack_sharded_over_stage():
    """``--pipeline``: the pipelined train step built from abstract state for a TPU slice (stage 2 x expert 2),
    its layer stack and AdamW moments sharded over ``stage``; lowered, not compiled (a compile takes minutes)."""
    from dsjax.aot.cli import build

    args = aot_parser().parse_args(["--topology", "v5p:2x2x1", "--model", "tiny", "--rules", "default", "--batch",
                                    "8", "--seq", "32", "--mesh", "expert=2", "--pipeline", "dualpipev:2:4", "--set",
                                    "model.num_hidden_layers=5", "--set", "train.compute_dtype=float32"])  # fmt: skip
    program, _, mesh = build(args)
    assert dict(mesh.shape) == {"stage": 2, "data": 1, "expert": 2}
    state = program.args[0]
    stack = [x for p, x in jax.tree_util.tree_leaves_with_path((state.params, state.opt_state))
             if "moe_layers" in jax.tree_util.keystr(p)]  # fmt: skip
    assert len(stack) > 30 and all(x.shape[0] == 4 and x.sharding.spec[0] == "stage" for x in stack)
    with jax.default_matmul_precision("default"):
        program.fn.lower(*program.args)


@pytest.mark.slow
def test_grpo_update_compiles_for_v5p(capsys):
    """``--step grpo``: the RL update (chunked log-probs, reference and old log-prob inputs, AdamW, donated
    state) compiles for a TPU slice on the data x expert mesh, through the CLI's ``--set grpo.*``."""
    import json

    args = ["--topology", "v5p:2x2x1", "--model", "tiny", "--step", "grpo", "--mesh", "data=2,expert=2",
            "--batch", "8", "--seq", "64", "--set", "grpo.beta=0.04", "--set", "grpo.mu=2", "--set", "grpo.G=4",
            "--set", "train.loss_chunk=16", "--json"]  # fmt: skip
    with jax.default_matmul_precision("default"):  # see tiny_reports
        assert aot_main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["fits"] is True and report["tokens_per_step"] == 8 * 64
    assert report["memory"]["aliased"] > 0  # the train state is donated
    assert 0.5 < report["flops_ratio"] < 10
    assert {"all-to-all", "ragged-all-to-all"} & set(report["collectives"])
    assert aot_main([*args[:-3], "--set", "grpo.loss_mode=median"]) == 1  # a bad grpo field is an error


def test_mosaic_gpu_flops_told_apart_by_operand_dtypes():
    """The FP8 kernels' counts read their E4M3 operands only: neither the scales (``[c/128, m]``, as many rows as
    ``a`` when ``c = 128 m``) nor a tile count equal to a width (``T == n``) may pass for a matrix; the bf16
    kernels keep their counts."""
    from dsjax.aot.hlo import _mosaic_gpu_flops

    f8, f32, bf16, s32 = "f8e4m3fn", "f32", "bf16", "s32"
    m, c, n = 128, 16384, 7168  # the scales sa^T [c/128, m] = [128, 128]
    ins = [(s32, (1,)), (f8, (m, c)), (f32, (c // 128, m)), (f8, (1, n, c)), (f32, (1, c // 128, n // 128))]
    assert _mosaic_gpu_flops((m, n), ins) == 2.0 * m * n * c
    k, n, tiles = 512, 256, 256  # T == n
    ins = [
        (s32, (8,)),
        (s32, (8,)),
        (f8, (k, 128 * tiles)),
        (f32, (tiles, k)),
        (f8, (n, 128 * tiles)),
        (f32, (tiles, n)),
    ]
    assert _mosaic_gpu_flops((8, k, n), ins) == 2.0 * k * n * 128 * tiles
    assert (
        _mosaic_gpu_flops((300, 128), [(s32, (4,)), (bf16, (300, 256)), (bf16, (4, 256, 128))]) == 2.0 * 300 * 128 * 256
    )
    bf16_wgrad = [*[(s32, (4,))] * 5, (bf16, (384, 256)), (bf16, (384, 128))]
    assert _mosaic_gpu_flops((4, 256, 128), bf16_wgrad) == 2.0 * 384 * 256 * 128
