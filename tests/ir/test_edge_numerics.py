"""Edge numerics of compiled kernels (issue 12's last compiled conformance failures) and the vectorized scan and
scatter kernels: each op compiled alone for a pinned x86 target and compared with NumPy, bit for bit where the
ONNX reference is exact (Mod's signed zeros and infinities, quantize's rounding)."""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from kiln.codegen.target import resolve_target
from kiln.ir.ops import conv as cv
from kiln.ir.ops import elementwise as ew
from kiln.ir.ops import transform as tf
from tests.groups import lower, op_group, run_lowered

TARGET = resolve_target("x86-avx2")  # runs here
AVX512 = resolve_target("x86-avx512")  # compiled only, for its assembly
rng = np.random.default_rng(0)


def compiled(op, args, attrs=None, target=TARGET):
    return run_lowered(lower(op_group(op, args, attrs), target), target, args)


def assembly(op, args, attrs=None) -> str:
    g = lower(op_group(op, args, attrs), AVX512)
    return tvm.compile(tvm.IRModule({"main": g.prim_func}), target=AVX512).mod.inspect_source("asm")


# --- Mod: NumPy's np.fmod (fmod=1) and np.mod (fmod=0) on zeros, infinities and NaN ------------------------------

EDGE_X = [0.0, -0.0, 0.0, -0.0, -3.0, 3.0, -1.0, 1.0, np.inf, -np.inf, 1.0, 1.0, np.nan, 1.0, 5.5, -5.5, 7.0]
EDGE_Y = [-2.0, 2.0, 2.0, -2.0, np.inf, np.inf, -np.inf, -np.inf, 2.0, 2.0, 0.0, -0.0, 2.0, np.nan, -2.0, 2.0, -7.0]


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("name,fn", [("floor_mod", np.mod), ("trunc_mod", np.fmod)])
def test_float_mod_edges(dtype, name, fn):
    x, y = np.array(EDGE_X, dtype), np.array(EDGE_Y, dtype)
    with np.errstate(all="ignore"):
        want = fn(x, y)
    got = compiled(ew.OPS[name], [x, y])
    np.testing.assert_array_equal(got, want)  # NaN where NaN; -3 mod inf is inf (topi's formula gave NaN)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # 0 mod -2 is -0


def test_float_mod_large_quotient_is_exact():
    x = np.array([1e30, -1e30, 3e38, 16777217.0], np.float32)
    y = np.array([3.0, 7.0, 1.1, 0.3], np.float32)
    np.testing.assert_array_equal(compiled(ew.OPS["floor_mod"], [x, y]), np.mod(x, y))
    np.testing.assert_array_equal(compiled(ew.OPS["trunc_mod"], [x, y]), np.fmod(x, y))


# --- mish, softplus, tanh: float32 within a few ulp everywhere (log(1 + small) and 1 - e^-2x cancelled) ----------

def _relative_error(op, x, exact):
    got = compiled(ew.OPS[op], [x]).astype(np.float64)
    big = np.abs(exact) > 1e-30
    return np.max(np.abs(got[big] - exact[big]) / np.abs(exact[big]))


X = np.concatenate([np.linspace(-30, 30, 20001), np.geomspace(1e-7, 1, 500), -np.geomspace(1e-7, 1, 500)])
X = X.astype(np.float32)
X64 = X.astype(np.float64)


@pytest.mark.parametrize("op,exact", [
    ("nn.mish", X64 * np.tanh(np.log1p(np.exp(X64)))),  # at -16.6 it was off by 98%; at -9.98, 0.1% (ONNX's test)
    ("softplus", np.log1p(np.exp(X64))),  # at -13.8: 6%
    ("tanh", np.tanh(X64)),  # at 1.2e-6: 1%
])
def test_float32_activation_accuracy(op, exact):
    assert _relative_error(op, X, exact) < 1e-6  # a few float32 ulp


