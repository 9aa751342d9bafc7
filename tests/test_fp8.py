"""Fine-grained FP8 GEMMs (dsjax.ops.fp8) against the independent NumPy + ml_dtypes reference (fp8_reference.py).

Quantisation is compared byte for byte (q bytes, fp32 scale bits) with the recipe's IEEE divisions (XLA would
turn them into reciprocal multiplications, 1 ulp off; dsjax keeps them, and test_true_division pins a case).
GEMMs and gradients match the reference's float64 per-block oracle to <1e-6 relative (``max|a - b| / max|b|``,
measured 2e-8..8e-7). Against exact fp32 matmuls one fine-grained E4M3 GEMM on this data is 1.7-4.1%
rel-Frobenius (fwd/dgrad/wgrad); the band asserted is 0.5%-6%, whose lower end catches quantisation skipped.
"""

import functools
from dataclasses import replace

import chex
import fp8_reference as ref
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsjax.config import ConfigError, Fp8Recipe
from dsjax.ops import fp8, fp8_grouped, fp8_grouped_pallas, fp8_pallas
from dsjax.sharding import make_mesh

HYP = settings(max_examples=10, deadline=None)
BACKENDS = ("blocked", "reference")
ALL_BACKENDS = (*BACKENDS, "pallas")  # the Pallas TPU kernels, run by Pallas' interpreter here
ORACLE_TOL = 1e-5  # fp8 x fp8 partial dots are exact; what is left is fp32 scale products and sums
# reference: one fp32 dot over all of K (measured <= 1.5e-6); pallas: blocked's sums in the kernels' order
GEMM_TOL = {"blocked": 1e-6, "reference": 5e-6, "pallas": 1e-6}
BAND = (0.005, 0.06)  # rel-Frobenius vs exact fp32


def recipe(backend="blocked", pow2=False):
    return Fp8Recipe(backend=backend, pow2_scales=pow2)


