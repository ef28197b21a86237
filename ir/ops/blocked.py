"""Blocked channel layouts (NCHW[b]c): the layout_transform op and the NCHWc forms of conv2d and pooling.

In NCHW[b]c a 4-D activation [N, C, H, W] is stored as [N, C/b, H, W, b]: b consecutive channels sit next to
each other, so a kernel loads b output channels as one SIMD vector and broadcasts one input value across them.
`passes/alter_layout` rewrites conv chains into these ops; their references unblock, run the NCHW reference,
block again, so they are checked against the same NumPy code as the ops they replace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.errors import TypeCheckError

from ..op import OpDef, OpPattern, define_compute, register_op
from ..types import TensorType
from . import float_math
from .accumulate import accumulator, cast, cast_stage
from .conv import ConvAttrs, conv_output_size, conv_reference
from .pool import AVG_POOL, GLOBAL_AVG_POOL, MAX_POOL, GlobalPoolAttrs, PoolAttrs, window_count


def layout_name(block: int) -> str:
    return f"NCHW{block}c" if block else "NCHW"


def block_array(x: np.ndarray, b: int) -> np.ndarray:
    """[N, C, H, W] → [N, C/b, H, W, b]."""
    n, c, h, w = x.shape
    return np.ascontiguousarray(x.reshape(n, c // b, b, h, w).transpose(0, 1, 3, 4, 2))


def unblock_array(x: np.ndarray) -> np.ndarray:
    n, cb, h, w, b = x.shape
    return np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3).reshape(n, cb * b, h, w))


def pack_conv_weight(w: np.ndarray, in_block: int, out_block: int) -> np.ndarray:
    """OIHW → [O/ob, I/ib, H, W, ib, ob] (TVM's OIHW[ib]i[ob]o): the ob output channels of one step are one
    vector, and the reduction (input block, kernel row, column, channel in block) walks the weights in memory
    order, so a cold read streams instead of jumping."""
    o, i, kh, kw = w.shape
    return np.ascontiguousarray(
        w.reshape(o // out_block, out_block, i // in_block, in_block, kh, kw).transpose(0, 2, 4, 5, 3, 1)
    )


def unpack_conv_weight(w: np.ndarray) -> np.ndarray:
    ob_n, ib_n, kh, kw, ib, ob = w.shape
    return np.ascontiguousarray(w.transpose(0, 5, 1, 4, 2, 3).reshape(ob_n * ob, ib_n * ib, kh, kw))


# --- layout_transform ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutTransformAttrs:
    src_block: int  # 0: plain NCHW
    dst_block: int
    channels: int = 0  # blocked → NCHW only: keep the first `channels` (drop zero-padded ones); 0 keeps all


def _channels(x: TensorType, block: int, op: str) -> int:
    want = 5 if block else 4
    if x.ndim != want or (block and x.shape[4] != block):
        raise TypeCheckError(f"{op}: expected a {layout_name(block)} tensor, got {x}")
    return x.shape[1] * block if block else x.shape[1]


def _layout_transform_type(x: TensorType, a: LayoutTransformAttrs) -> TensorType:
    c = _channels(x, a.src_block, "layout_transform")
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    if a.channels:
        if a.dst_block or not a.src_block or not 0 < a.channels <= c:
            raise TypeCheckError(f"layout_transform: channels={a.channels} crops only blocked → NCHW, of {x}")
        c = a.channels
    if not a.dst_block:
        return TensorType((n, c, h, w), x.dtype)
    if c % a.dst_block:
        raise TypeCheckError(f"layout_transform: {c} channels do not split into blocks of {a.dst_block}")
    return TensorType((n, c // a.dst_block, h, w, a.dst_block), x.dtype)


def _layout_transform_reference(x: np.ndarray, a: LayoutTransformAttrs) -> np.ndarray:
    plain = unblock_array(x) if a.src_block else x
    if a.channels:
        plain = plain[:, : a.channels]
    return block_array(plain, a.dst_block) if a.dst_block else np.ascontiguousarray(plain)


LAYOUT_TRANSFORM = register_op(
    OpDef(
        "layout_transform",
        LayoutTransformAttrs,
        _layout_transform_type,
        _layout_transform_reference,
        OpPattern.INJECTIVE,
    )
)


@define_compute(LAYOUT_TRANSFORM)
def _layout_transform_compute(x, a: LayoutTransformAttrs):
    from tvm import te

    out = _layout_transform_type(TensorType(tuple(int(d) for d in x.shape), str(x.dtype)), a)
    sb, db = a.src_block, a.dst_block

    def read(n, c, h, w):
        return x[n, c // sb, h, w, c % sb] if sb else x[n, c, h, w]

    if db:
        return te.compute(
            out.shape, lambda n, cb, h, w, ci: read(n, cb * db + ci, h, w), name="layout_transform"
        )
    return te.compute(out.shape, lambda n, c, h, w: read(n, c, h, w), name="layout_transform")


# --- conv2d in NCHWc ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvNCHWcAttrs:
    """ConvAttrs of the NCHW conv it replaces, plus the output block. groups is 1; the channel count (depthwise,
    where the input block must equal the output block); or any g whose groups are whole blocks on both sides
    (AlexNet's groups=2, ResNeXt's later stages), so each output block reads the input blocks of its group."""

    conv: ConvAttrs
    out_block: int
    algorithm: str = "direct"  # or "im2col": gather every window into a matrix first, then a plain GEMM


def _as_one_block(x: TensorType) -> TensorType:
    """Plain NCHW data is one block of all its channels: a first conv with 3 input channels reads the model's
    input directly, with no layout_transform kernel before it."""
    return TensorType((x.shape[0], 1, x.shape[2], x.shape[3], x.shape[1]), x.dtype) if x.ndim == 4 else x


def _conv_nchwc_type(x: TensorType, w: TensorType, a: ConvNCHWcAttrs) -> TensorType:
    op = "nn.conv2d_nchwc"
    x = _as_one_block(x)
    if x.ndim != 5 or w.ndim != 6 or w.shape[5] != a.out_block:
        raise TypeCheckError(
            f"{op}: expected NCHW[b]c data and [O/{a.out_block}, I/ib, KH, KW, ib, {a.out_block}] "
            f"weights, got {x} and {w}"
        )
    c = x.shape[1] * x.shape[4]
    g = a.conv.groups
    if g == c and g != 1 and (w.shape[1] * w.shape[4] != 1 or x.shape[4] != a.out_block):
        raise TypeCheckError(f"{op}: a depthwise conv needs equal input and output blocks; got {a} on {x}")
    if 1 < g < c and not _whole_block_groups(x, w, a):
        raise TypeCheckError(
            f"{op}: groups={g} must split input and output channels into whole blocks; got {x} and {w}"
        )
    if g == 1 and (w.shape[1] != x.shape[1] or w.shape[4] != x.shape[4]):
        raise TypeCheckError(
            f"{op}: data {x} has {c} channels in blocks of {x.shape[4]}; weight {w} expects "
            f"{w.shape[1] * w.shape[4]} in blocks of {w.shape[4]}"
        )
    oh = conv_output_size(
        x.shape[2], w.shape[2], a.conv.strides[0], a.conv.padding[0] + a.conv.padding[2], a.conv.dilation[0]
    )
    ow = conv_output_size(
        x.shape[3], w.shape[3], a.conv.strides[1], a.conv.padding[1] + a.conv.padding[3], a.conv.dilation[1]
    )
    if min(oh, ow) < 1:
        raise TypeCheckError(f"{op}: kernel larger than padded input {x}")
    return TensorType((x.shape[0], w.shape[0], oh, ow, a.out_block), a.conv.out_dtype or x.dtype)


def _whole_block_groups(x: TensorType, w: TensorType, a: ConvNCHWcAttrs) -> bool:
    g, c, oc = a.conv.groups, x.shape[1] * x.shape[4], w.shape[0] * w.shape[5]
    return (c % g == 0 and oc % g == 0 and w.shape[4] == x.shape[4] and w.shape[1] * w.shape[4] == c // g
            and (c // g) % x.shape[4] == 0 and (oc // g) % a.out_block == 0)


def is_grouped(a: ConvNCHWcAttrs, channels: int) -> bool:
    """Grouped but not depthwise: each output block reads only its group's input blocks."""
    return 1 < a.conv.groups < channels


def _conv_nchwc_reference(x: np.ndarray, w: np.ndarray, a: ConvNCHWcAttrs) -> np.ndarray:
    plain = x if x.ndim == 4 else unblock_array(x)
    return block_array(conv_reference(plain, unpack_conv_weight(w), a.conv), a.out_block)


def _conv_nchwc_flops(x: TensorType, w: TensorType, a: ConvNCHWcAttrs) -> int:
    out = _conv_nchwc_type(x, w, a)
    return 2 * out.size * int(np.prod(w.shape[1:5]))


CONV2D_NCHWC = register_op(
    OpDef(
        "nn.conv2d_nchwc",
        ConvNCHWcAttrs,
        _conv_nchwc_type,
        _conv_nchwc_reference,
        OpPattern.OUT_ELEMWISE_FUSABLE,
        flops=_conv_nchwc_flops,
    )
)


def pad_nchwc(x, pads: tuple[int, int, int, int], value=0.0, name: str = "pad"):
    """Zero-pad H and W of a 5-D tensor; a separate stage, so a schedule can materialize it once."""
    from tvm import te
    from tvm import tirx as tir

    t, left, b, r = pads
    if not any(pads):
        return x
    n, cb, h, w, ci = (int(d) for d in x.shape)

    def at(i0, i1, i2, i3, i4):
        inside = tir.all(i2 >= t, i2 < h + t, i3 >= left, i3 < w + left)
        return tir.if_then_else(inside, x[i0, i1, i2 - t, i3 - left, i4], tir.const(value, x.dtype))

    return te.compute((n, cb, h + t + b, w + left + r, ci), at, name=name)


@define_compute(CONV2D_NCHWC)
def _conv_nchwc_compute(x, w, a: ConvNCHWcAttrs):
    """float16/bfloat16 convs sum in float32 and round once in a `conv2d_nchwc_round` stage the templates inline
    into the epilogue (accumulate.py); float32 ones have no such stage."""
    acc = a.conv.out_dtype or accumulator(x.dtype)
    return cast_stage(_conv_nchwc_sum(x, w, a, acc), a.conv.out_dtype or str(x.dtype), "conv2d_nchwc_round")


def _conv_nchwc_sum(x, w, a: ConvNCHWcAttrs, acc: str):
    from tvm import te

    c = a.conv
    out = _conv_nchwc_type(
        TensorType(tuple(int(d) for d in x.shape), str(x.dtype)),
        TensorType(tuple(int(d) for d in w.shape), str(w.dtype)),
        a,
    )
    if len(x.shape) == 4:  # plain NCHW: read as one block (inlined into the padding or the conv)
        plain = x
        n_, c_, h_, w_ = (int(d) for d in x.shape)
        x = te.compute((n_, 1, h_, w_, c_), lambda n, _, h, ww, ci: plain[n, ci, h, ww], name="nchw_as_block")
    xp = pad_nchwc(x, (c.padding[0], c.padding[1], c.padding[2], c.padding[3]))
    (sh, sw), (dh, dw) = c.strides, c.dilation
    ry, rx = te.reduce_axis((0, int(w.shape[2])), name="ry"), te.reduce_axis((0, int(w.shape[3])), name="rx")
    if c.groups == 1 and a.algorithm == "im2col":
        ib, cb, kh, kw = int(x.shape[4]), int(x.shape[1]), int(w.shape[2]), int(w.shape[3])
        cols = te.compute(
            (out.shape[0], out.shape[2], out.shape[3], cb, kh, kw, ib),
            lambda n, oh, ow, c_, ky, kx, ci: xp[n, c_, oh * sh + ky * dh, ow * sw + kx * dw, ci],
            name="im2col",
        )
        rco, rci = te.reduce_axis((0, cb), name="rco"), te.reduce_axis((0, ib), name="rci")
        return te.compute(
            out.shape,
            lambda n, oc, oh, ow, ob: te.sum(
                cols[n, oh, ow, rco, ry, rx, rci].astype(acc) * w[oc, rco, ry, rx, rci, ob].astype(acc),
                axis=[rco, ry, rx, rci],
            ),
            name="conv2d_nchwc",
        )
    if is_grouped(a, int(x.shape[1]) * int(x.shape[4])):
        ib, in_blocks = int(x.shape[4]), int(w.shape[1])  # the input blocks of one group
        per_group = int(w.shape[0]) // c.groups  # output blocks of one group
        rco, rci = te.reduce_axis((0, in_blocks), name="rco"), te.reduce_axis((0, ib), name="rci")
        return te.compute(
            out.shape,
            lambda n, oc, oh, ow, ob: te.sum(
                xp[n, oc // per_group * in_blocks + rco, oh * sh + ry * dh, ow * sw + rx * dw, rci].astype(acc)
                * w[oc, rco, ry, rx, rci, ob].astype(acc),
                axis=[rco, ry, rx, rci],
            ),
            name="conv2d_nchwc",
        )
    if c.groups == 1:
        ib = int(x.shape[4])
        rco, rci = te.reduce_axis((0, int(x.shape[1])), name="rco"), te.reduce_axis((0, ib), name="rci")
        return te.compute(
            out.shape,
            lambda n, oc, oh, ow, ob: te.sum(
                xp[n, rco, oh * sh + ry * dh, ow * sw + rx * dw, rci].astype(acc)
                * w[oc, rco, ry, rx, rci, ob].astype(acc),
                axis=[rco, ry, rx, rci],
            ),
            name="conv2d_nchwc",
        )
    return te.compute(
        out.shape,
        lambda n, cb, oh, ow, cc: te.sum(
            xp[n, cb, oh * sh + ry * dh, ow * sw + rx * dw, cc].astype(acc)
            * w[cb, 0, ry, rx, 0, cc].astype(acc),
            axis=[ry, rx],
        ),
        name="depthwise_nchwc",
    )


# --- pooling in NCHWc ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolNCHWcAttrs:
    kind: str  # "max" | "avg"
    pool: PoolAttrs


_POOL_OPS = {"max": MAX_POOL, "avg": AVG_POOL}


def _pool_nchwc_type(x: TensorType, a: PoolNCHWcAttrs) -> TensorType:
    if x.ndim != 5 or len(a.pool.kernel) != 2:
        raise TypeCheckError(f"nn.pool2d_nchwc: expected a 2-D pool of an NCHW[b]c tensor, got {x}")
    plain = _POOL_OPS[a.kind].infer_type([TensorType(x.shape[:4], x.dtype)], a.pool)
    return TensorType(plain.shape + (x.shape[4],), x.dtype)


def _pool_nchwc_reference(x: np.ndarray, a: PoolNCHWcAttrs) -> np.ndarray:
    return block_array(_POOL_OPS[a.kind].evaluate([unblock_array(x)], a.pool), x.shape[4])


POOL2D_NCHWC = register_op(
    OpDef(
        "nn.pool2d_nchwc",
        PoolNCHWcAttrs,
        _pool_nchwc_type,
        _pool_nchwc_reference,
        OpPattern.OUT_ELEMWISE_FUSABLE,
    )
)


@define_compute(POOL2D_NCHWC)
def _pool_nchwc_compute(x, a: PoolNCHWcAttrs):
    from tvm import te

    p = a.pool
    out = _pool_nchwc_type(TensorType(tuple(int(d) for d in x.shape), str(x.dtype)), a)
    h, w = int(x.shape[2]), int(x.shape[3])
    (sh, sw), (dh, dw) = p.strides, p.dilation
    # the ceil-mode tail may reach past the end pads: pad far enough for every window
    need_h = (out.shape[2] - 1) * sh + (p.kernel[0] - 1) * dh + 1
    need_w = (out.shape[3] - 1) * sw + (p.kernel[1] - 1) * dw + 1
    pads = (p.padding[0], p.padding[1], max(need_h - h - p.padding[0], 0), max(need_w - w - p.padding[1], 0))
    ry, rx = te.reduce_axis((0, p.kernel[0]), name="ry"), te.reduce_axis((0, p.kernel[1]), name="rx")
    if a.kind == "max":
        xp = pad_nchwc(x, pads, value=float("-inf"))
        # bfloat16: the max of values widened to float32, rounded back (exactly), as reduce.py does: TVM 0.27
        # cannot vectorize a bfloat16 max ("Cannot broadcast lanes=16 to 32")
        wide = "float32" if str(x.dtype) == "bfloat16" else str(x.dtype)
        biggest = te.compute(
            out.shape,
            lambda n, cb, oh, ow, cc: float_math.reduce_max(  # NaN-propagating
                cast(xp[n, cb, oh * sh + ry * dh, ow * sw + rx * dw, cc], wide), axis=[ry, rx], from_lowest=True
            ),
            name="max_pool_nchwc",
        )
        return cast_stage(biggest, str(x.dtype), "max_pool_nchwc_round")
    xp, acc = pad_nchwc(x, pads), accumulator(x.dtype)  # float16 window sums in float32, rounded once
    total = te.compute(
        out.shape,
        lambda n, cb, oh, ow, cc: te.sum(cast(xp[n, cb, oh * sh + ry * dh, ow * sw + rx * dw, cc], acc),
                                         axis=[ry, rx]),
        name="pool_sum_nchwc",
    )

    def count(o, k, s, d, pad_begin, size, pad_end):
        return window_count(o * s - pad_begin, k, d, -pad_begin if p.count_include_pad else 0,
                            size + pad_end if p.count_include_pad else size)

    def avg(n, cb, oh, ow, cc):
        cnt = count(oh, p.kernel[0], sh, dh, p.padding[0], h, p.padding[2]) * count(
            ow, p.kernel[1], sw, dw, p.padding[1], w, p.padding[3]
        )
        return cast(total[n, cb, oh, ow, cc] / cnt.astype(acc), str(x.dtype))

    return te.compute(out.shape, avg, name="avg_pool_nchwc")


def _global_avg_nchwc_type(x: TensorType, a: GlobalPoolAttrs) -> TensorType:
    if x.ndim != 5:
        raise TypeCheckError(f"nn.global_avg_pool_nchwc: expected an NCHW[b]c tensor, got {x}")
    return TensorType((x.shape[0], x.shape[1], 1, 1, x.shape[4]), x.dtype)


def _global_avg_nchwc_reference(x: np.ndarray, a: GlobalPoolAttrs) -> np.ndarray:
    return block_array(GLOBAL_AVG_POOL.evaluate([unblock_array(x)], a), x.shape[4])


GLOBAL_AVG_POOL_NCHWC = register_op(
    OpDef(
        "nn.global_avg_pool_nchwc",
        GlobalPoolAttrs,
        _global_avg_nchwc_type,
        _global_avg_nchwc_reference,
        OpPattern.OUT_ELEMWISE_FUSABLE,
    )
)


@define_compute(GLOBAL_AVG_POOL_NCHWC)
def _global_avg_nchwc_compute(x, a: GlobalPoolAttrs):
    from tvm import te

    n, cb, h, w, b = (int(d) for d in x.shape)
    ry, rx = te.reduce_axis((0, h), name="ry"), te.reduce_axis((0, w), name="rx")
    acc = accumulator(x.dtype)  # float16 sums in float32, rounded once (float16 / a Python float is float32)
    total = te.compute(
        (n, cb, 1, 1, b),
        lambda i, c, _y, _x, cc: te.sum(cast(x[i, c, ry, rx, cc], acc), axis=[ry, rx]),
        name="global_sum_nchwc",
    )
    return te.compute(total.shape, lambda *i: cast(total(*i) / float(h * w), str(x.dtype)),
                      name="global_avg_pool_nchwc")
