"""Winograd F(2x2) and F(4x4, 3x3): the weight transform, the op's reference, and the x86 template at random
configs over odd sizes and paddings, against the direct conv's NumPy reference."""

import random

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kiln.ir.ops.blocked import block_array
from kiln.ir.ops.conv import ConvAttrs, conv_reference
from kiln.ir.ops.winograd import CONV2D_WINOGRAD, WinogradAttrs, matrices, recover_weight, transform_weight
from kiln.schedules.x86 import winograd

from ..tolerances import assert_close


@pytest.mark.parametrize("m", [2, 4])
def test_matrices_compute_a_1d_convolution(m):
    """Y = A^T [(G g) * (B^T d)] is the valid correlation of d (m + 2 values) with g (3 taps)."""
    b, g, a = matrices(m)
    rng = np.random.default_rng(m)
    d, taps = rng.standard_normal(m + 2), rng.standard_normal(3)
    got = a.T @ ((g @ taps) * (b.T @ d))
    np.testing.assert_allclose(got, np.correlate(d, taps, mode="valid"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [2, 4])
def test_weight_transform_round_trips(m):
    w = np.random.default_rng(0).standard_normal((32, 8, 3, 3)).astype(np.float32)
    u = transform_weight(w, m, 16)
    assert u.shape == (m + 2, m + 2, 2, 8, 16)
    np.testing.assert_allclose(recover_weight(u, m), w, rtol=1e-5, atol=1e-6)


def run_winograd(x, w, pad, m, ib, ob, cfg, epilogue=True):
    import tvm
    from tvm import s_tir, te

    attrs = WinogradAttrs(ConvAttrs((1, 1), pad, (1, 1)), m, ob)
    xb, u = block_array(x, ib), transform_weight(w, m, ob)
    X, U = te.placeholder(xb.shape, name="x"), te.placeholder(u.shape, name="u")
    out = CONV2D_WINOGRAD.compute(X, U, attrs)
    if epilogue:
        conv = out
        out = te.compute(conv.shape, lambda *i: te.max(conv(*i) - 0.25, 0.0), name="relu")
    sch = s_tir.Schedule(te.create_prim_func([X, U, out]))
    winograd.schedule(sch, cfg)
    f = tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm"}))
    y = tvm.runtime.empty([int(d) for d in out.shape], "float32")
    f(tvm.runtime.tensor(xb), tvm.runtime.tensor(u), y)
    want = block_array(conv_reference(x.astype(np.float64), w.astype(np.float64), attrs.conv), ob)
    return y.numpy(), np.maximum(want - 0.25, 0.0) if epilogue else want


@settings(max_examples=12, deadline=None)
@given(
    m=st.sampled_from([2, 4]),
    cb=st.integers(1, 2),
    ocb=st.integers(1, 4),
    b=st.sampled_from([4, 8, 16]),
    h=st.integers(1, 13),
    w=st.integers(1, 13),
    pad=st.sampled_from([(1, 1, 1, 1), (0, 0, 0, 0), (2, 1, 0, 2)]),
    seed=st.integers(0, 10**6),
    epilogue=st.booleans(),
    fused=st.booleans(),
)
@example(m=4, cb=2, ocb=2, b=16, h=14, w=14, pad=(1, 1, 1, 1), seed=0, epilogue=True, fused=False)
@example(m=2, cb=1, ocb=1, b=8, h=7, w=7, pad=(1, 1, 1, 1), seed=1, epilogue=False, fused=False)  # partial tiles
@example(m=2, cb=1, ocb=4, b=4, h=7, w=7, pad=(1, 1, 1, 1), seed=5, epilogue=True, fused=False)  # 4 vectors
@example(m=4, cb=2, ocb=2, b=16, h=13, w=11, pad=(1, 1, 1, 1), seed=2, epilogue=True, fused=True)  # rows of 3 tiles
@example(m=4, cb=1, ocb=1, b=8, h=3, w=3, pad=(0, 0, 0, 0), seed=3, epilogue=False, fused=True)  # one tile, unit loops
@example(m=2, cb=2, ocb=3, b=4, h=9, w=12, pad=(2, 1, 0, 2), seed=4, epilogue=True, fused=True)
def test_winograd_template_matches_reference(m, cb, ocb, b, h, w, pad, seed, epilogue, fused):
    if h + pad[0] + pad[2] < 3 or w + pad[1] + pad[3] < 3:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, cb * b, h, w)).astype(np.float32)
    wt = (rng.standard_normal((ocb * b, cb * b, 3, 3)) * 0.3).astype(np.float32)
    oh, ow = h + pad[0] + pad[2] - 2, w + pad[1] + pad[3] - 2
    tiles = -(-oh // m) * -(-ow // m)
    knobs, pick = winograd.space(tiles, ocb), random.Random(seed)
    cfg = winograd.Config(tile_p=pick.choice(knobs["tile_p"]), m=m, tile_k=pick.choice(knobs["tile_k"]),
                          fused=fused)
    got, want = run_winograd(x, wt, pad, m, b, b, cfg, epilogue)
    tol = 1e-4 if m == 2 else 5e-4  # F(4x4) loses about a decimal digit
    assert_close(got, want.astype(np.float32), rtol=tol, atol=tol)


def test_op_reference_matches_direct_conv():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 16, 9, 9)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    a = WinogradAttrs(ConvAttrs((1, 1), (1, 1, 1, 1), (1, 1)), 4, 8)
    got = CONV2D_WINOGRAD.evaluate([block_array(x, 8), transform_weight(w, 4, 8)], a)
    assert_close(got, block_array(conv_reference(x, w, a.conv), 8), rtol=1e-4, atol=1e-4)


def test_default_register_tile_holds_several_output_vectors():
    """AVX-512: 6 tiles x 4 vectors of output channels (24 accumulators); AVX2: 6 x 2; a single output block
    keeps the old tile of up to 24 tiles x 1 vector."""
    assert winograd.default(49, 16, 4, oc_blocks=8) == winograd.Config(tile_p=6, m=4, tile_k=4)
    assert winograd.default(49, 8, 2, oc_blocks=8) == winograd.Config(tile_p=6, m=2, tile_k=2)
    assert winograd.default(16, 16, 2, oc_blocks=6) == winograd.Config(tile_p=6, m=2, tile_k=2)
    assert winograd.default(49, 16, 4, oc_blocks=1) == winograd.Config(tile_p=7, m=4, tile_k=1)
    assert not winograd.default(49, 16, 4, oc_blocks=8).fused  # no weight size given: unfused, as before
    assert winograd.default(196, 16, 4, oc_blocks=4, weight_bytes=36 * 64 * 64 * 4).fused  # 590 KB: per row
    assert not winograd.default(16, 16, 4, oc_blocks=16, weight_bytes=36 * 256 * 256 * 4).fused  # 9.4 MB
    for tiles, ocb in ((49, 8), (16, 6), (4, 4), (196, 3)):
        cfg = winograd.default(tiles, 16, 4, ocb)
        knobs = winograd.space(tiles, ocb)
        assert cfg.tile_p in knobs["tile_p"] and cfg.tile_k in knobs["tile_k"] and cfg.fused in knobs["fused"]