def f32_bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def q_bytes(q):
    return np.asarray(q).view(np.uint8)


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def rel_fro(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def activations(seed, shape, outlier_channel=3):
    """Gaussian with a x50 outlier channel and per-row magnitudes spread over 4 decades."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x *= (10.0 ** rng.uniform(-2, 2, (*shape[:-1], 1))).astype(np.float32)
    x[..., outlier_channel % shape[-1]] *= 50
    return x


# ---- 1. quantisation, bit-exact ---------------------------------------------------------------------------------


quantize_rows = jax.jit(fp8.quantize_rows, static_argnums=1)
quantize_blocks = jax.jit(fp8.quantize_blocks, static_argnums=1)


def check_quantized(x, q, s, quantize_ref, pow2):
    """Bit-exact (q bytes, scale bits) vs the reference's IEEE divisions; no NaN; pow2 scales are powers of 2."""
    q_ref, s_ref = quantize_ref(x, pow2)
    chex.assert_trees_all_equal((q_bytes(q), f32_bits(s)), (q_bytes(q_ref), f32_bits(s_ref)))
    assert np.isfinite(np.asarray(q, np.float32)).all() and np.isfinite(np.asarray(s)).all()
    if pow2:
        np.testing.assert_array_equal(np.frexp(np.asarray(s))[0], 0.5)


@HYP
@given(
    shape=st.sampled_from([(3, 1), (4, 127), (3, 128), (3, 129), (5, 300), (2, 3, 256)]),
    pow2=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantize_rows_bit_exact(shape, pow2, seed):
    x = activations(seed, shape)
    flat = x.reshape(-1, shape[-1])
    flat[0] = 0.0  # all-zero tiles
    flat[1, 0] = 1e30  # far beyond the rest of its tile: they underflow, nothing becomes NaN
    flat[2, -1] = -3e38
    q, s = quantize_rows(jnp.asarray(x), recipe(pow2=pow2))
    chex.assert_shape(s, (*shape[:-1], -(-shape[-1] // 128)))
    check_quantized(x, q, s, ref.quantize_rows, pow2)
    np.testing.assert_array_equal(np.asarray(s).reshape(flat.shape[0], -1)[0], ref.scale(0, pow2))  # 1e-4/448
    qf = np.asarray(q, np.float32).reshape(flat.shape)
    assert not qf[0].any() and not qf[1, 1:128].any()
    assert 224 <= qf[1, 0] <= 448 and -448 <= qf[2, -1] <= -224  # = +-448 without pow2


def test_true_division():
    """The recipe's divisions, IEEE-rounded, under jit: 3e38 / 448 would be 1 ulp off as 3e38 * fl(1/448);
    50.861008 / s is exactly 232, an E4M3 midpoint that rounds to even (224), where 50.861008 * fl(1/s) =
    232.00002 would round to 240."""
    x = np.float32([[3e38, 0.0], [98.214355, 50.861008]])
    q, s = quantize_rows(jnp.asarray(x), recipe())
    q_ref, s_ref = ref.quantize_rows(x)
    chex.assert_trees_all_equal((q_bytes(q), f32_bits(s)), (q_bytes(q_ref), f32_bits(s_ref)))


def test_division_is_exact_on_cpu_and_plain_on_accelerators(monkeypatch):
    """On CPU a tensor's values are divided by their scales behind an optimisation barrier (the bit-exact
    division above); on TPU / GPU steps by a plain division, because the barrier's full-size fp32 divisor was a
    1-1.5 GiB temporary per quantised tensor of a V3 layer on v5p: the same scales (amax / 448 stays exact, a
    small array), the same E4M3 values up to a rare rounding flip where the compiler multiplies by a
    reciprocal (the case above)."""
    x = jnp.asarray(activations(22, (64, 256)))

    def barriers():  # a new function each time: traces are cached per function
        jaxpr = jax.make_jaxpr(lambda x: fp8.quantize_rows(x, recipe()))(x)
        return [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier" and e.outvars[0].aval.ndim == 3]

    assert barriers()
    exact = quantize_rows(x, recipe())
    monkeypatch.setattr(fp8, "active_platform", lambda: "tpu")
    assert not barriers()
    plain = jax.jit(lambda x: fp8.quantize_rows(x, recipe()))(x)
    np.testing.assert_array_equal(np.asarray(plain[1]), np.asarray(exact[1]))  # scales: the same division of amax
    assert np.mean(q_bytes(plain[0]) != q_bytes(exact[0])) < 1e-3
    q, _ = jax.jit(lambda x: fp8.quantize_rows(x, recipe()))(jnp.asarray([[98.214355, 50.861008]]))
    assert 224 <= float(np.asarray(q, np.float32)[0, 1]) <= 240  # the midpoint case: at most one E4M3 step away


def test_quantize_rows_known_values():
    """Hand-checked: 448 -> 448 (s = 1), 0.0625 exact, 1/3 -> 0.34375, 100 (a tie) -> 96 (even mantissa)."""
    x = np.zeros((1, 130), np.float32)
    x[0, :4] = [448.0, -0.0625, 1 / 3, 100.0]
    x[0, 129] = 0.5  # second (ragged) tile: s = 0.5 / 448, the zero padding does not change it
    q, s = quantize_rows(jnp.asarray(x), recipe())
    np.testing.assert_array_equal(np.asarray(s), [[1.0, np.float32(0.5) / np.float32(448)]])
    np.testing.assert_array_equal(np.asarray(q[0, :4], np.float32), [448.0, -0.0625, 0.34375, 96.0])
    assert np.asarray(q[0, 129], np.float32) == 448.0
    # the clip before the cast (unreachable with online scales, |x| / s <= 448): a bare cast of 500 is NaN
    np.testing.assert_array_equal(np.asarray(fp8._cast(jnp.float32([500, -1e30]), 1.0), np.float32), [448, -448])


@HYP
@given(
    shape=st.sampled_from([(1, 1), (127, 129), (128, 300), (2, 130, 257)]),
    pow2=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantize_blocks_bit_exact(shape, pow2, seed):
    w = activations(seed, shape)
    w[..., :128, 128:] = 0.0  # an all-zero block where there are two block columns
    w[..., -1, 0] = 1e30
    q, s = quantize_blocks(jnp.asarray(w), recipe(pow2=pow2))
    chex.assert_shape(s, (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128)))
    check_quantized(w, q, s, ref.quantize_blocks, pow2)
    if shape[-1] > 128:
        np.testing.assert_array_equal(np.asarray(s)[..., 0, 1], ref.scale(0, pow2))
    s_full = np.repeat(np.repeat(np.asarray(s), 128, -2), 128, -1)[..., : shape[-2], : shape[-1]]
    deq = fp8.dequantize_blocks(q, s, 128)
    np.testing.assert_array_equal(f32_bits(deq), f32_bits(np.asarray(q, np.float32) * s_full))


# ---- 2. GEMM forward -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("col_block", [128, 1])
def test_gemm_matches_blocked_oracle(backend, col_block):
    m, k, n = 70, 300, 130
    xq, sx = ref.quantize_rows(activations(0, (m, k)))
    if col_block == 128:
        wq, sw = ref.quantize_blocks(activations(1, (k, n)) * 0.02)
        sw_cols = ref.block_scales_per_column(sw, n)
    else:  # wgrad layout: 128 x 1 tiles along the contraction
        wtq, swt = ref.quantize_rows(activations(1, (n, k)))
        wq, sw = wtq.T, swt.T
        sw_cols = sw
    y = fp8.gemm(
        jnp.asarray(xq), jnp.asarray(sx), jnp.asarray(wq), jnp.asarray(sw), col_block=col_block, recipe=recipe(backend)
    )
    chex.assert_shape(y, (m, n))
    chex.assert_type(y, jnp.float32)
    assert max_rel(y, ref.blocked_dot(xq, sx, wq, sw_cols)) < GEMM_TOL[backend]


@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_matmul_error_band(pow2):
    x, w = activations(2, (256, 512)), activations(3, (512, 384)) * 0.02
    ys = {b: np.asarray(fp8.fp8_matmul(jnp.asarray(x), jnp.asarray(w), recipe(b, pow2))) for b in ALL_BACKENDS}
    y_ref = ref.linear_fwd(x, w, pow2)
    for backend, y in ys.items():
        assert max_rel(y, y_ref) < GEMM_TOL[backend]
    err = rel_fro(ys["blocked"], x.astype(np.float64) @ w)
    assert BAND[0] < err < BAND[1], err


# ---- 3. custom_vjp gradients -----------------------------------------------------------------------------------


def vjp(f, primals, g, jit=True):
    """``(f(*primals), cotangents for g)``, jitted by default (one compilation instead of op-by-op dispatch)."""

    def run(primals, g):
        y, pullback = jax.vjp(f, *primals)
        return y, pullback(g)

    return (jax.jit(run) if jit else run)(tuple(jnp.asarray(p) for p in primals), jnp.asarray(g))


@pytest.mark.parametrize("g_scale", [1.0, 1e-7])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fp8_matmul_grads(backend, pow2, g_scale):
    """g_scale 1e-7: gradients as small as real ones (most rows below the activations' 1e-4 amax floor) keep
    their precision, because gradient tiles use grad_amax_floor."""
    x, w = activations(4, (3, 50, 300)), activations(5, (300, 200)) * 0.02  # M = 150: two wgrad tiles
    g = np.random.default_rng(6).standard_normal((3, 50, 200)).astype(np.float32) * np.float32(g_scale)
    y, (dx, dw) = vjp(lambda x, w: fp8.fp8_matmul(x, w, recipe(backend, pow2)), (x, w), g)
    chex.assert_shape((y, dx, dw), (g.shape, x.shape, w.shape))
    x2, g2, dx = x.reshape(-1, 300), g.reshape(-1, 200), dx.reshape(-1, 300)
    dx_ref, dw_ref = ref.linear_grads(x2, w, g2, pow2)
    assert max_rel(y.reshape(-1, 200), ref.linear_fwd(x2, w, pow2)) < ORACLE_TOL
    assert max_rel(dx, dx_ref) < ORACLE_TOL
    assert max_rel(dw, dw_ref) < ORACLE_TOL
    x64, w64, g64 = x2.astype(np.float64), w.astype(np.float64), g2.astype(np.float64)
    for got, exact in ((dx, g64 @ w64.T), (dw, x64.T @ g64)):
        assert BAND[0] < rel_fro(got, exact) < BAND[1]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fp8_matmul_prequantized_weight(backend):
    x, w = activations(7, (96, 300)), activations(8, (300, 130)) * 0.02
    g = np.random.default_rng(9).standard_normal((96, 130)).astype(np.float32)
    wq, sw = ref.quantize_blocks(w)
    f = lambda x, wq, sw: fp8.fp8_matmul(x, wq, recipe(backend), w_scale=sw)
    y, (dx, dwq, dsw) = vjp(f, (x, wq, sw), g)
    assert max_rel(y, ref.linear_fwd(x, w)) < ORACLE_TOL
    assert max_rel(dx, ref.dgrad(g, wq, sw)) < ORACLE_TOL
    assert not np.asarray(dwq, np.float32).any() and not np.asarray(dsw).any()


def test_fp8_matmul_bf16_eager():
    bf16 = ml_dtypes.bfloat16
    x, w = activations(10, (64, 256)).astype(bf16), (activations(11, (256, 160)) * 0.02).astype(bf16)
    g = np.random.default_rng(12).standard_normal((64, 160)).astype(bf16)
    y, (dx, dw) = vjp(lambda x, w: fp8.fp8_matmul(x, w, recipe()), (x, w), g, jit=False)
    chex.assert_type((y, dx, dw), jnp.bfloat16)
    dx_ref, dw_ref = ref.linear_grads(x, w, g)
    for got, want in ((y, ref.linear_fwd(x, w)), (dx, dx_ref), (dw, dw_ref)):
        assert rel_fro(np.asarray(got, np.float32), want) < 4e-3  # bf16 output rounding only


# ---- 3b. the Pallas TPU kernels (interpreted here) ---------------------------------------------------------


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(3, 1), (70, 300), (130, 640)])
def test_pallas_quantisation_is_bitwise_quantize_rows(shape, pow2):
    """The quantisation kernel (tile amax, the recipe's scale of it, E4M3 values, all in VMEM) gives the bytes
    and scale bits of :func:`quantize_rows` (the same IEEE divisions here)."""
    x = activations(30, shape)
    x[0] = 0.0
    x[-1, -1] = -3e38
    q, s = fp8_pallas.quantize(jnp.asarray(x), fp8_pallas.TileRecipe(amax_floor=1e-4, pow2=pow2))
    q_ref, s_ref = ref.quantize_rows(x, pow2)
    chex.assert_trees_all_equal((q_bytes(q), f32_bits(s)), (q_bytes(q_ref), f32_bits(s_ref)))


@pytest.mark.parametrize("quantised_a", [True, False])
def test_pallas_scaled_matmul_matches_the_blocked_oracle(quantised_a):
    """Both operand forms: fp8 ``a`` with its scales, and float ``a`` quantised inside the kernel (how the input
    gradient's ``g`` enters). K = 300 pads to 384: three promotions in one 384-wide block."""
    m, k, n = 70, 300, 130
    x = activations(0, (m, k))
    xq, sx = ref.quantize_rows(x)
    wq, sw = ref.quantize_blocks(activations(1, (k, n)) * 0.02)
    sw_cols = ref.block_scales_per_column(sw, n)
    if quantised_a:
        y = fp8_pallas.scaled_matmul(jnp.asarray(xq), jnp.asarray(sx), jnp.asarray(wq), jnp.asarray(sw_cols))
    else:
        tiles = fp8_pallas.TileRecipe(amax_floor=1e-4, pow2=False)
        y = fp8_pallas.scaled_matmul(jnp.asarray(x), None, jnp.asarray(wq), jnp.asarray(sw_cols), tiles=tiles)
    chex.assert_shape(y, (m, n))
    assert max_rel(y, ref.blocked_dot(xq, sx, wq, sw_cols)) < GEMM_TOL["pallas"]


def test_pallas_fp8_matmul_sharded_equals_one_device():
    """Under an 8-device mesh the kernels run per shard (rows split like the batch, 256 per device: whole
    128-token tiles) and give the single-device values and gradients; rows that do not split into whole
    tiles (40 per device) stay whole on each device, with the same values."""
    mesh = make_mesh(2, 4)
    w = jnp.asarray(activations(41, (256, 384)) * 0.02)
    loss = lambda x, w: jnp.sum(jnp.tanh(fp8.fp8_matmul(x, w, recipe("pallas"))))
    grad = jax.value_and_grad(loss, argnums=(0, 1))
    for rows in (2048, 320):
        x = jnp.asarray(activations(40, (rows, 256)))
        single = jax.jit(grad)(x, w)
        with jax.set_mesh(mesh):
            xs = jax.device_put(x, jax.NamedSharding(mesh, jax.P(("data", "expert"), None)))
            sharded = jax.jit(grad)(xs, w)
            text = jax.jit(grad).lower(xs, w).as_text()
        assert "shard_map" in text or "manual" in text, "the kernels should run per shard"
        assert_close(sharded, single, tol=1e-6)


def test_auto_backend_takes_the_kernels_on_tpu_only(monkeypatch):
    x, w = jnp.ones((8, 128)), jnp.ones((128, 128))

    def kernels_called():
        loss = lambda x, w: fp8.fp8_matmul(x, w, recipe("auto")).sum()
        return "pallas_call" in str(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w))

    assert not kernels_called()
    monkeypatch.setattr(fp8, "active_platform", lambda: "tpu")
    monkeypatch.setattr(fp8_pallas, "active_platform", lambda: "tpu")
    assert kernels_called()
    with pytest.raises(ConfigError, match="needs fp8.block=128"):
        Fp8Recipe(backend="pallas", block=64)
    monkeypatch.setattr(fp8_pallas, "active_platform", lambda: "gpu")
    with pytest.raises(ValueError, match="TPU kernel"):
        fp8.fp8_matmul(x, w, recipe("pallas"))


# ---- 4. grouped GEMM -------------------------------------------------------------------------------------------

GROUPS = np.array([40, 0, 150, 70])  # an empty group, one of 150 rows starting at row 40; 40 rows past the end


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fp8_ragged_dot(backend, pow2):
    s_rows, k, n = 300, 200, 136
    x = activations(13, (s_rows, k))
    x[[45, 130, 200]] *= 30  # outlier tokens: each wgrad tile's scale must see only its group's part of the tile
    w = activations(14, (len(GROUPS), k, n)) * 0.02
    g = np.random.default_rng(15).standard_normal((s_rows, n)).astype(np.float32)
    r = recipe(backend, pow2)
    y, (dx, dw) = vjp(lambda x, w: fp8_grouped.fp8_ragged_dot(x, w, jnp.asarray(GROUPS), r), (x, w), g)
    dx_ref, dw_ref = ref.ragged_grads(x, w, GROUPS, g, pow2)
    assert max_rel(y, ref.ragged_fwd(x, w, GROUPS, pow2)) < ORACLE_TOL
    assert max_rel(dx, dx_ref) < ORACLE_TOL
    assert max_rel(dw, dw_ref) < ORACLE_TOL
    used = GROUPS.sum()
    assert not np.asarray(y)[used:].any() and not np.asarray(dx)[used:].any() and not np.asarray(dw)[1].any()
    exact = np.einsum("sk,skn->sn", x[:used], w[np.repeat(np.arange(len(GROUPS)), GROUPS)], dtype=np.float64)
    assert BAND[0] < rel_fro(np.asarray(y)[:used], exact) < BAND[1]
    # pre-quantised experts: same forward, input gradient only
    wq, sw = ref.quantize_blocks(w, pow2)
    yq, (dxq,) = vjp(
        lambda x: fp8_grouped.fp8_ragged_dot(x, jnp.asarray(wq), jnp.asarray(GROUPS), r, jnp.asarray(sw)), (x,), g
    )
    assert max_rel(yq, ref.ragged_fwd(x, None, GROUPS, pow2, w_q=(wq, sw))) < ORACLE_TOL
    assert max_rel(dxq, dx_ref) < ORACLE_TOL


@pytest.mark.parametrize("backend", ["blocked", "pallas"])
def test_experts_quantised_ahead_keep_the_weight_gradient(backend):
    """``fp8_experts`` (how the MoE layer hands float experts to the grouped GEMMs: E4M3 values, scales and a
    gradient sink) gives ``fp8_ragged_dot`` and the gated pair the float weight's outputs and gradients; the
    values are E4M3, the gradient reaches the weight in its own dtype through a sink of the recipe's
    ``wgrad_dtype``, and the sink's value is never read (NaNs in it change nothing)."""
    r = recipe(backend)
    x = jnp.asarray(activations(13, (300, 200)))
    w = jnp.asarray(activations(14, (len(GROUPS), 200, 136)) * 0.02)
    sizes = jnp.asarray(GROUPS)
    gmm = fp8_grouped.grouped_matmul(r)

    def ahead(x, w):
        return gmm(x, fp8_grouped.fp8_experts(w, r, x.dtype), sizes)

    grads = lambda f: jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(f(x, w))), (0, 1)))(x, w)
    assert_close(grads(ahead), grads(lambda x, w: fp8_grouped.fp8_ragged_dot(x, w, sizes, r)), tol=1e-6)
    experts = fp8_grouped.fp8_experts(w, r, jnp.bfloat16)
    assert experts.values.dtype == fp8.E4M3 and experts.scales.dtype == jnp.float32
    assert experts.grad.dtype == jnp.float32 and experts.grad.shape == w.shape  # DeepSeek's fp32 gradients
    assert fp8_grouped.fp8_experts(w, replace(r, wgrad_dtype="compute"), jnp.bfloat16).grad.dtype == jnp.bfloat16
    poisoned = experts._replace(grad=jnp.full_like(experts.grad, jnp.nan))
    np.testing.assert_array_equal(np.asarray(gmm(x, poisoned, sizes)), np.asarray(gmm(x, experts, sizes)))
    _, pullback = jax.vjp(lambda e: gmm(x, e, sizes), experts)
    ct = pullback(jnp.ones((300, 136)))[0]
    assert ct.grad.dtype == jnp.float32 and not np.asarray(ct.values, np.float32).any()
    assert np.asarray(ct.grad)[2].any()

    def pair(x, w_gate, w_up, ahead):
        quantised = (fp8_grouped.fp8_experts(w, r, x.dtype) for w in (w_gate, w_up)) if ahead else (w_gate, w_up)
        gate, up = gmm.pair(x, *quantised, sizes)
        return jnp.sum(jnp.tanh(gate) * up)

    w_up = w * 0.5 + 0.01
    loss = lambda ahead: jax.jit(jax.value_and_grad(pair, (0, 1, 2)), static_argnums=3)(x, w, w_up, ahead)
    assert_close(loss(True), loss(False), tol=1e-6)


