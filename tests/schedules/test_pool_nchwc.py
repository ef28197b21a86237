"""The NCHWc pooling template against the NumPy reference: max and average (with and without counting pads,
ceil mode), global average, over odd sizes, strides, paddings and dilations, at random configs."""

import random

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kiln.ir.ops.blocked import GLOBAL_AVG_POOL_NCHWC, POOL2D_NCHWC, PoolNCHWcAttrs
from kiln.ir.ops.pool import GlobalPoolAttrs, PoolAttrs
from kiln.schedules.x86 import pool_nchwc

from ..tolerances import assert_close


def run(op, attrs, xb, cfg, relu):
    import tvm
    from tvm import s_tir, te

    X = te.placeholder(xb.shape, name="x")
    out = op.compute(X, attrs)
    if relu:
        pooled = out
        out = te.compute(pooled.shape, lambda *i: te.max(pooled(*i), 0.0), name="relu")
    sch = s_tir.Schedule(te.create_prim_func([X, out]))
    pool_nchwc.schedule(sch, cfg)
    f = tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm"}))
    y = tvm.runtime.empty([int(d) for d in out.shape], "float32")
    f(tvm.runtime.tensor(xb), y)
    want = op.evaluate([xb], attrs)
    return y.numpy(), np.maximum(want, 0) if relu else want


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["max", "avg"]), b=st.sampled_from([4, 8, 16]), h=st.integers(3, 15),
       w=st.integers(3, 15), k=st.integers(1, 3), s=st.integers(1, 2), pad=st.integers(0, 1), d=st.integers(1, 2),
       ceil=st.booleans(), include_pad=st.booleans(), seed=st.integers(0, 10**6), relu=st.booleans())
@example(kind="max", b=16, h=112, w=112, k=3, s=2, pad=1, d=1, ceil=False, include_pad=False, seed=0, relu=False)
def test_pool_template_matches_reference(kind, b, h, w, k, s, pad, d, ceil, include_pad, seed, relu):
    if pad >= (k - 1) * d + 1 or h + 2 * pad < (k - 1) * d + 1 or w + 2 * pad < (k - 1) * d + 1:
        return
    attrs = PoolNCHWcAttrs(kind, PoolAttrs((k, k), (s, s), (pad,) * 4, (d, d), ceil, include_pad))
    xb = np.random.default_rng(seed).standard_normal((1, 2, h, w, b)).astype(np.float32)
    out_w = POOL2D_NCHWC.infer_type([_type(xb)], attrs).shape[3]
    space = pool_nchwc.space(out_w)
    r = random.Random(seed)
    cfg = pool_nchwc.Config(**{name: r.choice(values) for name, values in space.items()})
    got, want = run(POOL2D_NCHWC, attrs, xb, cfg, relu)
    assert_close(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(b=st.sampled_from([8, 16]), h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 10**6))
def test_global_avg_pool_template_matches_reference(b, h, w, seed):
    xb = np.random.default_rng(seed).standard_normal((1, 3, h, w, b)).astype(np.float32)
    got, want = run(GLOBAL_AVG_POOL_NCHWC, GlobalPoolAttrs(), xb, pool_nchwc.default(1, h * w), relu=False)
    assert_close(got, want, rtol=1e-5, atol=1e-5)


def _type(x):
    from kiln.ir import TensorType

    return TensorType(x.shape, "float32")
