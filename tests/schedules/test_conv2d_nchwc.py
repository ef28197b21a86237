"""The NCHWc direct-conv template against the NumPy reference, over a sweep of shapes and at random configs
from its knob space (the default config alone proves little)."""

import random

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kiln.ir.ops.blocked import CONV2D_NCHWC, ConvNCHWcAttrs, block_array, pack_conv_weight
from kiln.ir.ops.conv import ConvAttrs, conv_output_size, conv_reference
from kiln.schedules.x86.conv2d_nchwc import prepare as _prepare
from kiln.schedules.x86 import conv2d_nchwc

from ..tolerances import assert_close


def run_template(x, w, attrs: ConvAttrs, ib: int, ob: int, cfg, epilogue: bool, algorithm: str = "direct"):
    import tvm
    from tvm import s_tir, te

    depthwise = attrs.groups > 1 and attrs.groups == x.shape[1]
    xb, wb = block_array(x, ib), pack_conv_weight(w, 1 if depthwise else ib, ob)
    a = ConvNCHWcAttrs(attrs, ob, algorithm)
    X, W = te.placeholder(xb.shape, name="x"), te.placeholder(wb.shape, name="w")
    out = CONV2D_NCHWC.compute(X, W, a)
    if epilogue:  # bias + relu, as a fused group has them
        conv = out
        out = te.compute(conv.shape, lambda *i: te.max(conv(*i) + 0.5, 0.0), name="relu")
    sch = s_tir.Schedule(te.create_prim_func([X, W, out]))
    pads = ("im2col",) if algorithm == "im2col" else () if depthwise else ("pad",)
    conv_block, out_block = _prepare(sch, "depthwise_nchwc" if depthwise else "conv2d_nchwc", pads)
    conv2d_nchwc.schedule(sch, conv_block, out_block, cfg)
    f = tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm"}))
    y = tvm.runtime.empty(
        [int(d) for d in out.shape], "float32"
    )  # TVM's buffers: 64-byte aligned, as kernels need
    f(tvm.runtime.tensor(xb), tvm.runtime.tensor(wb), y)
    y = y.numpy()
    want = block_array(conv_reference(x, w, attrs), ob)
    return y, np.maximum(want + 0.5, 0.0) if epilogue else want


@settings(max_examples=25, deadline=None)
@given(
    c=st.sampled_from([3, 4, 8, 16]),
    ocb=st.integers(1, 3),
    ob=st.sampled_from([4, 8, 16]),
    h=st.integers(1, 12),
    w=st.integers(1, 13),
    k=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    pad=st.integers(0, 2),
    dilation=st.integers(1, 2),
    seed=st.integers(0, 10**6),
    epilogue=st.booleans(),
)
@example(c=16, ocb=2, ob=16, h=7, w=7, k=3, stride=1, pad=1, dilation=1, seed=0, epilogue=True)
@example(c=3, ocb=1, ob=8, h=11, w=11, k=5, stride=2, pad=2, dilation=1, seed=1, epilogue=False)  # odd sizes
def test_direct_nchwc_matches_reference(c, ocb, ob, h, w, k, stride, pad, dilation, seed, epilogue):
    ext = (k - 1) * dilation + 1
    if h + 2 * pad < ext or w + 2 * pad < ext:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((ocb * ob, c, k, k)).astype(np.float32)
    attrs = ConvAttrs((stride, stride), (pad,) * 4, (dilation, dilation))
    ow = conv_output_size(w, k, stride, 2 * pad, dilation)
    space = conv2d_nchwc.space(ow, ocb)
    r = random.Random(seed)
    cfg = conv2d_nchwc.Config(**{name: r.choice(values) for name, values in space.items()})
    ib = c if c < 4 else min(c, ob)
    got, want = run_template(x, wt, attrs, ib, ob, cfg, epilogue)
    assert_close(got, want, rtol=1e-4, atol=1e-4)