@pytest.mark.parametrize("pow2", [False, True])
def test_weights_quantised_on_shards_narrower_than_a_block(pow2):
    """``fp8_weight`` pinned to a layout whose shards are narrower than a block along one axis (a V3
    projection over 64 chips: 112 columns a shard) takes each block's amax in two steps on the shards; the
    values and scales are ``quantize_blocks``' bit for bit, split along either axis (or both: unpinned), and the
    values keep the weight's layout."""
    from dsjax.sharding import use_mesh, weight_spec

    r = recipe(pow2=pow2)
    w = activations(70, (256, 512)) * 0.02
    w[5, 300] = 3.0  # one block's amax set by a single element
    mesh = make_mesh(data=2, expert=4)
    want = fp8.quantize_blocks(jnp.asarray(w), r)
    for axes in (("embed", None), (None, "embed"), ("embed", "embed2")):
        with use_mesh(mesh, (("embed", ("data", "expert")), ("embed2", "data"))):
            spec = weight_spec(axes, w.shape)  # 32 rows or 64 columns a shard
            got = jax.jit(lambda w, spec=spec: fp8.fp8_weight(w, r, jnp.float32, spec)[:2])(jnp.asarray(w))
        np.testing.assert_array_equal(q_bytes(got[0]), q_bytes(want[0]))
        np.testing.assert_array_equal(f32_bits(got[1]), f32_bits(want[1]))
        if axes != ("embed", "embed2"):
            assert got[0].sharding.is_equivalent_to(jax.NamedSharding(mesh, spec), 2), (axes, got[0].sharding)


