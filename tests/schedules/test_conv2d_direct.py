"""The NCHW direct-conv template, which grouped (not depthwise) convs keep, against the NumPy reference over
groups, strides, padding and dilation; and the schedule it reports."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from kiln.codegen.target import resolve_target
from kiln.ir.ops.conv import CONV2D, ConvAttrs, conv_reference
from kiln.schedules.default import schedule_group

from ..tolerances import assert_close


@settings(max_examples=12, deadline=None)
@given(groups=st.sampled_from([1, 2, 3, 4]), cpg=st.integers(1, 4), opg=st.integers(1, 4), h=st.integers(3, 12),
       w=st.integers(3, 13), k=st.sampled_from([1, 3]), s=st.integers(1, 2), pad=st.integers(0, 1),
       d=st.integers(1, 2), seed=st.integers(0, 10**6))
def test_grouped_direct_conv_matches_reference(groups, cpg, opg, h, w, k, s, pad, d, seed):
    import tvm
    from tvm import te

    if h + 2 * pad < (k - 1) * d + 1 or w + 2 * pad < (k - 1) * d + 1:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, groups * cpg, h, w)).astype(np.float32)
    wt = rng.standard_normal((groups * opg, cpg, k, k)).astype(np.float32)
    attrs = ConvAttrs((s, s), (pad,) * 4, (d, d), groups)
    X, W = te.placeholder(x.shape, name="x"), te.placeholder(wt.shape, name="w")
    out = CONV2D.compute(X, W, attrs)
    target = resolve_target("native")
    prim, how = schedule_group(te.create_prim_func([X, W, out]), target, ("nn.conv2d", attrs))
    f = tvm.compile(tvm.IRModule({"main": prim}), target=target)
    y = tvm.runtime.empty([int(v) for v in out.shape], "float32")
    f(tvm.runtime.tensor(x), tvm.runtime.tensor(wt), y)
    assert_close(y.numpy(), conv_reference(x, wt, attrs), rtol=1e-4, atol=1e-4)
    assert how  # the schedule that applied is named (direct(...) or the generic fallback's steps)


def test_default_lies_in_the_space():
    from kiln.schedules.x86 import conv2d_direct

    for oc, ow, lanes in [(24, 56, 16), (7, 13, 8), (512, 7, 16)]:
        cfg, space = conv2d_direct.default(oc, ow, lanes), conv2d_direct.space(oc, ow, lanes)
        assert cfg.tile_oc in space["tile_oc"] and cfg.tile_ow in space["tile_ow"]