@settings(max_examples=15, deadline=None)
@given(
    cb=st.integers(1, 3),
    b=st.sampled_from([4, 8, 16]),
    h=st.integers(2, 15),
    w=st.integers(2, 15),
    stride=st.integers(1, 2),
    k=st.sampled_from([3, 5]),
    seed=st.integers(0, 10**6),
)
@example(cb=2, b=16, h=14, w=14, stride=2, k=3, seed=0)
def test_depthwise_nchwc_matches_reference(cb, b, h, w, stride, k, seed):
    rng = np.random.default_rng(seed)
    c = cb * b
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    attrs = ConvAttrs((stride, stride), (k // 2,) * 4, (1, 1), groups=c)
    ow = conv_output_size(w, k, stride, 2 * (k // 2), 1)
    space = conv2d_nchwc.space(ow, cb, depthwise=True)
    r = random.Random(seed)
    cfg = conv2d_nchwc.Config(**{name: r.choice(values) for name, values in space.items()})
    got, want = run_template(x, wt, attrs, b, b, cfg, epilogue=True)
    assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ow,ocb,lanes", [(56, 4, 16), (7, 32, 16), (13, 8, 8), (29, 2, 16), (1, 128, 16)])
def test_default_config_lies_in_the_space_and_fits_registers(ow, ocb, lanes):
    cfg = conv2d_nchwc.default(ow, ocb, lanes)
    space = conv2d_nchwc.space(ow, ocb)
    assert cfg.tile_oc in space["tile_oc"] and cfg.tile_ow in space["tile_ow"]
    assert cfg.tile_ow * cfg.tile_oc <= conv2d_nchwc.registers(lanes)


@settings(max_examples=12, deadline=None)
@given(
    c=st.sampled_from([3, 8, 16]),
    ocb=st.integers(1, 2),
    h=st.integers(3, 12),
    w=st.integers(3, 12),
    k=st.sampled_from([1, 3]),
    stride=st.integers(1, 2),
    pad=st.integers(0, 1),
    seed=st.integers(0, 10**6),
)
def test_im2col_nchwc_matches_reference(c, ocb, h, w, k, stride, pad, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((ocb * 8, c, k, k)).astype(np.float32)
    attrs = ConvAttrs((stride, stride), (pad,) * 4, (1, 1))
    ow = conv_output_size(w, k, stride, 2 * pad, 1)
    cfg = conv2d_nchwc.default(ow, ocb, 16, block=8)
    got, want = run_template(x, wt, attrs, c if c < 8 else 8, 8, cfg, epilogue=True, algorithm="im2col")
    assert_close(got, want, rtol=1e-4, atol=1e-4)


@settings(max_examples=15, deadline=None)
@given(
    groups=st.integers(2, 4),
    in_blocks=st.integers(1, 2),
    out_blocks=st.integers(1, 2),
    b=st.sampled_from([4, 8, 16]),
    h=st.integers(3, 12),
    w=st.integers(3, 13),
    k=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    seed=st.integers(0, 10**6),
)
@example(groups=2, in_blocks=3, out_blocks=8, b=16, h=12, w=12, k=3, stride=1, seed=0)  # AlexNet's conv4, smaller
def test_grouped_nchwc_matches_reference(groups, in_blocks, out_blocks, b, h, w, k, stride, seed):
    """Groups of whole blocks: each output block reads its own group's input blocks (a tile of output blocks
    may straddle two groups)."""
    pad = k // 2
    rng = np.random.default_rng(seed)
    c, oc = groups * in_blocks * b, groups * out_blocks * b
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((oc, c // groups, k, k)).astype(np.float32)
    attrs = ConvAttrs((stride, stride), (pad,) * 4, (1, 1), groups=groups)
    ow = conv_output_size(w, k, stride, 2 * pad, 1)
    space = conv2d_nchwc.space(ow, oc // b)
    r = random.Random(seed)
    cfg = conv2d_nchwc.Config(**{name: r.choice(values) for name, values in space.items()})
    got, want = run_template(x, wt, attrs, b, b, cfg, epilogue=True)
    assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,chunk", [(1, 2), (3, 4), (3, 3)])  # 3 does not divide the 8 input blocks: a tail
def test_k_chunked_reduction_matches_reference(k, chunk):
    """The reduction in chunks of input blocks, each run over all the tile's rows, partial sums kept between."""
    rng = np.random.default_rng(k * 10 + chunk)
    x = rng.standard_normal((1, 64, 7, 7)).astype(np.float32)
    wt = rng.standard_normal((32, 64, k, k)).astype(np.float32)
    attrs = ConvAttrs((1, 1), (k // 2,) * 4, (1, 1))
    cfg = conv2d_nchwc.Config(tile_ow=7, tile_oc=2, k_chunk=chunk)
    got, want = run_template(x, wt, attrs, 8, 8, cfg, epilogue=True)
    assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_k_chunk_only_for_large_weight_slabs():
    cfg = conv2d_nchwc.Config(tile_ow=7, tile_oc=2)
    assert conv2d_nchwc.k_chunk(cfg, 2048 * 512 * 4, 32, 128) == 8  # ResNet-50's 2048→512 1x1: 256 KB per tile
    assert conv2d_nchwc.k_chunk(cfg, 256 * 1024 * 4, 64, 16) == 0  # 256→1024: 32 KB per tile
    assert conv2d_nchwc.k_chunk(conv2d_nchwc.Config(7, 2, rows_outer=True), 2048 * 512 * 4, 32, 128) == 0


@pytest.mark.parametrize("lanes", [16, 8])
def test_a_prime_width_takes_a_partial_tile_only_in_a_pointwise_conv(lanes):
    """SqueezeNet's 13-wide 1x1 convs: four columns (a guarded partial row) × as many channel blocks as the
    registers hold, not 13 columns × one block nor 8 × 2 (1.3-1.6× slower on Zen 5); under a 3x3 window the guard
    cost more than it saved, so 13 × 1 stays."""
    budget = min(conv2d_nchwc.registers(lanes), 21)
    for ocb in (63, 16, 4, 12, 3):
        cfg = conv2d_nchwc.default(13, ocb, lanes, pointwise=True)
        fits = [d for d in conv2d_nchwc.space(13, ocb)["tile_oc"] if 4 * d <= budget]
        assert cfg.tile_ow == 4 and cfg.tile_oc == max(fits), (ocb, cfg)
        assert cfg.tile_ow in conv2d_nchwc.space(13, ocb)["tile_ow"]
        windowed = conv2d_nchwc.default(13, ocb, lanes)
        assert windowed.tile_ow * windowed.tile_oc <= conv2d_nchwc.registers(lanes)
        if lanes == 16:
            assert windowed.tile_ow % 13 == 0 or windowed.tile_ow == 13 or windowed.tile_oc == 1, windowed
    assert conv2d_nchwc.default(13, 16, 16, pointwise=True) == conv2d_nchwc.Config(tile_ow=4, tile_oc=4)
    assert conv2d_nchwc.default(13, 16, 8, pointwise=True) == conv2d_nchwc.Config(tile_ow=4, tile_oc=2)
    one = conv2d_nchwc.default(13, 1, lanes, pointwise=True)  # one block: the whole row, or as much as fits
    assert one.tile_oc == 1 and one.tile_ow == min(13, conv2d_nchwc.registers(lanes)), one
    for ow in (14, 28, 56, 7):  # a width with a divisor of 4 or more (or one that fits whole) keeps its rule
        if lanes == 8 and ow >= 14:
            continue  # AVX2's guarded 3 x 4 (below)
        assert conv2d_nchwc.default(ow, 16, lanes, pointwise=True) == conv2d_nchwc.default(ow, 16, lanes), ow


@pytest.mark.parametrize("ow, ocb, pointwise, want", [
    (14, 128, True, (3, 4)),  # ResNet-50's 14x14 1x1s: were 2 x 4
    (28, 64, True, (3, 4)),  # its 28x28 1x1s: were 4 x 2
    (56, 8, True, (3, 4)),  # 56x56: were 4 x 2
    (14, 128, False, (2, 4)),  # under a 3x3 window the guard costs more: unchanged
    (13, 8, True, (4, 2)),  # 13 wide would waste 2 columns in 15: the prime-width rule
    (14, 6, True, (2, 3)),  # channel blocks 4 does not divide
    (12, 16, True, (6, 2)),  # a width with a 12-accumulator divisor tile keeps it
    (7, 64, True, (4, 2)),
])
def test_avx2_pointwise_convs_take_12_accumulators_in_a_guarded_3_column_tile(ow, ocb, pointwise, want):
    """Power-of-two channels and planes of 7 · 2^k leave no 12-accumulator tile that divides both on AVX2, and 8
    leave 4 of its 16 registers idle: a 1x1 conv at least 14 wide takes 3 columns (the last tile guarded) × 4
    blocks, in the space only where it is this rule's (AVX2, pointwise, ungrouped), so other records stand."""
    cfg = conv2d_nchwc.default(ow, ocb, 8, block=8, pointwise=pointwise)
    assert (cfg.tile_ow, cfg.tile_oc) == want
    assert (3 in conv2d_nchwc.space(ow, ocb, three=True)["tile_ow"]) and (
        ow % 3 == 0 or 3 not in conv2d_nchwc.space(ow, ocb)["tile_ow"])
    assert conv2d_nchwc.default(ow, ocb // 2 or 1, 16, block=16, pointwise=pointwise).tile_ow != 3 or ow % 3 == 0


@pytest.mark.parametrize("w", [14, 16, 28])
def test_the_guarded_3_column_tile_matches_reference(w):
    """The last tile of a row holds 2, 1 or 1 real columns of 3: its guard must keep it inside the row."""
    rng = np.random.default_rng(w)
    x = rng.standard_normal((1, 16, 3, w)).astype(np.float32)
    wt = rng.standard_normal((32, 16, 1, 1)).astype(np.float32)
    attrs = ConvAttrs(strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1)
    cfg = conv2d_nchwc.default(w, 4, 8, block=8, pointwise=True)
    assert (cfg.tile_ow, cfg.tile_oc) == (3, 4)
    got, want = run_template(x, wt, attrs, 8, 8, cfg, epilogue=True)
    assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ow, ocb, want", [
    (14, 32, (2, 4)),  # ResNet-50's stage 3: was 7 x 1
    (7, 64, (4, 2)),  # stage 4, a guarded partial row: was 7 x 1
    (27, 4, (3, 4)),  # SqueezeNet's 27-wide fire modules: was 9 x 1
    (111, 8, (3, 4)),  # SqueezeNet's first conv: was 12 x 1
    (13, 24, (4, 2)),  # a 13-wide 3x3: was 12 x 1
    (56, 8, (4, 2)),  # a width with a divisor of 4-6 keeps the general rule
    (7, 1, (7, 1)),  # one block: the whole row
])
def test_avx2_tiles_keep_several_channel_blocks(ow, ocb, want):
    """With AVX2's 16 registers a width without a divisor of 4-6 took a whole row of one channel block, one
    broadcast load per FMA; Zen 3's searches (2026-12-03) chose 2-4 columns x 2-4 blocks, 1.1-2.2x faster."""
    cfg = conv2d_nchwc.default(ow, ocb, 8, block=8)
    assert (cfg.tile_ow, cfg.tile_oc) == want
    space = conv2d_nchwc.space(ow, ocb)
    assert cfg.tile_ow in space["tile_ow"] and cfg.tile_oc in space["tile_oc"]
    assert cfg.tile_ow * cfg.tile_oc <= conv2d_nchwc.registers(8)


def test_avx512_tiles_are_unchanged_by_the_avx2_rule():
    assert conv2d_nchwc.default(14, 32, 16, block=16) == conv2d_nchwc.Config(tile_ow=7, tile_oc=2)
    assert conv2d_nchwc.default(7, 64, 16, block=16) == conv2d_nchwc.Config(tile_ow=7, tile_oc=2)


@pytest.mark.parametrize("n, h, w, tile_ow, chunk, rows, epilogue", [
    (1, 7, 7, 3, 0, False, True),  # ResNet-50's stage 4: 49 = 16 tiles and a 1-column tail
    (1, 14, 14, 3, 0, False, False),  # no epilogue: the copy out is re-indexed too
    (2, 7, 7, 3, 2, False, True),  # a batch, and the reduction in chunks over the whole plane
    (1, 5, 9, 4, 0, False, True),  # a tail that is not one column
    (1, 1, 6, 3, 0, False, True),  # whole tiles, no guard
    (2, 7, 9, 3, 0, True, True),  # tiles of the plane in parallel (a batch: the tiles of both images)
    (1, 4, 4, 3, 0, True, False),
])
def test_the_flat_plane_matches_reference(n, h, w, tile_ow, chunk, rows, epilogue):
    """A 1x1 conv's plane as one row (h * W + w): tiles cross row ends, the one guarded tail is the plane's."""
    rng = np.random.default_rng(h * w + chunk)
    x = rng.standard_normal((n, 32, h, w)).astype(np.float32)
    wt = rng.standard_normal((32, 32, 1, 1)).astype(np.float32)
    attrs = ConvAttrs(strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1)
    cfg = conv2d_nchwc.Config(tile_ow=tile_ow, tile_oc=4, k_chunk=chunk, rows_outer=rows, flat=True)
    got, want = run_template(x, wt, attrs, 8, 8, cfg, epilogue=epilogue)
    assert_close(got, want, rtol=1e-4, atol=1e-4)


def _conv_task(c, oc, hw, k, stride, target):
    from onnx import TensorProto, helper, numpy_helper

    from kiln.config import Options
    from kiln.driver import model_tasks

    w = np.zeros((oc, c, k, k), np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[k // 2] * 4, strides=[stride] * 2)
    out = (hw + 2 * (k // 2) - k) // stride + 1
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, oc, out, out])],
                          [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return next(t for t in model_tasks(proto, Options(target=target, shipped_logs=False))
                if t.template.name == "x86.conv2d_nchwc")


@pytest.mark.parametrize("c, oc, hw, k, stride, flat, rows", [
    (512, 2048, 7, 1, 1, True, False),  # ResNet-50's stage 4: was 4 x 2 per 7-wide row
    (256, 1024, 14, 1, 1, True, False),
    (16, 96, 112, 1, 1, True, True),  # MobileNetV2's first expansion: tiles in parallel, its 6 KB of weights in L1
    (32, 192, 28, 1, 1, True, True),
    (64, 256, 56, 1, 1, False, True),  # rows in parallel, 64 KB of weights: per row, not flat
    (1024, 2048, 14, 1, 2, None, False),  # stride 2: output (h, w) does not read input (h, w), no knob
    (256, 256, 14, 3, 1, None, False),  # a 3x3 window
])
def test_avx2_1x1_convs_run_their_plane_flat(c, oc, hw, k, stride, flat, rows):
    from kiln.schedules.target_info import target_info

    task = _conv_task(c, oc, hw, k, stride, "x86-avx2")
    cfg = task.template.default_config(task.workload, target_info(task.target))
    assert cfg.get("flat") == flat and cfg.get("rows_outer", False) == rows, cfg
    if flat:
        assert (cfg["tile_ow"], cfg["tile_oc"]) == (3, 4)
        assert task.lower(cfg).schedule.startswith("nchwc(flat,")
    space = task.template.space(task.workload, target_info(task.target))
    assert cfg in space
    assert any(c.get("flat") for c in space) == (k == 1 and stride == 1)  # the knob where the plane can be a row
    avx512 = _conv_task(c, oc, hw, k, stride, "x86-avx512")
    assert not avx512.template.default_config(avx512.workload, target_info(avx512.target)).get("flat")


@pytest.mark.parametrize("hw, cores, rows", [(7, 2, False), (7, 1, True), (14, 2, True), (9, 4, False), (28, 3, True)])
def test_depthwise_rows_in_parallel_only_where_they_share_out(hw, cores, rows):
    """MobileNetV2's 7-row depthwise convs split 4:3 by rows on 2 cores: by channel blocks instead (0.58-0.70× the
    time on Zen 3); an even split, or many rows per core, keeps the rows."""
    import dataclasses

    from onnx import TensorProto, helper, numpy_helper

    from kiln.config import Options
    from kiln.driver import model_tasks
    from kiln.schedules.target_info import target_info

    c = 96
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4, group=c)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, hw, hw])],
                          [numpy_helper.from_array(np.zeros((c, 1, 3, 3), np.float32), "w")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    task = next(t for t in model_tasks(proto, Options(target="x86-avx2", shipped_logs=False))
                if t.template.name == "x86.depthwise_nchwc")
    info = dataclasses.replace(target_info(task.target), cores=cores)
    assert task.template.default(task.workload, info)["rows_outer"] is rows