def test_vmapped_fp8_gemms_keep_each_weights_gradient():
    """``blocked_matmul`` vmaps ``fp8_matmul`` over blocks of rows, each with its expert's float weight
    (gathered, so one expert serves several blocks): its values and gradients equal one GEMM per block. (A
    weight's gradient sink that did not depend on the weight was unbatched under vmap, and every block's
    gradient was handed to each of them: the expert weights' gradients came out 2x too large.)"""
    r = recipe()
    x = jnp.asarray(activations(80, (3, 16, 256)))
    w = jnp.asarray(activations(81, (2, 256, 128)) * 0.02)
    block_expert = jnp.array([0, 1, 1])
    bmm = fp8_grouped.blocked_matmul(r)

    def per_block(x, w):
        return jnp.stack([fp8.fp8_matmul(x[i], w[block_expert[i]], r) for i in range(3)])

    grads = lambda f: jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(f(x, w))), (0, 1))(x, w)
    assert_close(grads(lambda x, w: bmm(x, w, block_expert)), grads(per_block))


@pytest.mark.parametrize("backend", ["blocked", "pallas"])
def test_weight_gradients_in_the_compute_dtype(backend):
    """``wgrad_dtype="compute"``: the GEMMs give weight gradients in the compute dtype (bf16 here), the dense
    and the grouped ones (and the experts quantised ahead), each the fp32 gradient rounded once; the master
    weights' gradients stay in their dtype and the inputs' gradients are unchanged."""
    fp32, bf16 = recipe(backend), replace(recipe(backend), wgrad_dtype="compute")
    x = jnp.asarray(activations(13, (300, 200))).astype(jnp.bfloat16)
    w = jnp.asarray(activations(14, (200, 136)) * 0.02)
    ws = jnp.asarray(activations(15, (len(GROUPS), 200, 136)) * 0.02)
    sizes = jnp.asarray(GROUPS)
    g = jnp.asarray(np.random.default_rng(16).standard_normal((300, 136)), jnp.bfloat16)
    ops = {
        "dense": lambda r, x, w: fp8.fp8_matmul(x, w, r),
        "grouped": lambda r, x, w: fp8_grouped.fp8_ragged_dot(x, w, sizes, r),
        "ahead": lambda r, x, w: fp8_grouped.grouped_matmul(r)(x, fp8_grouped.fp8_experts(w, r, x.dtype), sizes),
    }
    for name, op in ops.items():
        weight = w if name == "dense" else ws
        (dx32, dw32), (dx16, dw16) = (jax.vjp(functools.partial(op, r), x, weight)[1](g) for r in (fp32, bf16))
        assert dw16.dtype == dw32.dtype == jnp.float32, name
        np.testing.assert_array_equal(np.asarray(dx16), np.asarray(dx32))
        np.testing.assert_array_equal(np.asarray(dw16), np.asarray(dw32.astype(jnp.bfloat16).astype(jnp.float32)))
        assert not np.array_equal(np.asarray(dw16), np.asarray(dw32)), name  # the rounding is there
    with pytest.raises(ConfigError, match="wgrad_dtype"):
        Fp8Recipe(wgrad_dtype="bfloat16")


