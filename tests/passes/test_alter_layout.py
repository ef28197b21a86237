"""alter_layout: conv chains move to NCHW[b]c with few transforms; the graph still computes the same thing."""

import numpy as np
import pytest
from kiln.frontend import from_onnx
from kiln.ir import Call, Function, IRModule, Tuple, call, const, var
from kiln.ir.interpreter import run_module
from kiln.ir.ops.blocked import CONV2D_NCHWC, LAYOUT_TRANSFORM, POOL2D_NCHWC
from kiln.ir.ops.conv import CONV2D
from kiln.ir.ops.elementwise import ADD, CLIP, RELU
from kiln.ir.ops.pool import GLOBAL_AVG_POOL, MAX_POOL
from kiln.ir.ops.transform import CONCATENATE
from kiln.ir.visitor import post_order
from kiln.passes import O2, run
from kiln.passes.alter_layout import alter_layout, count_layout_transforms

from kiln import zoo

from ..tolerances import assert_close
from .graphs import bias, conv, resnet_basic_block

RNG = np.random.default_rng(0)


def ops_of(mod):
    return [e.op for e in post_order(mod.main.body) if isinstance(e, Call)]


def same_results(before: IRModule, after: IRModule, seed: int = 0):
    feeds = {
        p.name: np.random.default_rng(seed).standard_normal(p.ttype.shape).astype(np.float32)
        for p in before.main.params
    }
    for g, w in zip(run_module(after, **feeds), run_module(before, **feeds)):
        assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_basic_block_goes_blocked_with_two_transforms():
    before = run(resnet_basic_block(channels=16, size=6), [p for p in O2[:-2] if p is not alter_layout])
    after = alter_layout(before)
    ops = ops_of(after)
    assert ops.count(CONV2D_NCHWC) == 2 and CONV2D not in ops
    assert (
        count_layout_transforms(after) == 2
    )  # in at the input, out at the output; the residual add stays blocked
    same_results(before, after)


def test_block_follows_the_target_and_falls_back_to_smaller_blocks():
    x = var("x", "f32[1, 24, 5, 7]")
    mod = IRModule({"main": Function((x,), call(RELU, bias(conv(x, 24, 24), 24)))})
    for lanes, want in ((16, 8), (8, 8), (4, 4)):
        after = alter_layout(mod.with_attrs(layout_block=lanes))
        convs = [e for e in post_order(after.main.body) if isinstance(e, Call) and e.op is CONV2D_NCHWC]
        assert convs[0].attrs.out_block == want
        same_results(mod, after)
    plain = mod.with_attrs(layout_block=0)
    assert alter_layout(plain) is plain


def test_adjacent_transforms_cancel_and_nchw_ops_get_one_transform():
    x = var("x", "f32[1, 16, 8, 8]")
    a = call(RELU, conv(x, 16, 16, seed=1))
    pooled = call(MAX_POOL, a, kernel=(2, 2), strides=(2, 2), padding=(0, 0, 0, 0), dilation=(1, 1))
    b = conv(pooled, 16, 32, seed=2)
    gap = call(GLOBAL_AVG_POOL, b)
    mod = IRModule({"main": Function((x,), gap)})
    after = alter_layout(mod)
    assert count_layout_transforms(after) == 2
    assert POOL2D_NCHWC in ops_of(after)
    same_results(mod, after)


def test_grouped_conv_and_odd_channels_stay_nchw():
    x = var("x", "f32[1, 12, 6, 6]")
    w = const(RNG.standard_normal((12, 4, 3, 3)).astype(np.float32))
    grouped = call(CONV2D, x, w, strides=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=3)
    odd = conv(grouped, 12, 6)  # 6 output channels: no block of 4 or more divides them
    mod = IRModule({"main": Function((x,), odd)})
    after = alter_layout(mod)
    assert after is mod


def test_depthwise_concat_and_clip_stay_blocked():
    x = var("x", "f32[1, 16, 7, 7]")
    a = conv(x, 16, 16, k=1, seed=1)
    dw = call(
        CONV2D,
        a,
        const(RNG.standard_normal((16, 1, 3, 3)).astype(np.float32)),
        strides=(2, 2),
        padding=(1, 1, 1, 1),
        dilation=(1, 1),
        groups=16,
    )
    c = call(CLIP, dw, min=0.0, max=6.0)
    cat = call(CONCATENATE, c, call(RELU, c), axis=1)
    out = conv(cat, 32, 16, seed=3)
    mod = IRModule({"main": Function((x,), call(ADD, out, const(np.float32(0.5))))})
    after = alter_layout(mod)
    assert count_layout_transforms(after) == 2
    assert [op for op in ops_of(after) if op is CONV2D_NCHWC].__len__() == 3
    same_results(mod, after)


@pytest.mark.parametrize("name,most", [("resnet50", 2), ("mobilenet_v2", 2), ("squeezenet", 2)])
def test_zoo_models_keep_few_transforms(name, most):
    mod = run(from_onnx(zoo.zoo_model(name)), O2[:-2])  # up to fusion
    assert count_layout_transforms(mod) <= most
    assert LAYOUT_TRANSFORM in ops_of(mod)


