"""The NCHW pooling template against the NumPy reference: max and average (with and without counting pads,
ceil mode), with and without a relu after, over odd sizes, strides, paddings and dilations, at random configs of
its space; which groups it claims, and its default config."""

import random

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kiln.codegen.target import resolve_target
from kiln.ir import Call
from kiln.ir.ops.pool import AVG_POOL, LP_POOL, MAX_POOL, PoolAttrs
from kiln.schedules.dispatch import task_of
from kiln.schedules.target_info import target_info
from kiln.schedules.x86 import pool_nchw

from ..groups import group, lower, params, run_lowered
from ..tolerances import assert_close
from .test_pool_nchwc import pool_group

AVX2 = "x86-avx2"  # runs on any x86 machine these tests run on


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["max", "avg"]), c=st.integers(1, 5), h=st.integers(3, 15), w=st.integers(3, 15),
       k=st.integers(1, 3), s=st.integers(1, 2), pad=st.integers(0, 1), d=st.integers(1, 2), ceil=st.booleans(),
       include_pad=st.booleans(), seed=st.integers(0, 10**6), relu=st.booleans())
@example(kind="avg", c=3, h=28, w=28, k=3, s=2, pad=1, d=1, ceil=False, include_pad=False, seed=0, relu=False)
@example(kind="max", c=2, h=14, w=14, k=3, s=2, pad=1, d=1, ceil=False, include_pad=False, seed=1, relu=True)
def test_pool_template_at_random_configs(kind, c, h, w, k, s, pad, d, ceil, include_pad, seed, relu):
    if pad >= (k - 1) * d + 1 or h + 2 * pad < (k - 1) * d + 1 or w + 2 * pad < (k - 1) * d + 1:
        return
    op = MAX_POOL if kind == "max" else AVG_POOL
    attrs = PoolAttrs((k, k), (s, s), (pad,) * 4, (d, d), ceil, include_pad)
    x = np.random.default_rng(seed).standard_normal((1, c, h, w)).astype(np.float32)
    fn = pool_group(op, x.shape, attrs, relu)
    target = resolve_target(AVX2)
    template, wl = task_of(fn, target)
    if fn.body.type.shape[3] == 1:  # one output column: the generic schedule's (below)
        return
    assert template is pool_nchw.TEMPLATE
    cfg = template.space(wl, target_info(target)).sample(random.Random(seed))
    g = lower(fn, target, {wl.key: cfg})
    assert g.template == template.key and g.config_source == "given"
    want = op.evaluate([x], attrs)
    assert_close(run_lowered(g, target, [x]), np.maximum(want, 0) if relu else want, rtol=1e-5, atol=1e-5,
                 what=f"{wl.summary()} {cfg}")


def test_workload_space_and_default():
    attrs = PoolAttrs((3, 3), (2, 2), (1,) * 4, (1, 1))
    target = resolve_target(AVX2)
    template, wl = task_of(pool_group(AVG_POOL, (1, 136, 28, 28), attrs), target)
    assert template is pool_nchw.TEMPLATE and (wl["out_w"], wl["window"]) == (14, 9)
    assert pool_nchw.space(wl).tunable() == {"tile_ow": 4, "vector": 2}  # 1, 2, 7, 14
    assert pool_nchw.default(wl) == {"tile_ow": 7, "vector": True}
    x = np.random.default_rng(0).standard_normal((1, 136, 28, 28)).astype(np.float32)
    g = lower(pool_group(AVG_POOL, x.shape, attrs), target)
    assert g.config_source == "default"
    assert_close(run_lowered(g, target, [x]), AVG_POOL.evaluate([x], attrs), rtol=1e-5, atol=1e-5, what="default")


def test_leaves_lp_pools_to_the_generic_schedule():
    fn = pool_group(LP_POOL, (1, 4, 9, 9), PoolAttrs((3, 3), (2, 2), (0,) * 4, (1, 1)))
    assert task_of(fn, resolve_target(AVX2))[0].name == "x86.generic"


def test_leaves_one_column_outputs_to_the_generic_schedule():
    fn = pool_group(AVG_POOL, (1, 4, 7, 7), PoolAttrs((7, 7), (1, 1), (0,) * 4, (1, 1)))
    assert task_of(fn, resolve_target(AVX2))[0].name == "x86.generic"


def test_float16_batches_at_every_config():
    """Two images in float16: average sums in float32 and rounds once, as the op's compute says."""
    attrs = PoolAttrs((3, 3), (2, 2), (1,) * 4, (1, 1))
    x = np.random.default_rng(3).standard_normal((2, 3, 12, 12)).astype(np.float16)
    target = resolve_target(AVX2)
    for op in (AVG_POOL, MAX_POOL):
        ps = params((x.shape, "float16"))
        fn = group(ps, Call(op, (ps[0],), attrs))
        template, wl = task_of(fn, target)
        assert template is pool_nchw.TEMPLATE
        want = op.evaluate([x], attrs)
        for cfg in template.space(wl, target_info(target)):
            g = lower(fn, target, {wl.key: cfg})
            assert_close(run_lowered(g, target, [x]), want, rtol=1e-3, atol=1e-3, what=f"{op.name} {cfg}")


def test_a_large_window_is_not_unrolled():
    """ONNX's test_MaxPool2d_stride_padding_dilation pools 60x80 windows: unrolled, its 4,800 window steps kept
    LLVM busy for over 5 minutes (the slow model sweep hung on it). Past UNROLL_MAX_WINDOW the window loops stay
    loops; a small window is still unrolled."""
    target = resolve_target(AVX2)
    big = PoolAttrs((12, 16), (4, 4), (2, 4, 2, 4), (2, 2))
    x = np.random.default_rng(0).standard_normal((1, 1, 60, 80)).astype(np.float32)
    g = lower(pool_group(MAX_POOL, x.shape, big), target)
    assert g.template == pool_nchw.TEMPLATE.key and "T.unroll" not in g.prim_func.script()
    assert_close(run_lowered(g, target, [x]), MAX_POOL.evaluate([x], big), rtol=0, atol=0, what="12x16 window")
    small = lower(pool_group(MAX_POOL, x.shape, PoolAttrs((3, 3), (2, 2), (1,) * 4, (1, 1))), target)
    assert "T.unroll" in small.prim_func.script()