@pytest.mark.parametrize(
    ("rows", "groups"),
    [
        (300, [0, 0, 300, 0]),  # one expert takes every row
        (300, [128, 128, 0, 44]),  # groups on tile edges, an empty one inside
        (256, [256, 0, 0, 0]),  # every row used, empty experts at the end
        (700, [3, 0, 200, 1, 130, 0, 300]),  # 512-row visits (4 token tiles each), many experts in one tile
    ],
)
def test_pallas_grouped_kernels_match_the_oracle(rows, groups):
    """The grouped kernels (forward with fp8 ``a``, input gradient with ``g`` quantised in the kernel and
    ``w^T`` read in place, weight gradient re-tiled in the kernel) against the NumPy oracle, on schedules
    with empty experts, experts sharing a row tile, and rows past the last group (zeros)."""
    groups = np.array(groups)
    k, n = 200, 136
    x = activations(50, (rows, k))
    x[[2, 130, 250]] *= 30
    w = activations(51, (len(groups), k, n)) * 0.02
    g = np.random.default_rng(52).standard_normal((rows, n)).astype(np.float32)
    xq, sx = ref.quantize_rows(x)
    wq, sw = ref.quantize_blocks(w)
    dx_ref, dw_ref = ref.ragged_grads(x, w, groups, g)
    tiles = fp8_pallas.TileRecipe(amax_floor=1e-4, pow2=False)
    g_tiles = fp8_pallas.TileRecipe(amax_floor=1e-30, pow2=False)
    sizes = jnp.asarray(groups)
    y = fp8_grouped_pallas.grouped_matmul(
        jnp.asarray(xq), jnp.asarray(sx), jnp.asarray(wq), jnp.asarray(ref.block_scales_per_column(sw, n)), sizes
    )
    sw_t = ref.block_scales_per_column(sw.transpose(0, 2, 1), k)
    dx = fp8_grouped_pallas.grouped_matmul(
        jnp.asarray(g), None, jnp.asarray(wq), jnp.asarray(sw_t), sizes, tiles=g_tiles, transpose_b=True
    )
    dw = fp8_grouped_pallas.grouped_weight_grad(
        jnp.asarray(xq), jnp.asarray(sx), jnp.asarray(g), sizes, x_tiles=tiles, g_tiles=g_tiles
    )
    assert max_rel(y, ref.ragged_fwd(x, w, groups)) < GEMM_TOL["pallas"]
    assert max_rel(dx, dx_ref) < GEMM_TOL["pallas"]
    assert max_rel(dw, dw_ref) < GEMM_TOL["pallas"]
    assert not np.asarray(y)[groups.sum() :].any() and not np.asarray(dx)[groups.sum() :].any()
    assert not np.asarray(dw)[groups == 0].any()