def test_float32_activation_specials():
    x = np.array([np.inf, -np.inf, np.nan, -0.0, 0.0, 100.0, -200.0, 20.5], np.float32)
    np.testing.assert_array_equal(compiled(ew.OPS["tanh"], [x]), np.tanh(x))  # ±1 exactly, NaN, signed zeros
    with np.errstate(all="ignore"):
        mish = x * np.tanh(np.log1p(np.exp(x)))
    got = compiled(ew.OPS["nn.mish"], [x])
    np.testing.assert_array_equal(got, mish)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(mish))


# --- quantize: x / scale in x's dtype, as ONNX's reference and ONNX Runtime divide ------------------------------

def test_quantize_divides_in_float32():
    x = np.array([0.0, 2.0, -3.0, -2.5, 1.34, 0.5], np.float32)  # DynamicQuantizeLinear's test
    scale, zero = np.array([np.float32(5) / np.float32(255)], np.float32), np.array([153], np.uint8)
    a = ew.QuantAttrs(axis=1, out_dtype="uint8")
    want = np.array([153, 255, 0, 26, 221, 179], np.uint8)  # 0.5 / scale is 25.5 in float32: 26 (half to even)
    np.testing.assert_array_equal(ew.QUANTIZE.reference(x, scale, zero, a), want)
    np.testing.assert_array_equal(compiled(ew.QUANTIZE, [x, scale, zero], a), want)


# --- conv1d of float16 sums in float32 ------------------------------------------------------------------------

def test_conv1d_float16_accumulates_in_float32():
    k = 2048
    x = np.ones((1, 1, k), np.float16)
    w = np.full((1, 1, k), 0.0004, np.float16)  # a float16 running sum stalls near 0.5 (its ulp passes 0.0004)
    a = cv.ConvAttrs(strides=(1,), padding=(0, 0), dilation=(1,))
    want = np.float16(np.float32(w[0, 0, 0]) * k)
    got = compiled(cv.CONV1D, [x, w], a)
    assert got.dtype == np.float16 and got[0, 0, 0] == want, (got, want)
    assert cv.CONV1D.reference(x, w, a)[0, 0, 0] == want


# --- scans and scatters: contiguous loops vectorized (x86.scan_scatter) ----------------------------------------

def _vector_ops(asm: str, mnemonic: str) -> int:
    return len(re.findall(rf"\b{mnemonic}\s[^\n]*zmm", asm))


def test_cumsum_vectorized_across_the_inner_axis():
    x = rng.standard_normal((4, 33, 64)).astype(np.float32)
    g = lower(op_group(tf.CUMSUM, [x], tf.CumsumAttrs(1)), AVX512)
    assert g.template.startswith("x86.scan_scatter") and "vectorized(2 of 2, 16)" in g.schedule, g.schedule
    assert _vector_ops(assembly(tf.CUMSUM, [x], tf.CumsumAttrs(1)), "vaddps") > 0


def test_scatter_copy_vectorized():
    x = rng.standard_normal((8, 40, 64)).astype(np.float32)
    i = np.array([[1], [5]], np.int64)
    u = rng.standard_normal((2, 40, 64)).astype(np.float32)
    a = tf.ScatterAttrs(0, "add")
    asm = assembly(tf.SCATTER_ND, [x, i, u], a)
    assert _vector_ops(asm, "vmovups") > 0 and _vector_ops(asm, "vaddps") > 0  # the copy and the added rows


@pytest.mark.parametrize("shape,axis", [((300, 192), 0), ((300, 200), 0), ((5, 300, 3), 1), ((7, 1), 0)])
@pytest.mark.parametrize("exclusive,reverse", [(False, False), (True, True)])
def test_scan_loop_nests(shape, axis, exclusive, reverse):
    """The column chunks of a scan along the first axis, a split with a tail, a tiny inner axis."""
    x = rng.standard_normal(shape).astype(np.float32)
    a = tf.CumsumAttrs(axis, exclusive, reverse)
    np.testing.assert_allclose(compiled(tf.CUMSUM, [x], a), tf.CUMSUM.reference(x, a), rtol=1e-4, atol=1e-4)