def test_squeeze_excitation_scale_stays_blocked():
    """x * sigmoid(conv(global_pool(x))): a per-(batch, channel) [N, C, 1, 1] operand broadcasts in NCHWc."""
    from kiln.ir.ops.elementwise import MULTIPLY, OPS

    x = var("x", "f32[2, 16, 6, 6]")
    a = call(RELU, conv(x, 16, 16, seed=1))
    se = call(OPS["sigmoid"], conv(call(GLOBAL_AVG_POOL, a), 16, 16, k=1, seed=2))
    out = conv(call(MULTIPLY, a, se), 16, 16, seed=3)
    mod = IRModule({"main": Function((x,), out)})
    after = alter_layout(mod)
    assert count_layout_transforms(after) == 2
    same_results(mod, after)


def test_channels_pad_to_a_whole_block_and_are_cropped_on_the_way_out():
    """120 channels become 128 (8 zero channels: cheaper than 8-wide vectors); the padding never shows: the
    next conv gets zero weights for it, an op that could turn zeros into inf/NaN (divide) sees NCHW, and the
    model's output is cropped back to 120."""
    from kiln.ir.ops.elementwise import DIVIDE

    x = var("x", "f32[1, 16, 5, 5]")
    a = call(RELU, bias(conv(x, 16, 120, seed=1), 120, seed=2))
    pooled = call(MAX_POOL, a, kernel=(2, 2), strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1))
    b = conv(pooled, 120, 16, seed=3)
    c = call(DIVIDE, a, const(np.full((120, 1, 1), 2.0, np.float32)))
    mod = IRModule({"main": Function((x,), Tuple((b, c)))})
    after = alter_layout(mod)
    convs = [e for e in post_order(after.main.body) if isinstance(e, Call) and e.op is CONV2D_NCHWC]
    assert convs[0].ttype.shape == (1, 8, 5, 5, 16) and convs[1].args[1].ttype.shape[1:2] == (8,)
    crops = [e for e in post_order(after.main.body) if isinstance(e, Call) and e.op is LAYOUT_TRANSFORM
             and e.attrs.channels]
    assert crops and crops[0].ttype.shape == (1, 120, 5, 5)
    same_results(mod, after)


@pytest.mark.parametrize("k,oc,tile,lanes,blocks", [
    (1, 1000, 4, 8, 128),  # AVX2: 125 blocks admit no 4-block tile; 24 zero channels (2.4%) make 128
    (1, 1000, 1, 8, 125),  # a target whose tile is one block keeps 125
    (1, 1000, 1, 16, 63),  # AVX-512: 1000 → 1008, a whole block, as before
    (3, 1000, 4, 8, 125),  # a 3x3 window: not the flat pointwise tile's conv
    (1, 120, 4, 8, 15),  # 15 → 16 blocks would add 6.7%
])
def test_pointwise_channels_pad_to_whole_register_tiles(k, oc, tile, lanes, blocks):
    """SqueezeNet's 512→1000 1x1 conv: padded to whole 4-block tiles on AVX2 where that adds at most 1/32
    more work; the pooled output is cropped back to the real channels."""
    x = var("x", "f32[1, 16, 5, 5]")
    y = call(GLOBAL_AVG_POOL, call(RELU, bias(conv(x, 16, oc, k=k, seed=1), oc, seed=2)))
    mod = IRModule({"main": Function((x,), y)})
    after = alter_layout(mod.with_attrs(layout_block=lanes, conv_channel_tile=tile))
    convs = [e for e in post_order(after.main.body) if isinstance(e, Call) and e.op is CONV2D_NCHWC]
    assert convs[0].ttype.shape[1] == blocks and after.main.body.ttype.shape == (1, oc, 1, 1)
    same_results(mod, after)


def test_the_driver_gives_the_pass_the_targets_channel_tile():
    from kiln.codegen.target import resolve_target
    from kiln.config import Options
    from kiln.driver import prepare

    x = var("x", "f32[1, 16, 5, 5]")
    mod = IRModule({"main": Function((x,), conv(x, 16, 16))})
    tiles = {name: prepare(mod, resolve_target(name), Options()).attrs["conv_channel_tile"]
             for name in ("x86-avx2", "x86-avx512")}
    assert tiles == {"x86-avx2": 4, "x86-avx512": 1}


def test_an_image_input_is_read_as_nchw_by_the_first_conv():
    x = var("x", "f32[1, 3, 9, 9]")
    y = conv(call(RELU, conv(x, 3, 16, seed=1)), 16, 16, seed=2)
    mod = IRModule({"main": Function((x,), y)})
    after = alter_layout(mod)
    first = next(e for e in post_order(after.main.body) if isinstance(e, Call) and e.op is CONV2D_NCHWC)
    assert first.args[0] is after.main.params[0]  # no layout_transform kernel before it
    assert count_layout_transforms(after) == 1
    same_results(mod, after)


@pytest.mark.parametrize("groups,channels,blocked", [(2, 64, True), (4, 32, False)])
def test_grouped_conv_goes_blocked_when_groups_are_whole_blocks(groups, channels, blocked):
    """Two groups of 32 channels are whole 16-lane blocks: NCHW16c with one transform each way; four groups of
    8 channels are not: the conv stays NCHW. Either way the graph computes the same thing."""
    x = var("x", f"f32[1, {channels}, 9, 9]")
    w = const(RNG.standard_normal((channels, channels // groups, 3, 3)).astype(np.float32))
    y = call(RELU, call(CONV2D, x, w, strides=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=groups))
    before = IRModule({"main": Function((x,), y)}, attrs={"layout_block": 16})
    after = alter_layout(before)
    convs = [op for op in ops_of(after) if op in (CONV2D, CONV2D_NCHWC)]
    assert convs == [CONV2D_NCHWC if blocked else CONV2D]
    assert count_layout_transforms(after) == (2 if blocked else 0)
    same_results(before, after)