def test_pallas_grouped_sum_of_products_in_one_pass():
    """``grouped_matmul_sum``: two grouped products with contractions of different sizes (200, 300: padded to
    256 and 384, one kernel's steps running through both) summed in the kernel equal the oracle's sum; so does
    the gated pair (``GroupedMatmul.pair``: x quantised once, one input-gradient pass) against two GEMMs."""
    groups = np.array([40, 0, 150, 70])
    sizes = jnp.asarray(groups)
    g_tiles = fp8_pallas.TileRecipe(amax_floor=1e-30, pow2=False)
    terms, want = [], 0.0
    for seed, k in ((60, 200), (62, 300)):
        g = activations(seed, (300, k))
        wq, sw = ref.quantize_blocks(activations(seed + 1, (len(groups), 136, k)) * 0.02)  # w [E, N, K]: b = w^T
        term = np.zeros((300, 136))
        for e, rows in enumerate(ref._groups(groups)):
            term[rows] = ref.dgrad(g[rows], wq[e], sw[e])
        want = want + term
        cols = ref.block_scales_per_column(sw.transpose(0, 2, 1), 136)
        terms.append((jnp.asarray(g), None, jnp.asarray(wq), jnp.asarray(cols)))
    got = fp8_grouped_pallas.grouped_matmul_sum(terms, sizes, tiles=g_tiles, transpose_b=True)
    assert max_rel(got, want) < GEMM_TOL["pallas"]
    # the pair against two separate GEMMs (values, input and weight gradients)
    x = jnp.asarray(activations(13, (300, 200)))
    w_gate, w_up = (jnp.asarray(activations(s, (len(groups), 200, 136)) * 0.02) for s in (64, 65))
    gmm = fp8_grouped.grouped_matmul(recipe("pallas"))

    def loss(pair):
        def f(x, w_gate, w_up):
            gate, up = gmm.pair(x, w_gate, w_up, sizes) if pair else (gmm(x, w_gate, sizes), gmm(x, w_up, sizes))
            return jnp.sum(jnp.tanh(gate) * up)

        return jax.jit(jax.value_and_grad(f, (0, 1, 2)))(x, w_gate, w_up)

    assert_close(loss(True), loss(False), tol=1e-6)