def test_scatter_nd_long_rows_with_duplicates():
    """Rows of 4096+ elements run in parallel chunks plus a tail; duplicate rows still reduce in order."""
    x = rng.standard_normal((4, 3, 1500)).astype(np.float32)  # a row of 4500: 17 chunks of 256 and 148 more
    i = np.array([[1], [3], [1]], np.int64)
    u = rng.standard_normal((3, 3, 1500)).astype(np.float32)
    for reduction in ("none", "add", "max"):
        a = tf.ScatterAttrs(0, reduction)
        np.testing.assert_allclose(compiled(tf.SCATTER_ND, [x, i, u], a), tf.SCATTER_ND.reference(x, i, u, a),
                                   rtol=1e-6)


def test_scan_scatter_knob_space():
    """Every config of the template builds and matches the reference: scalar, one vector, two vectors."""
    from kiln.schedules.x86 import scan_scatter

    x = rng.standard_normal((5, 37, 20)).astype(np.float32)
    a = tf.CumsumAttrs(1, exclusive=True)
    fn = op_group(tf.CUMPROD, [x], a)
    key = lower(fn, TARGET).workload
    for cfg in ({"vector": 1}, {"vector": 8}, {"vector": 16}):
        g = lower(fn, TARGET, {key: cfg})
        assert g.config_source == "given" and g.template == f"{scan_scatter.NAME}@{scan_scatter.VERSION}"
        np.testing.assert_allclose(run_lowered(g, TARGET, [x]), tf.CUMPROD.reference(x, a), rtol=1e-5)


@pytest.mark.parametrize("kind", ["max", "min"])
def test_bool_max_and_min_of_nothing_are_any_and_all(kind):
    """ONNX: ReduceMax of an empty bool set is False (any), ReduceMin True (all); both used to give True."""
    from kiln.ir.ops import reduce as rd

    x = np.empty((2, 0, 4), np.bool_)
    op = rd.MAX if kind == "max" else rd.MIN
    attrs = rd.ReduceAttrs(axes=(1,), keepdims=True)
    want = np.full((2, 1, 4), kind == "min")
    np.testing.assert_array_equal(op.reference(x, attrs), want)
    np.testing.assert_array_equal(compiled(op, [x], attrs), want)
    some = np.array([[[True, False]], [[False, False]]])
    np.testing.assert_array_equal(compiled(op, [some], rd.ReduceAttrs(axes=(2,), keepdims=False)),
                                  some.any(axis=2) if kind == "max" else some.all(axis=2))


@pytest.mark.parametrize("keepdims", [True, False])
def test_log_sum_exp_of_nothing_is_minus_inf_in_the_reduced_shape(keepdims):
    """ONNX's test_reduce_log_sum_exp_empty_set: the reference once returned the input's empty shape."""
    from kiln.ir.ops import reduce as rd

    x = np.empty((2, 0, 4), np.float32)
    attrs = rd.ReduceAttrs(axes=(1,), keepdims=keepdims)
    want = np.full((2, 1, 4) if keepdims else (2, 4), -np.inf, np.float32)
    with np.errstate(divide="ignore"):
        np.testing.assert_array_equal(rd.REDUCE_OPS["log_sum_exp"].reference(x, attrs), want)
    np.testing.assert_array_equal(compiled(rd.REDUCE_OPS["log_sum_exp"], [x], attrs), want)


# --- Power by a constant 2 or 3: multiplies, not a libm call per element ----------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("exponent", [2.0, 3.0])
def test_power_by_small_integer_constant(dtype, exponent):
    from kiln.ir import Call, Constant
    from tests.groups import group, params

    edges = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 3e38, -3e38, 1e-30, -2.5, 7.0]
    x = np.concatenate([np.array(edges, dtype), rng.standard_normal(50).astype(dtype) * 10])
    ps = params(x)
    fn = group(ps, Call(ew.POWER, (ps[0], Constant(np.array(exponent, dtype)))))
    g = lower(fn, TARGET)
    with np.errstate(all="ignore"):
        want = np.power(x, np.array(exponent, dtype))
    got = run_lowered(g, TARGET, [x])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # (-0)^3 is -0, (-0)^2 is +0
    np.testing.assert_allclose(got, want, rtol=4 * np.finfo(dtype).eps, atol=0)  # x*x*x rounds twice
    asm = tvm.compile(tvm.IRModule({"main": lower(fn, AVX512).prim_func}), target=AVX512).mod.inspect_source("asm")
    assert not re.search(r"call\w*\s+\S*pow", asm)  # powf was one scalar call per element


