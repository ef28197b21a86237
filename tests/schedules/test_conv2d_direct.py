"""The NCHW direct-conv template, which grouped (not depthwise) convs keep, against the NumPy reference over
groups, strides, padding and dilation, at its default and at random configs of its space; its default config
(the direct tiles, or the generic schedule when no tile above 1 fits) on pinned targets."""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kiln.codegen.target import resolve_target
from kiln.ir import Call
from kiln.ir.ops.conv import CONV2D, ConvAttrs, conv_reference
from kiln.ir.ops.elementwise import ADD, RELU
from kiln.schedules.dispatch import task_of
from kiln.schedules.target_info import target_info
from kiln.schedules.workload import Group
from kiln.schedules.x86 import conv2d_direct

from ..groups import group, lower, op_group, params, run_lowered
from ..host import runs
from ..tolerances import assert_close

AVX2 = "x86-avx2"


@settings(max_examples=12, deadline=None)
@given(groups=st.sampled_from([1, 2, 3, 4]), cpg=st.integers(1, 4), opg=st.integers(1, 4), h=st.integers(3, 12),
       w=st.integers(3, 13), k=st.sampled_from([1, 3]), s=st.integers(1, 2), pad=st.integers(0, 1),
       d=st.integers(1, 2), seed=st.integers(0, 10**6))
def test_grouped_direct_conv_matches_reference(groups, cpg, opg, h, w, k, s, pad, d, seed):
    if h + 2 * pad < (k - 1) * d + 1 or w + 2 * pad < (k - 1) * d + 1:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, groups * cpg, h, w)).astype(np.float32)
    wt = rng.standard_normal((groups * opg, cpg, k, k)).astype(np.float32)
    attrs = ConvAttrs((s, s), (pad,) * 4, (d, d), groups)
    target = resolve_target(AVX2)
    g = lower(op_group(CONV2D, [x, wt], attrs), target)
    assert g.template == conv2d_direct.TEMPLATE.key and g.config_source == "default"
    assert_close(run_lowered(g, target, [x, wt]), conv_reference(x, wt, attrs), rtol=1e-4, atol=1e-4,
                 what=f"{attrs} {g.config} schedule={g.schedule}")
    assert g.schedule.startswith("direct") == g.config["direct"], (g.config, g.schedule)


def bias_add_relu_group(x, w, attrs):
    """relu(conv(x, w) + b + residual), as fuse_ops makes it around a conv."""
    out = CONV2D.infer_type([params(x)[0].type, params(w)[0].type], attrs)
    ps = params(x, w, ((1, out.shape[1], 1, 1), "float32"), (out.shape, "float32"))
    conv = Call(CONV2D, tuple(ps[:2]), attrs)
    return group(ps, Call(RELU, (Call(ADD, (Call(ADD, (conv, ps[2])), ps[3])),)))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("c,o,hw,k,s,pad,groups", [(6, 12, (9, 12), 3, 1, 1, 3), (4, 8, (7, 10), 1, 1, 0, 2),
                                                    (3, 16, (11, 8), 3, 2, 1, 1)])
