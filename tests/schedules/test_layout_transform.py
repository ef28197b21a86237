"""The layout-transform template against the NumPy reference: into and out of blocks, with a channel shuffle
inlined, dropping padded channels, at every config of its space; which groups it claims; its default."""

import numpy as np
import pytest
from kiln.codegen.target import resolve_target
from kiln.ir import Call
from kiln.ir.ops.blocked import LAYOUT_TRANSFORM, LayoutTransformAttrs
from kiln.ir.ops.elementwise import RELU
from kiln.ir.ops.transform import RESHAPE, TRANSPOSE, ReshapeAttrs, TransposeAttrs
from kiln.schedules.dispatch import task_of
from kiln.schedules.target_info import target_info
from kiln.schedules.x86 import layout_transform

from ..groups import group, lower, params, run_lowered

AVX2 = "x86-avx2"  # runs on any x86 host; the template does not depend on lanes


def transform_group(shape, attrs, shuffle: int = 0, dtype: str = "float32", relu_after: bool = False):
    """layout_transform(x), optionally after ShuffleNet's channel shuffle in `shuffle` groups (reshape,
    transpose, reshape), optionally followed by a relu."""
    ps = params((shape, dtype))
    x = ps[0]
    if shuffle:
        n, c, h, w = shape
        x = Call(RESHAPE, (x,), ReshapeAttrs((n, shuffle, c // shuffle, h, w)))
        x = Call(TRANSPOSE, (x,), TransposeAttrs((0, 2, 1, 3, 4)))
        x = Call(RESHAPE, (x,), ReshapeAttrs(shape))
    body = Call(LAYOUT_TRANSFORM, (x,), attrs)
    return group(ps, Call(RELU, (body,)) if relu_after else body)


def reference(x, attrs, shuffle: int = 0):
    if shuffle:
        n, c, h, w = x.shape
        x = x.reshape(n, shuffle, c // shuffle, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)
    return LAYOUT_TRANSFORM.evaluate([x], attrs)


CASES = [  # (input shape, attrs, shuffle groups)
    ((1, 24, 14, 14), LayoutTransformAttrs(0, 8), 3),  # into blocks, shuffled
    ((1, 32, 7, 12), LayoutTransformAttrs(0, 16), 0),  # into blocks, a row of 12
    ((1, 2, 9, 10, 16), LayoutTransformAttrs(16, 0), 0),  # out of blocks
    ((1, 3, 5, 6, 8), LayoutTransformAttrs(8, 0, channels=20), 0),  # out of blocks, padded channels dropped
    ((1, 2, 4, 6, 16), LayoutTransformAttrs(16, 8), 0),  # from one block size to another
    ((2, 16, 3, 5), LayoutTransformAttrs(0, 8), 2),  # a batch of two
]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape, attrs, shuffle", CASES)
def test_every_config_matches_the_reference(shape, attrs, shuffle, dtype):
    target = resolve_target(AVX2)
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    fn = transform_group(shape, attrs, shuffle, dtype)
    template, wl = task_of(fn, target)
    assert template is layout_transform.TEMPLATE
    space = template.space(wl, target_info(target))
    assert template.default_config(wl, target_info(target)) in space
    want = reference(x, attrs, shuffle)
    for cfg in space:
        g = lower(fn, target, {wl.key: cfg})
        assert g.config_source == "given" and g.template == template.key
        np.testing.assert_array_equal(run_lowered(g, target, [x]), want, err_msg=f"{wl.summary()} {cfg}")


def test_space_follows_the_direction_and_the_row():
    target = resolve_target(AVX2)
    into = task_of(transform_group((1, 16, 4, 14), LayoutTransformAttrs(0, 16)), target)[1]
    out = task_of(transform_group((1, 1, 4, 14, 16), LayoutTransformAttrs(16, 0)), target)[1]
    padded = task_of(transform_group((1, 3, 4, 14, 8), LayoutTransformAttrs(8, 0, channels=20)), target)[1]
    modes = lambda wl: {(c["mode"], c.get("tile_w")) for c in layout_transform.space(wl)}
    assert modes(into) == {("vector", None), ("unroll", None), ("tile", 1), ("tile", 2), ("tile", 7),
                           ("tile", 14)}
    assert {m for m, _ in modes(out)} == {"vector", "unroll", "tile"}
    assert modes(padded) == {("vector", t) for t in (1, 2, 7, 14)}  # 20 channels are not whole blocks of 8
    assert layout_transform.default(into) == {"mode": "unroll"}
    assert layout_transform.default(out) == {"mode": "unroll", "tile_w": 14}
    assert layout_transform.default(padded) == {"mode": "vector", "tile_w": 14}


def test_claims_only_pure_transform_groups():
    target = resolve_target(AVX2)
    attrs = LayoutTransformAttrs(0, 8)
    assert task_of(transform_group((1, 8, 4, 4), attrs, shuffle=2), target)[0] is layout_transform.TEMPLATE
    # an op after the transform: the generic schedule's group, not a transpose of rows
    assert task_of(transform_group((1, 8, 4, 4), attrs, relu_after=True), target)[0].name == "x86.generic"
    # an op before it that is not data movement: not a transpose either (a resize keeps x86/resize.py)
    ps = params(((1, 8, 4, 4), "float32"))
    fn = group(ps, Call(LAYOUT_TRANSFORM, (Call(RELU, (ps[0],)),), attrs))
    assert task_of(fn, target)[0].name == "x86.generic"