# --- LRN: beta 0.75 as square roots, the window written out; infinities stay in their window ------------------

@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("size, beta", [(5, 0.75), (4, 0.75), (1, 0.5), (3, 1.0), (5, 0.6), (17, 0.75)])
def test_lrn_matches_the_reference(dtype, size, beta):
    from kiln.ir.ops.norm import LRN, LRNAttrs

    x = (rng.standard_normal((2, 19, 5, 6)) * 3).astype(dtype)
    x[0, 0, 0, :4] = [np.inf, -np.inf, np.nan, 0]
    attrs = LRNAttrs(size, 1e-3, beta, 2.0 if beta == 0.6 else 1.0)
    got = compiled(LRN, [x], attrs)
    with np.errstate(all="ignore"):
        want = LRN.evaluate([x], attrs)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isfinite(want[0, size:, 0, :3]).all()  # channels whose window misses the inf (a running sum's
    # difference had made them NaN in the reference)
    ok = ~np.isnan(want)
    tol = 1e-3 if dtype == "float16" else 4 * np.finfo(dtype).eps
    np.testing.assert_allclose(got[ok], want[ok], rtol=tol, atol=0)


def test_lrn_calls_no_pow():
    from kiln.ir.ops.norm import LRN, LRNAttrs

    asm = assembly(LRN, [np.zeros((1, 8, 5, 5), np.float32)], LRNAttrs(5, 1e-4, 0.75, 1.0))
    assert not re.search(r"call\w*\s+\S*pow", asm)  # powf was a scalar libm call per element


# --- sigmoid: float32 through the vectorized exp --------------------------------------------------------------

def test_sigmoid_float32_within_two_ulp_and_no_expf():
    x = np.concatenate([np.array([0, -0.0, np.inf, -np.inf, np.nan, 100, -100, 88.7, -88.7, 87, -87, 1e-8, -1e-8,
                                  20, -20, 17, -17], np.float32),
                        (rng.standard_normal(2000) * 10).astype(np.float32)])
    got = compiled(ew.SIGMOID, [x])
    with np.errstate(all="ignore"):
        want = 1 / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    # below -88.7 float32's e^-x overflows (in libm's expf too): 0 where the exact value is a denormal
    np.testing.assert_allclose(got[ok], want[ok], rtol=2 * np.finfo(np.float32).eps, atol=np.finfo(np.float32).tiny)
    assert not re.search(r"call\w*\s+\S*exp", assembly(ew.SIGMOID, [x]))  # was a scalar expf call per element


# --- Exp: vectorized, denormal results kept ---------------------------------------------------------------------

def test_exp_float32_keeps_denormals_and_calls_no_expf():
    x = np.concatenate([np.array([0, -0.0, np.inf, -np.inf, np.nan, 88.72, 88.73, -87.3, -87.4, -100, -103.9,
                                  -103.98, -104, -150], np.float32),
                        np.linspace(-110, 90, 20001, dtype=np.float32)])
    got = compiled(ew.EXP, [x])
    with np.errstate(all="ignore"):
        want = np.exp(x.astype(np.float64))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    normal = np.isfinite(want) & (want >= np.finfo(np.float32).tiny) & (want < np.finfo(np.float32).max)
    ulps = np.abs(got[normal] - want[normal]) / np.spacing(want[normal].astype(np.float32))
    assert ulps.max() <= 5  # 2 below 88.38; up to 5 above, where n stays 127 and r grows (float_math.exp)
    tiny = want < np.finfo(np.float32).tiny
    assert np.abs(got[tiny] - want[tiny]).max() <= 2 * 2.0 ** -149  # rounded into the denormals, not flushed
    assert (got[(x > -103) & (x < -87.4)] > 0).all()
    assert np.isposinf(got[x > 88.73]).all()
    assert not re.search(r"call\w*\s+\S*exp", assembly(ew.EXP, [x]))  # was a scalar expf call per element
