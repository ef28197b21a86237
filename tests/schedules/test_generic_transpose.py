"""The generic schedule's transpose tiles: a group that reads an input across its rows (BERT's key transpose)
gets `lanes × lanes` tiles and matches NumPy; copies that keep the innermost axis, and shapes whose axes are not
whole tiles, keep the plain parallel + vectorize schedule."""

import numpy as np
import pytest
from kiln.codegen.target import resolve_target
from kiln.ir import Call
from kiln.ir.ops.elementwise import RELU
from kiln.ir.ops.transform import RESHAPE, TRANSPOSE, ReshapeAttrs, TransposeAttrs

from ..groups import group, lower, params, run_lowered

AVX2 = "x86-avx2"  # 8 lanes; runs on any x86 host


def reshape_transpose(shape, split, perm, relu: bool = False):
    ps = params((shape, "float32"))
    x = Call(RESHAPE, (ps[0],), ReshapeAttrs(split))
    x = Call(TRANSPOSE, (x,), TransposeAttrs(perm))
    return group(ps, Call(RELU, (x,)) if relu else x)


def reference(x, split, perm, relu: bool = False):
    y = x.reshape(split).transpose(perm)
    return np.maximum(y, 0) if relu else y


CASES = [  # (input shape, reshape, permutation, relu after, tiled)
    ((1, 128, 768), (1, 128, 12, 64), (0, 2, 3, 1), False, True),  # BERT's K^T: [s, h*64+d] -> [h, d, s]
    ((1, 32, 48), (1, 32, 3, 16), (0, 2, 3, 1), True, True),  # the same with an op after it
    ((2, 24, 40), (2, 24, 40), (0, 2, 1), False, True),  # a plain batched 2-D transpose
    ((1, 128, 768), (1, 128, 12, 64), (0, 2, 1, 3), False, False),  # [h, s, d]: rows of 64 stay contiguous
    ((1, 20, 36), (1, 20, 36), (0, 2, 1), False, False),  # 20 is no whole number of 8-lane tiles
]


@pytest.mark.parametrize("shape, split, perm, relu, tiled", CASES)
def test_transposes_are_tiled_and_match_numpy(shape, split, perm, relu, tiled):
    target = resolve_target(AVX2)
    g = lower(reshape_transpose(shape, split, perm, relu), target)
    assert g.template == "x86.generic@1"
    assert ("transpose_tiles" in g.schedule) == tiled, g.schedule
    assert "vectorize" in g.schedule
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    np.testing.assert_array_equal(run_lowered(g, target, [x]), reference(x, split, perm, relu))


def test_tiles_follow_the_targets_lanes():
    fn = reshape_transpose((1, 24, 40), (1, 24, 40), (0, 2, 1))
    # 40 × 24: whole tiles of 8 lanes (AVX2), not of 16 (AVX-512), so only the AVX2 build tiles
    assert "transpose_tiles" in lower(fn, resolve_target(AVX2)).schedule
    assert "transpose_tiles" not in lower(fn, resolve_target("x86-avx512")).schedule
