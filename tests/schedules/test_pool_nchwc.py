"""The NCHWc pooling template against the NumPy reference: max and average (with and without counting pads,
ceil mode), global average, over odd sizes, strides, paddings and dilations, at random configs of its space;
which groups it claims, and its default config."""

import random

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kiln.codegen.target import resolve_target
from kiln.ir import Call
from kiln.ir.ops.blocked import GLOBAL_AVG_POOL_NCHWC, POOL2D_NCHWC, PoolNCHWcAttrs
from kiln.ir.ops.elementwise import RELU
from kiln.ir.ops.pool import GlobalPoolAttrs, PoolAttrs
from kiln.schedules.dispatch import task_of
from kiln.schedules.target_info import target_info
from kiln.schedules.workload import Group
from kiln.schedules.x86 import pool_nchwc

from ..groups import group, lower, params, run_lowered
from ..tolerances import assert_close

AVX2 = "x86-avx2"  # runs on any x86 machine these tests run on; lanes do not matter to this template


def pool_group(op, x_shape, attrs, relu: bool = False):
    ps = params((x_shape, "float32"))
    body = Call(op, (ps[0],), attrs)
    return group(ps, Call(RELU, (body,)) if relu else body)


def check(fn, x, want, cfg=None, target_name=AVX2):
    """Lower the group (at `cfg` when given, else the default), run it, compare; the lowered group."""
    target = resolve_target(target_name)
    template, wl = task_of(fn, target)
    assert template is pool_nchwc.TEMPLATE
    if cfg is not None:
        assert cfg in template.space(wl, target_info(target))
    g = lower(fn, target, {wl.key: cfg} if cfg is not None else None)
    assert g.template == pool_nchwc.TEMPLATE.key and g.config_source == ("given" if cfg is not None else "default")
    assert_close(run_lowered(g, target, [x]), want, rtol=1e-5, atol=1e-5, what=f"{wl.summary()} {g.config}")
    return g


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["max", "avg"]), b=st.sampled_from([4, 8, 16]), h=st.integers(3, 15),
       w=st.integers(3, 15), k=st.integers(1, 3), s=st.integers(1, 2), pad=st.integers(0, 1), d=st.integers(1, 2),
       ceil=st.booleans(), include_pad=st.booleans(), seed=st.integers(0, 10**6), relu=st.booleans())
@example(kind="max", b=16, h=112, w=112, k=3, s=2, pad=1, d=1, ceil=False, include_pad=False, seed=0, relu=False)
def test_pool_template_at_random_configs(kind, b, h, w, k, s, pad, d, ceil, include_pad, seed, relu):
    if pad >= (k - 1) * d + 1 or h + 2 * pad < (k - 1) * d + 1 or w + 2 * pad < (k - 1) * d + 1:
        return
    attrs = PoolNCHWcAttrs(kind, PoolAttrs((k, k), (s, s), (pad,) * 4, (d, d), ceil, include_pad))
    xb = np.random.default_rng(seed).standard_normal((1, 2, h, w, b)).astype(np.float32)
    fn = pool_group(POOL2D_NCHWC, xb.shape, attrs, relu)
    target = resolve_target(AVX2)
    template, wl = task_of(fn, target)
    cfg = template.space(wl, target_info(target)).sample(random.Random(seed))
    want = POOL2D_NCHWC.evaluate([xb], attrs)
    check(fn, xb, np.maximum(want, 0) if relu else want, cfg)


@settings(max_examples=8, deadline=None)
@given(b=st.sampled_from([8, 16]), h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 10**6))
def test_global_avg_pool_template_matches_reference(b, h, w, seed):
    xb = np.random.default_rng(seed).standard_normal((1, 3, h, w, b)).astype(np.float32)
    g = check(pool_group(GLOBAL_AVG_POOL_NCHWC, xb.shape, GlobalPoolAttrs()), xb,
              GLOBAL_AVG_POOL_NCHWC.evaluate([xb], GlobalPoolAttrs()))
    assert g.config == {"tile_ow": 1, "unroll_window": h * w <= 49}


@pytest.mark.parametrize("seed", range(4))
def test_global_avg_pool_at_random_configs(seed):
    xb = np.random.default_rng(seed).standard_normal((1, 2, 6, 9, 8)).astype(np.float32)
    fn = pool_group(GLOBAL_AVG_POOL_NCHWC, xb.shape, GlobalPoolAttrs(), relu=True)
    target = resolve_target(AVX2)
    template, wl = task_of(fn, target)
    cfg = template.space(wl, target_info(target)).sample(random.Random(seed))
    check(fn, xb, np.maximum(GLOBAL_AVG_POOL_NCHWC.evaluate([xb], GlobalPoolAttrs()), 0), cfg)


@pytest.mark.parametrize("target_name", ["x86-avx512", "x86-avx2"])
def test_workload_space_and_default(target_name):
    attrs = PoolNCHWcAttrs("max", PoolAttrs((3, 3), (2, 2), (1,) * 4, (1, 1)))
    info = target_info(resolve_target(target_name))
    wl = pool_nchwc.TEMPLATE.workload(Group(pool_group(POOL2D_NCHWC, (1, 4, 112, 112, 16), attrs)), info)
    assert (wl["out_w"], wl["window"]) == (56, 9)
    space = pool_nchwc.space(wl, info)
    assert space.tunable() == {"tile_ow": 6, "unroll_window": 2}  # 1, 2, 4, 7, 8, 14: divisors of 56 up to 16
    assert pool_nchwc.default(wl, info) == {"tile_ow": 8, "unroll_window": True}
    one = PoolNCHWcAttrs("avg", PoolAttrs((1, 1), (1, 1), (0,) * 4, (1, 1)))
    wl1 = pool_nchwc.TEMPLATE.workload(Group(pool_group(POOL2D_NCHWC, (1, 4, 5, 7, 8), one)), info)
    assert pool_nchwc.space(wl1, info).tunable() == {"tile_ow": 2}  # a 1x1 window has nothing to unroll


def test_claims_only_blocked_pools():
    from kiln.ir.ops.pool import MAX_POOL

    plain = pool_group(MAX_POOL, (1, 4, 9, 9), PoolAttrs((3, 3), (2, 2), (0,) * 4, (1, 1)))
    template, _ = task_of(plain, resolve_target(AVX2))
    assert template is not pool_nchwc.TEMPLATE