def test_grouped_kernels_run_where_the_rows_are_the_devices_own():
    """Unpartitioned (or inside expert parallelism's shard_map) the grouped GEMMs are the kernels; under a mesh
    whose axes are still free they are ``blocked`` (a grouped kernel cannot split the batch's groups by rows),
    with the same tiles, so the same values."""
    x = jnp.asarray(activations(13, (300, 200)))
    w = jnp.asarray(activations(14, (len(GROUPS), 200, 136)) * 0.02)

    def run(backend):
        loss = lambda x, w: jnp.sum(jnp.tanh(fp8_grouped.fp8_ragged_dot(x, w, jnp.asarray(GROUPS), recipe(backend))))
        fn = jax.value_and_grad(loss, (0, 1))
        return fn(x, w), str(jax.make_jaxpr(fn)(x, w))

    (kernels, text), (blocked, _) = run("pallas"), run("blocked")
    assert "dsjax_fp8_grouped_matmul" in text and "dsjax_fp8_grouped_weight_grad" in text
    assert_close(kernels, blocked, tol=1e-5)
    with jax.set_mesh(make_mesh(2, 4)):
        sharded, text = run("pallas")
    assert "dsjax_fp8_grouped" not in text and "dsjax_fp8_quantize" not in text
    assert_close(sharded, blocked, tol=1e-5)


@pytest.mark.parametrize("groups", [GROUPS, np.array([0, 0, 300, 0]), np.array([128, 128, 0, 44])])
def test_fp8_ragged_dot_row_chunks_are_bitwise_equal(monkeypatch, groups):
    """Large grouped GEMMs quantise and multiply a chunk of rows at a time and quantise the experts one at a
    time (to bound their fp32 temporaries); the values are those of the whole batch at once, bit for bit,
    with chunk edges inside groups and a padded last chunk."""
    x = jnp.asarray(activations(13, (300, 200)))
    w = jnp.asarray(activations(14, (len(groups), 200, 136)) * 0.02)
    g = jnp.asarray(np.random.default_rng(15).standard_normal((300, 136)).astype(np.float32))
    r, sizes = recipe(), jnp.asarray(groups)

    def run(x, w):  # traced anew for each call below (the chunk size is read at trace time)
        y, pullback = jax.vjp(lambda x, w: fp8_grouped.fp8_ragged_dot(x, w, sizes, r), x, w)
        return (y, *pullback(g))

    whole = jax.jit(run)(x, w)
    monkeypatch.setattr(fp8_grouped, "_ROW_CHUNK_BYTES", 4 * 136 * 128)  # 128-row chunks: 3 of them, 84 rows padded
    assert fp8_grouped._row_chunk(300, 200, 128) == 128 and 4 * w.size > fp8_grouped._ROW_CHUNK_BYTES
    chunked = jax.jit(lambda x, w: run(x, w))(x, w)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _slot_rows(a, index):
    """A row movement for the tests: each of 130 tokens' two slots in ``perm``'s order, then 40 empty rows."""
    (perm,) = index
    return jnp.concatenate([a[perm % a.shape[0]], jnp.zeros((40, *a.shape[1:]), a.dtype)])


