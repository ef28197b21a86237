"""The vectorizable float32 exp and erf against math.exp / math.erf in float64: a few ulp everywhere, exact
zeros and saturation at the ends, and no scalar libm call left in the vectorized loop."""

import math
import re

import numpy as np
import pytest
from kiln.codegen.target import resolve_target
from kiln.ir.ops import float_math

ULP = 2.0**-23  # float32's relative spacing at 1


def evaluate(fn, x: np.ndarray):
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
    return out.numpy(), ex.mod.inspect_source("asm")


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
