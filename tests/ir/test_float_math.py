"""The vectorizable float32 exp and erf against math.exp / math.erf in float64: a few ulp everywhere, exact
zeros and saturation at the ends, and no scalar libm call left in the vectorized loop."""

import math
import re

import numpy as np
import pytest
from kiln.codegen.target import resolve_target
from kiln.ir.ops import float_math

ULP = 2.0**-23  # float32's relative spacing at 1


def evaluate(fn, x: np.ndarray, asm_target: str | None = None):
    """fn over x, run on this machine; and the assembly for `asm_target` (this machine's when None): a test of
    which instructions an AVX-512 build uses must not depend on the host it runs on."""
    import tvm
    from tvm import s_tir, te

    X = te.placeholder(x.shape, name="x")
    Y = te.compute(x.shape, lambda i: fn(X[i]), name="y")
    sch = s_tir.Schedule(te.create_prim_func([X, Y]))
    (loop,) = sch.get_loops(sch.get_sblock("y"))
    _, inner = sch.split(loop, factors=[None, 16])
    sch.vectorize(inner)
    ex = tvm.compile(sch.mod, target=resolve_target(None))
    out = tvm.runtime.empty(x.shape, "float32")
    ex(tvm.runtime.tensor(x), out)
    asm = ex if asm_target is None else tvm.compile(sch.mod, target=resolve_target(asm_target))
    return out.numpy(), asm.mod.inspect_source("asm")


def test_exp_is_within_two_ulp_and_vectorized():
    x = np.concatenate([np.linspace(-87.3, 88.0, 400_000), [0.0, -1e-8, 1e-8]]).astype(np.float32)
    got, asm = evaluate(float_math.exp, x)
    want = np.exp(x.astype(np.float64))
    assert (np.abs(got - want) / want).max() < 2 * ULP
    assert not re.search(r"call\w*\s+\*?\w*exp", asm)


def test_exp_underflows_to_zero_as_softmax_needs():
    x = np.array([-88.0, -100.0, -1e4, -np.inf] * 4, np.float32)
    got, _ = evaluate(float_math.exp, x)
    assert (got == 0).all()


def test_erf_is_within_a_few_ulp_and_vectorized():
    x = np.linspace(-6.0, 6.0, 400_001).astype(np.float32)
    got, asm = evaluate(float_math.erf, x)
    want = np.vectorize(math.erf)(x.astype(np.float64))
    assert np.abs(got - want).max() < 8 * ULP
    assert (got[x >= 4.0] == 1.0).all() and (got[x <= -4.0] == -1.0).all()
    assert not re.search(r"call\w*\s+\*?\w*erf", asm)


@pytest.mark.parametrize("fn", [float_math.exp, float_math.erf])
def test_other_dtypes_keep_tvm_functions(fn):
    from tvm import te

    x = te.placeholder((4,), "float64", name="x")
    assert str(fn(x[0])) == str((te.exp if fn is float_math.exp else te.erf)(x[0]))


def test_exp_is_accurate_up_to_float32_overflow_and_inf_beyond():
    x = np.linspace(88.0, 88.7228, 20_000).astype(np.float32)
    got, _ = evaluate(float_math.exp, x)
    want = np.exp(x.astype(np.float64))
    assert np.isfinite(got).all() and (np.abs(got - want) / want).max() < 8 * ULP
    big = np.array([88.7229, 89.0, 1e4, 1e38, np.inf] * 4, np.float32)
    assert (evaluate(float_math.exp, big)[0] == np.inf).all()


@pytest.mark.parametrize("fn", [float_math.exp, float_math.erf])
def test_nan_stays_nan(fn):
    x = np.array([np.nan, 1.0, -np.nan, 0.0] * 4, np.float32)
    got, _ = evaluate(fn, x)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(x))


SPECIALS = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 0.5, -0.5, 7.0, -7.0, 3e38, -3e38, 1.0, -1.0, 6.0, 1e-40,
                     np.nan], np.float32)