@pytest.mark.parametrize("backend", ["blocked", "pallas"])
def test_rows_quantised_before_their_move_equal_the_moved_rows_quantised(monkeypatch, backend):
    """``quantized_dispatch``: tokens quantised, their E4M3 bytes and scales moved (``fp8_rows.dispatch``: each
    token twice, in expert order, then empty rows past the groups), into the SwiGLU pair and the down
    projection. Values and the gradients of the tokens and all three expert weights are bit for bit those of
    moving the float tokens and quantising the moved rows, with ``blocked``'s row chunks (128 rows, edges inside
    groups) and through the TPU kernels (interpreted)."""
    monkeypatch.setattr(fp8_grouped, "_ROW_CHUNK_BYTES", 4 * 200 * 128)  # 128-row chunks of the 300 rows
    x = jnp.asarray(activations(90, (130, 200)))
    x = x.at[7].set(0.0)  # a zero token: its tiles' scales come from the floor
    w_gate, w_up = (jnp.asarray(activations(s, (4, 200, 136)) * 0.02) for s in (91, 92))
    w_down = jnp.asarray(activations(93, (4, 136, 200)) * 0.02)
    perm = jnp.asarray(np.random.default_rng(94).permutation(260))
    sizes = jnp.asarray([60, 0, 120, 80])
    kinds = []

    def run(quantized):
        gmm = fp8_grouped.grouped_matmul(replace(recipe(backend), quantized_dispatch=quantized))

        def f(x, w_gate, w_up, w_down):
            rows = gmm.dispatch(x, _slot_rows, (perm,))
            kinds.append(type(rows).__name__)
            gate, up = gmm.pair(rows, w_gate, w_up, sizes)
            return jnp.sum(gmm(jnp.tanh(gate) * up, w_down, sizes) ** 2)

        return jax.jit(jax.value_and_grad(f, (0, 1, 2, 3)))(x, w_gate, w_up, w_down)

    got, want = run(True), run(False)
    assert kinds[0] == "Fp8Rows" and kinds[1] != "Fp8Rows"  # E4M3 moved, then the float rows
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- 5. transformations ----------------------------------------------------------------------------------------


def assert_close(a, b, tol=1e-5):
    """Trees equal to ``tol`` of each array's largest entry (jit fuses and re-associates fp32 arithmetic)."""
    chex.assert_trees_all_equal_structs(a, b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert max_rel(u, v) < tol


def test_fp8_matmul_under_transforms():
    r = recipe()
    x, w = jnp.asarray(activations(16, (4, 40, 256))), jnp.asarray(activations(17, (256, 256)) * 0.05)
    ws = jnp.asarray(activations(18, (3, 256, 256)) * 0.05)
    matmul = jax.jit(fp8.fp8_matmul, static_argnums=2)
    assert_close(matmul(x, w, r), fp8.fp8_matmul(x, w, r))  # jit vs eager
    loss = lambda x, w: jnp.sum(jnp.tanh(fp8.fp8_matmul(x, w, r)))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    grads = grad(x, w)
    chex.assert_tree_all_finite(grads)
    assert_close(jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(x, w), grads)
    # per-example gradients (wgrad tiles along each example's tokens): vmap equals a loop
    per_example = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None)))(x, w)
    assert_close(per_example, jax.tree.map(lambda *a: jnp.stack(a), *[grad(xi, w) for xi in x]))
    assert_close(jax.vmap(lambda wi: fp8.fp8_matmul(x, wi, r))(ws), jnp.stack([matmul(x, wi, r) for wi in ws]))

    def stack_loss(x, ws):  # a scanned stack of layers vs the same layers unrolled
        h, _ = jax.lax.scan(lambda h, wl: (jnp.tanh(fp8.fp8_matmul(h, wl, r)), None), x, ws)
        return jnp.sum(h**2)

    def unrolled_loss(x, ws):
        for wl in ws:
            x = jnp.tanh(fp8.fp8_matmul(x, wl, r))
        return jnp.sum(x**2)

    scanned = jax.jit(jax.value_and_grad(stack_loss, (0, 1)))(x, ws)
    assert_close(scanned, jax.jit(jax.value_and_grad(unrolled_loss, (0, 1)))(x, ws))


# ---- 6. pow2 re-tiling -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pow2", [True, False])
def test_pow2_retiling_lossless(pow2):
    """1x128 tiles dequantised and re-quantised as 128x1 (the wgrad path) reproduce every value exactly with
    pow2 scales: q1 * s1 / s2 is an E4M3 value times a power of two, at most 448. Masked: elements below
    E4M3's smallest normal (2^-6) in the new tile's scale, where shifting loses mantissa bits (subnormals) or
    flushes to zero. With fp32 scales most elements change, which shows the check can fail."""
    x = activations(19, (256, 384))
    x[7] *= 40  # an outlier token: its 128x1 tiles have much larger scales than its 1x128 ones
    r = recipe(pow2=pow2)
    xd = np.asarray(fp8.dequantize_rows(*fp8.quantize_rows(jnp.asarray(x), r), 128))
    q2, s2 = fp8.quantize_rows(jnp.asarray(xd.T), r)
    xd2 = np.asarray(fp8.dequantize_rows(q2, s2, 128)).T
    s2_full = np.repeat(np.asarray(s2), 128, axis=1)[:, : x.shape[0]].T
    kept = np.abs(xd) >= 2.0**-6 * s2_full
    changed = f32_bits(xd2) != f32_bits(xd)
    assert 0.5 < kept.mean() < 1.0  # the mask removes something, and not much
    if pow2:
        assert not changed[kept].any()
    else:
        assert changed[kept].mean() > 0.3