def test_template_at_random_configs(c, o, hw, k, s, pad, groups, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, c) + hw).astype(np.float32)
    w = rng.standard_normal((o, c // groups, k, k)).astype(np.float32)
    attrs = ConvAttrs((s, s), (pad,) * 4, (1, 1), groups)
    fn = bias_add_relu_group(x, w, attrs)
    target = resolve_target(AVX2)
    template, wl = task_of(fn, target)
    assert template is conv2d_direct.TEMPLATE
    space = template.space(wl, target_info(target))
    assert space.tunable()["tile_oc"] > 1 and space.tunable()["tile_ow"] > 1
    cfg = space.sample(random.Random(seed))
    g = lower(fn, target, {wl.key: cfg})
    assert g.config_source == "given" and g.config == cfg
    assert g.schedule.startswith("direct") == cfg["direct"], (cfg, g.schedule)
    want = conv_reference(x, w, attrs)
    b, r = rng.standard_normal((1, o, 1, 1)).astype(np.float32), rng.standard_normal(want.shape).astype(np.float32)
    assert_close(run_lowered(g, target, [x, w, b, r]), np.maximum(want + b + r, 0), rtol=1e-4, atol=1e-4,
                 what=f"seed={seed} {cfg}")


def _workload(target_name, c, o, ow, k=3, groups=1):
    attrs = ConvAttrs((1, 1), (k // 2,) * 4, (1, 1), groups)
    fn = op_group(CONV2D, [((1, c, 5, ow), "float32"), ((o, c // groups, k, k), "float32")], attrs)
    info = target_info(resolve_target(target_name))
    return conv2d_direct.TEMPLATE.workload(Group(fn), info), info


@pytest.mark.parametrize("target_name,lanes", [("x86-avx512", 16), ("x86-avx2", 8)])
def test_default_config(target_name, lanes):
    for o, ow in [(24, 56), (7, 12), (512, 7), (6, 13)]:
        wl, info = _workload(target_name, 3, o, ow)
        cfg = conv2d_direct.default(wl, info)
        assert cfg in conv2d_direct.space(wl, info)
        tile_oc = max(d for d in range(1, min(o, 8) + 1) if o % d == 0)  # ≤ 8 accumulator rows
        tile_ow = max(d for d in range(1, min(ow, lanes) + 1) if ow % d == 0)  # one vector wide
        if tile_oc > 1 and tile_ow > 1:
            assert cfg == {"direct": True, "tile_oc": tile_oc, "tile_ow": tile_ow}
        else:
            assert cfg == {"direct": False}, (o, ow, cfg)
    # a width of 13 is one vector on AVX-512 but has no tile above 1 within AVX2's 8 lanes
    wl, info = _workload(target_name, 3, 6, 13)
    assert conv2d_direct.default(wl, info)["direct"] == (lanes == 16)


def test_nothing_summed_has_only_the_generic_schedule():
    wl, info = _workload(AVX2, 4, 8, 12, k=1, groups=4)  # one input channel per group, a 1x1 kernel
    assert list(conv2d_direct.space(wl, info)) == [{"direct": False}]


def test_claims_convs_with_producers_and_elementwise_epilogues():
    from kiln.ir.ops.blocked import LAYOUT_TRANSFORM, LayoutTransformAttrs
    from kiln.ir.ops.transform import TRANSPOSE, TransposeAttrs

    attrs = ConvAttrs((1, 1), (1,) * 4, (1, 1), 3)
    ps = params(((1, 6, 8, 9), "float32"), ((12, 2, 3, 3), "float32"))
    conv = Call(CONV2D, (Call(TRANSPOSE, (ps[0],), TransposeAttrs((0, 1, 3, 2))), ps[1]), attrs)
    assert conv2d_direct.applies(Group(group(ps, Call(RELU, (conv,)))))  # the transpose inlined into the input
    blocked = Call(LAYOUT_TRANSFORM, (conv,), LayoutTransformAttrs(0, 4))
    assert not conv2d_direct.applies(Group(group(ps, blocked)))  # a 5-D output: not the conv's loops


@pytest.mark.parametrize("target_name, lanes", [("x86-avx512", 16), ("x86-avx2", 8)])
def test_width_tiles_are_one_vector_or_whole_vectors(target_name, lanes):
    """A width tile between one vector and two (28 of 16 lanes) is a vector type LLVM handles badly (15x slower
    on a grouped 1x1 conv): the space holds none."""
    for ow in (7, 14, 28, 56, 24, 32):
        wl, info = _workload(target_name, 3, 24, ow)
        widths = {c["tile_ow"] for c in conv2d_direct.space(wl, info) if c.get("direct")}
        assert widths and all(w <= lanes or w % lanes == 0 for w in widths), (ow, widths)
    wl, info = _workload(target_name, 3, 24, 32)  # whole vectors stay: 2 of 16 lanes, 2 and 4 of 8
    assert 2 * lanes in {c["tile_ow"] for c in conv2d_direct.space(wl, info) if c.get("direct")}


def _pointwise(c, o, hw, groups, epilogue):
    rng = np.random.default_rng(c * o + groups)
    x = rng.standard_normal((1, c) + hw).astype(np.float32)
    w = rng.standard_normal((o, c // groups, 1, 1)).astype(np.float32)
    attrs = ConvAttrs((1, 1), (0,) * 4, (1, 1), groups)
    want = conv_reference(x, w, attrs)
    if not epilogue:
        return op_group(CONV2D, [x, w], attrs), [x, w], want
    b, r = rng.standard_normal((1, o, 1, 1)).astype(np.float32), rng.standard_normal(want.shape).astype(np.float32)
    return bias_add_relu_group(x, w, attrs), [x, w, b, r], np.maximum(want + b + r, 0)


@pytest.mark.parametrize("epilogue", [True, False])
@pytest.mark.parametrize("target_name", [pytest.param("x86-avx512", marks=runs("x86-avx512")), AVX2])
def test_flat_pointwise_tiles_match_reference(target_name, epilogue):
    """Every flat tile of a grouped pointwise conv whose plane is whole vectors (6 channels a group, a tile of
    2 or 3 of them: the tile never leaves its group), with and without an epilogue."""
    fn, arrays, want = _pointwise(12, 18, (4, 8), 3, epilogue)
    target = resolve_target(target_name)
    template, wl = task_of(fn, target)
    flat = [c for c in template.space(wl, target_info(target)) if c.get("flat")]
    assert {c["tile_oc"] for c in flat} == {1, 2, 3, 6} and len(flat) >= 6, flat
    for cfg in flat:
        g = lower(fn, target, {wl.key: cfg})
        assert g.config == cfg and g.schedule.startswith("direct_flat("), (cfg, g.schedule)
        assert_close(run_lowered(g, target, arrays), want, rtol=1e-4, atol=1e-4, what=f"{cfg}")


@pytest.mark.parametrize("target_name,lanes,registers", [("x86-avx512", 16, 32), (AVX2, 8, 16)])
def test_flat_default_over_whole_or_padded_planes(target_name, lanes, registers):
    """ShuffleNet's grouped 1x1 convs: at 28×28 (49 vectors of 16) the flat tile, within half the registers; at
    14×14 and 7×7 (a tail) the flat tile over the plane padded to whole tiles, at most a third more work; a 3x3
    kernel the width tiles."""
    attrs = lambda k: ConvAttrs((1, 1), (k // 2,) * 4, (1, 1), 4)  # noqa: E731
    info = target_info(resolve_target(target_name))
    for hw, k, flat in [(28, 1, True), (14, 1, True), (7, 1, True), (28, 3, False)]:
        fn = op_group(CONV2D, [((1, 136, hw, hw), "float32"), ((136, 34, k, k), "float32")], attrs(k))
        wl = conv2d_direct.TEMPLATE.workload(Group(fn), info)
        cfg = conv2d_direct.default(wl, info)
        assert bool(cfg.get("flat")) == flat, (hw, k, cfg)
        assert bool(wl.get("plane_tail")) == (k == 1 and (hw * hw) % lanes != 0), (hw, k)
        plane = conv2d_direct.padded_plane(wl, cfg)
        assert bool(plane) == bool(flat and wl.get("plane_tail")), (hw, cfg, plane)
        if flat:
            assert 34 % cfg["tile_oc"] == 0 and 1 < cfg["tile_oc"] * cfg["tile_v"] <= registers // 2, cfg
            whole = plane or hw * hw  # the plane the flat tiles cover: whole tiles, no tail
            assert whole % (cfg["tile_v"] * lanes) == 0 and hw * hw <= whole <= hw * hw * 4 / 3, (hw, cfg, plane)


@pytest.mark.parametrize("k,hw", [(1, (7, 10)), (3, (6, 9))])
def test_channel_tiles_innermost_match_reference(k, hw):
    """A grouped conv's channel tiles innermost (each a tile of one group, the next group's after them), in the
    width tiles (a 1x1 whose plane has a tail, a padded 3x3) and the flat ones, with the fused epilogue."""
    rng = np.random.default_rng(k)
    c, o, groups = 12, 24, 3
    x = rng.standard_normal((1, c) + hw).astype(np.float32)
    w = rng.standard_normal((o, c // groups, k, k)).astype(np.float32)
    attrs = ConvAttrs((1, 1), (k // 2,) * 4, (1, 1), groups)
    fn = bias_add_relu_group(x, w, attrs)
    target = resolve_target(AVX2)
    template, wl = task_of(fn, target)
    inner = [cfg for cfg in template.space(wl, target_info(target)) if cfg.get("oc_inner")]
    assert inner and all((o // groups) % cfg["tile_oc"] == 0 for cfg in inner)
    want = conv_reference(x, w, attrs)
    b, r = rng.standard_normal((1, o, 1, 1)).astype(np.float32), rng.standard_normal(want.shape).astype(np.float32)
    for cfg in inner:
        g = lower(fn, target, {wl.key: cfg})
        assert g.schedule.split(")")[0].endswith("oc_inner"), g.schedule
        assert_close(run_lowered(g, target, [x, w, b, r]), np.maximum(want + b + r, 0), rtol=1e-4, atol=1e-4,
                     what=f"{cfg}")


def test_flat_default_runs_a_groups_channel_tiles_innermost():
    """ShuffleNet's 136-channel 28×28 grouped 1x1 conv (34 channels a group): the flat default reads each input
    slab for every channel tile of its group before moving on; an ungrouped conv has no such knob."""
    info = target_info(resolve_target("x86-avx512"))
    attrs = ConvAttrs((1, 1), (0,) * 4, (1, 1), 4)
    fn = op_group(CONV2D, [((1, 136, 28, 28), "float32"), ((136, 34, 1, 1), "float32")], attrs)
    wl = conv2d_direct.TEMPLATE.workload(Group(fn), info)
    assert conv2d_direct.default(wl, info)["oc_inner"] is True
    wl1, _ = _workload("x86-avx512", 16, 32, 28, k=1)
    assert all("oc_inner" not in cfg for cfg in conv2d_direct.space(wl1, info))


@settings(max_examples=12, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), cpg=st.integers(1, 6), opg=st.sampled_from([2, 4, 6]),
       h=st.integers(1, 9), w=st.integers(1, 11), batch=st.sampled_from([1, 2]), epilogue=st.booleans(),
       pick=st.integers(0, 10**6))
def test_a_padded_plane_matches_reference(groups, cpg, opg, h, w, batch, epilogue, pick):
    """A pointwise conv whose plane has a tail (including one shorter than a vector), on a random config of the
    padded flat tiles: built over the padded plane, its outputs equal the reference's, with and without the
    fused epilogue, grouped or not, batch 1 and 2."""
    if (h * w) % 8 == 0 or cpg == 1:
        return  # no tail, or nothing summed: not this branch
    rng = np.random.default_rng(pick)
    x = rng.standard_normal((batch, groups * cpg, h, w)).astype(np.float32)
    wt = rng.standard_normal((groups * opg, cpg, 1, 1)).astype(np.float32)
    attrs = ConvAttrs((1, 1), (0,) * 4, (1, 1), groups)
    want = conv_reference(x, wt, attrs)
    target = resolve_target(AVX2)
    if epilogue:
        b, r = rng.standard_normal((1, want.shape[1], 1, 1)).astype(np.float32), rng.standard_normal(want.shape)
        arrays, want = [x, wt, b, r.astype(np.float32)], np.maximum(want + b + r.astype(np.float32), 0)
        fn = bias_add_relu_group(x, wt, attrs)
    else:
        arrays, fn = [x, wt], op_group(CONV2D, [x, wt], attrs)
    template, wl = task_of(fn, target)
    assert wl["plane_tail"]
    padded = [cfg for cfg in template.space(wl, target_info(target)) if cfg.get("flat")]
    if not padded:  # even one vector a tile would add over a third to the work
        assert -(-h * w // 8) * 8 > h * w * 4 / 3, (h, w)
        return
    cfg = padded[pick % len(padded)]
    g = lower(fn, target, {wl.key: cfg})
    plane = conv2d_direct.padded_plane(wl, cfg)
    assert g.config == cfg and g.schedule.startswith(f"direct_flat(plane={h * w}->{plane}"), (cfg, g.schedule)
    assert_close(run_lowered(g, target, arrays), want, rtol=1e-4, atol=1e-4, what=f"{cfg} {g.schedule}")


GUARDED_RUN = r"""
import ctypes, mmap, sys
import numpy as np, tvm, tvm_ffi
from kiln.codegen.target import resolve_target
from kiln.ir.ops.conv import CONV2D, ConvAttrs, conv_reference
from kiln.schedules.dispatch import task_of
from kiln.schedules.target_info import target_info
from kiln.schedules.x86 import conv2d_direct
from tests.groups import lower, op_group

attrs = ConvAttrs((1, 1), (0,) * 4, (1, 1), 2)
fn = op_group(CONV2D, [((1, 16, 3, 5), "float32"), ((16, 8, 1, 1), "float32")], attrs)
target = resolve_target("x86-avx2")
template, wl = task_of(fn, target)
cfg = next(c for c in template.space(wl, target_info(target)) if c.get("flat"))
assert conv2d_direct.padded_plane(wl, cfg) == 16, cfg  # 15 outputs a plane, padded to 2 vectors
g = lower(fn, target, {wl.key: cfg})
kernel = tvm.compile(tvm.IRModule({"main": g.prim_func}), target=target)["main"]
page = mmap.mmap(-1, 8192)
start = ctypes.addressof(ctypes.c_char.from_buffer(page))
assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(start + 4096), 4096, 0) == 0  # the next page unreadable
x = np.frombuffer(page, np.float32, count=240, offset=4096 - 960).reshape(1, 16, 3, 5)  # ends at that page
x[...] = np.random.default_rng(0).standard_normal(x.shape)
w = np.random.default_rng(1).standard_normal((16, 8, 1, 1)).astype(np.float32)
out = tvm.runtime.empty((1, 16, 3, 5), "float32")
kernel(tvm_ffi.from_dlpack(x), tvm.runtime.tensor(w), out)
np.testing.assert_allclose(out.numpy(), conv_reference(x, w, attrs), rtol=1e-4, atol=1e-4)
print("ok", g.schedule)
"""


def test_a_padded_plane_reads_nothing_past_the_input():
    """The padded conv's input copy reads each input plane and nothing past it: the last channel's plane ends
    the buffer. Run on an input that ends where an unreadable page begins (in a child process: a read past it
    is a segfault)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", GUARDED_RUN], capture_output=True, text=True, cwd=root,
                          timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "ok direct_flat(plane=15->16" in done.stdout, done.stdout