@pytest.mark.parametrize("name, fn, want", [
    ("relu", float_math.relu, lambda x: np.maximum(x, 0)),
    ("clamp", lambda v: float_math.clamp(v, -1.0, 6.0), lambda x: np.clip(x, -1, 6)),
    ("at_most", lambda v: float_math.at_most(v, 1.0), lambda x: np.minimum(x, 1)),
])
def test_bounds_keep_nan_and_cost_one_instruction_per_bound(name, fn, want):
    """On AVX-512 (as measured; an AVX2 build of relu uses a compare, vcmpnltps, and stays NaN-correct)."""
    got, asm = evaluate(fn, SPECIALS, asm_target="x86-avx512")
    np.testing.assert_array_equal(got, want(SPECIALS), err_msg=name)  # NaN == NaN for assert_array_equal
    assert not re.search(r"vcmp\w*ps|vblendv", asm), f"{name}: a compare or blend where a max/min would do"


@pytest.mark.parametrize("fn, want", [(float_math.maximum, np.maximum), (float_math.minimum, np.minimum)])
def test_maximum_minimum_propagate_nan_from_either_side(fn, want):
    import tvm
    from tvm import te

    a, b = np.repeat(SPECIALS, 16), np.tile(SPECIALS, 16)
    A, B = te.placeholder(a.shape, name="a"), te.placeholder(b.shape, name="b")
    C = te.compute(a.shape, lambda i: fn(A[i], B[i]), name="c")
    ex = tvm.compile(tvm.IRModule({"main": te.create_prim_func([A, B, C])}), target=resolve_target(None))
    out = tvm.runtime.empty(a.shape, "float32")
    ex(tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
    np.testing.assert_array_equal(out.numpy(), want(a, b), err_msg=fn.__name__)


@pytest.mark.parametrize("where", [0, 7, 15])
@pytest.mark.parametrize("fn, want", [(float_math.reduce_max, np.max), (float_math.reduce_min, np.min)])
def test_reductions_are_nan_when_any_element_is(fn, want, where):
    import tvm
    from tvm import te

    x = np.tile(np.array([1.0, -2.0, 3.0, np.inf, -np.inf, 0.5, 2.0, -1.0] * 2, np.float32), (4, 1))
    x[1, where] = np.nan
    x[2, :] = np.nan
    x[3, :] = -np.inf if fn is float_math.reduce_max else np.inf
    X = te.placeholder(x.shape, name="x")
    k = te.reduce_axis((0, x.shape[1]), name="k")
    Y = te.compute((x.shape[0],), lambda i: fn(X[i, k], axis=k), name="y")
    ex = tvm.compile(tvm.IRModule({"main": te.create_prim_func([X, Y])}), target=resolve_target(None))
    out = tvm.runtime.empty((x.shape[0],), "float32")
    ex(tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), want(x, axis=1), err_msg=f"{fn.__name__}, NaN at {where}")


@pytest.mark.parametrize("llvm", [True, False])
def test_round_half_even_ties_and_vector_code(llvm):
    """Ties go to even on both paths; on LLVM targets the int32 → float → round loop (a requantization) stays
    one vector loop: no gathers of the int32 input and no byte-by-byte stores, which tir.nearbyint produced."""
    import tvm
    from tvm import s_tir, te

    x = (np.arange(-64, 64, dtype=np.int32) * 3).reshape(8, 16)  # times 0.5: every odd value a .5 tie
    X = te.placeholder(x.shape, "int32", name="x")
    with float_math.lowering_for("llvm" if llvm else "cuda"):
        Y = te.compute(x.shape, lambda i, j: float_math.round_half_even(
            X[i, j].astype("float32") * tvm.tirx.const(0.5, "float32")).astype("int8"), name="y")
    sch = s_tir.Schedule(te.create_prim_func([X, Y]))
    sch.vectorize(sch.get_loops(sch.get_sblock("y"))[-1])
    ex = tvm.compile(sch.mod, target=resolve_target(None))
    out = tvm.runtime.empty(x.shape, "int8")
    ex(tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), np.rint(x * 0.5).astype(np.int8))
    if llvm:
        asm = tvm.compile(sch.mod, target=resolve_target("x86-avx512")).mod.inspect_source("asm")
        assert "gather" not in asm and "vpextrb" not in asm and re.search(r"vrndscaleps|vcvtps2dq", asm)
