"""qnn.conv2d: a conv of uint8 activations and int8 weights summed in int32, the core of a quantized conv.

A QDQ model computes conv(dequantize(x_q), dequantize(w_q)); `passes/realize_qdq` rewrites that into this op
on the raw integers, then a per-channel float scale: sum((x_q - zx) * w_q) * sx * sw[o]. The zero point is not
subtracted here: the kernel multiplies the stored bytes as they are (VNNI's vpdpbusd takes unsigned bytes times
signed bytes), and the pass folds -zx * sum(w_q[o]) into a per-channel constant after it. Padding therefore
holds the zero point (the quantized 0.0), not 0.

qnn.conv2d_nchwc is the same conv on NCHW[b]c data with weights packed for a 4-byte dot product per lane:
[O/ob, I/ib, KH, KW, ib/4, ob, 4], so one 32-bit load of the input (4 consecutive channels) broadcasts against
one vector of ob lanes × 4 bytes of weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.errors import TypeCheckError

from ..op import OpDef, OpPattern, define_compute, register_op
from ..types import TensorType
from . import float_math
from .blocked import block_array, pad_nchwc, unblock_array
from .conv import ConvAttrs, conv_output_size, conv_reference

DOT = 4  # bytes one int32 lane sums per instruction (vpdpbusd, sdot/udot)


@dataclass(frozen=True)
class QConvAttrs:
    conv: ConvAttrs  # groups 1
    x_zero_point: int  # the value the padding holds


def _check_operands(op: str, x: TensorType, w: TensorType) -> None:
    """uint8 data (x86: vpdpbusd multiplies unsigned by signed bytes) or int8 (aarch64: sdot, signed by signed)."""
    if str(x.dtype) not in ("uint8", "int8") or str(w.dtype) != "int8":
        raise TypeCheckError(f"{op}: takes uint8 or int8 data and int8 weights, got {x} and {w}")


def _qconv_type(x: TensorType, w: TensorType, a: QConvAttrs) -> TensorType:
    _check_operands("qnn.conv2d", x, w)
    if x.ndim != 4 or w.ndim != 4 or w.shape[1] != x.shape[1] or a.conv.groups != 1:
        raise TypeCheckError(f"qnn.conv2d: expected NCHW data and OIHW weights of groups 1, got {x} and {w}")
    c = a.conv
    oh = conv_output_size(x.shape[2], w.shape[2], c.strides[0], c.padding[0] + c.padding[2], c.dilation[0])
    ow = conv_output_size(x.shape[3], w.shape[3], c.strides[1], c.padding[1] + c.padding[3], c.dilation[1])
    if min(oh, ow) < 1:
        raise TypeCheckError(f"qnn.conv2d: kernel {w} larger than the padded input {x}")
    return TensorType((x.shape[0], w.shape[0], oh, ow), "int32")


def _qconv_reference(x: np.ndarray, w: np.ndarray, a: QConvAttrs) -> np.ndarray:
    c = a.conv
    xp = np.pad(x.astype(np.int64), [(0, 0), (0, 0), (c.padding[0], c.padding[2]), (c.padding[1], c.padding[3])],
                constant_values=a.x_zero_point)
    unpadded = ConvAttrs(c.strides, (0, 0, 0, 0), c.dilation, 1, "int64")
    return conv_reference(xp, w.astype(np.int64), unpadded).astype(np.int32)


def _qconv_flops(x: TensorType, w: TensorType, a: QConvAttrs) -> int:
    return 2 * _qconv_type(x, w, a).size * int(np.prod(w.shape[1:]))


QCONV2D = register_op(OpDef("qnn.conv2d", QConvAttrs, _qconv_type, _qconv_reference,
                            OpPattern.OUT_ELEMWISE_FUSABLE, flops=_qconv_flops))


@define_compute(QCONV2D)
def _qconv_compute(x, w, a: QConvAttrs):
    """The plain int32 conv, for a qnn.conv2d that stays NCHW (the generic schedule; correct, not fast)."""
    from tvm import te
    from tvm import tirx as tir

    c = a.conv
    out = _qconv_type(TensorType(tuple(int(d) for d in x.shape), str(x.dtype)),
                      TensorType(tuple(int(d) for d in w.shape), "int8"), a)
    n, ch, h, wd = (int(d) for d in x.shape)
    t, left = c.padding[0], c.padding[1]
    (sh, sw), (dh, dw) = c.strides, c.dilation

    def at(i, k, y, z):
        inside = tir.all(y >= t, y < h + t, z >= left, z < wd + left)
        return tir.if_then_else(inside, x[i, k, y - t, z - left], tir.const(a.x_zero_point, x.dtype))

    xp = te.compute((n, ch, h + c.padding[0] + c.padding[2], wd + c.padding[1] + c.padding[3]), at, name="pad")
    rc = te.reduce_axis((0, ch), name="rc")
    ry, rx = te.reduce_axis((0, int(w.shape[2])), name="ry"), te.reduce_axis((0, int(w.shape[3])), name="rx")
    return te.compute(out.shape, lambda i, o, y, z: te.sum(
        xp[i, rc, y * sh + ry * dh, z * sw + rx * dw].astype("int32") * w[o, rc, ry, rx].astype("int32"),
        axis=[rc, ry, rx]), name="qconv2d")


# --- the blocked form --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QConvNCHWcAttrs:
    conv: ConvAttrs
    x_zero_point: int
    out_block: int


def pack_qconv_weight(w: np.ndarray, in_block: int, out_block: int) -> np.ndarray:
    """OIHW → [O/ob, I/ib, KH, KW, ib/4, ob, 4]: the 4 input channels one lane sums sit next to each other,
    the ob lanes of one step are one 64-byte (ob 16) vector."""
    o, i, kh, kw = w.shape
    return np.ascontiguousarray(
        w.reshape(o // out_block, out_block, i // in_block, in_block // DOT, DOT, kh, kw)
        .transpose(0, 2, 5, 6, 3, 1, 4))


def unpack_qconv_weight(w: np.ndarray) -> np.ndarray:
    ob_n, ib_n, kh, kw, q, ob, d = w.shape
    return np.ascontiguousarray(w.transpose(0, 5, 1, 4, 6, 2, 3).reshape(ob_n * ob, ib_n * q * d, kh, kw))


def _qconv_nchwc_type(x: TensorType, w: TensorType, a: QConvNCHWcAttrs) -> TensorType:
    op = "qnn.conv2d_nchwc"
    _check_operands(op, x, w)
    if (x.ndim != 5 or w.ndim != 7 or w.shape[5] != a.out_block or w.shape[6] != DOT
            or w.shape[1] != x.shape[1] or w.shape[4] * DOT != x.shape[4] or a.conv.groups != 1):
        raise TypeCheckError(f"{op}: expected NCHW[b]c data (b a multiple of {DOT}) and [O/{a.out_block}, I/b, "
                             f"KH, KW, b/{DOT}, {a.out_block}, {DOT}] weights, got {x} and {w}")
    plain = _qconv_type(TensorType((x.shape[0], x.shape[1] * x.shape[4], x.shape[2], x.shape[3]), x.dtype),
                        TensorType((w.shape[0] * a.out_block, x.shape[1] * x.shape[4], w.shape[2], w.shape[3]),
                                   w.dtype), QConvAttrs(a.conv, a.x_zero_point))
    return TensorType((x.shape[0], w.shape[0], plain.shape[2], plain.shape[3], a.out_block), "int32")


def _qconv_nchwc_reference(x: np.ndarray, w: np.ndarray, a: QConvNCHWcAttrs) -> np.ndarray:
    plain = _qconv_reference(unblock_array(x), unpack_qconv_weight(w), QConvAttrs(a.conv, a.x_zero_point))
    return block_array(plain, a.out_block)


def _qconv_nchwc_flops(x: TensorType, w: TensorType, a: QConvNCHWcAttrs) -> int:
    return 2 * _qconv_nchwc_type(x, w, a).size * int(np.prod(w.shape[1:5])) * DOT


QCONV2D_NCHWC = register_op(OpDef("qnn.conv2d_nchwc", QConvNCHWcAttrs, _qconv_nchwc_type, _qconv_nchwc_reference,
                                  OpPattern.OUT_ELEMWISE_FUSABLE, flops=_qconv_nchwc_flops))


@define_compute(QCONV2D_NCHWC)
def _qconv_nchwc_compute(x, w, a: QConvNCHWcAttrs):
    """The reduction's innermost axes are (output lane, 4 input channels): the shape the dot-product tensor
    intrinsic matches (schedules/x86/qconv2d_nchwc.py)."""
    from tvm import te

    c = a.conv
    out = _qconv_nchwc_type(TensorType(tuple(int(d) for d in x.shape), str(x.dtype)),
                            TensorType(tuple(int(d) for d in w.shape), "int8"), a)
    xp = pad_nchwc(x, tuple(c.padding), value=a.x_zero_point)
    (sh, sw), (dh, dw) = c.strides, c.dilation
    rco = te.reduce_axis((0, int(w.shape[1])), name="rco")
    ry, rx = te.reduce_axis((0, int(w.shape[2])), name="ry"), te.reduce_axis((0, int(w.shape[3])), name="rx")
    rq, rd = te.reduce_axis((0, int(w.shape[4])), name="rq"), te.reduce_axis((0, DOT), name="rd")
    return te.compute(out.shape, lambda n, oc, oh, ow, ob: te.sum(
        xp[n, rco, oh * sh + ry * dh, ow * sw + rx * dw, rq * DOT + rd].astype("int32")
        * w[oc, rco, ry, rx, rq, ob, rd].astype("int32"), axis=[rco, ry, rx, rq, rd]), name="qconv2d_nchwc")


# --- the requantization a realized conv ends with ----------------------------------------------------------


@dataclass(frozen=True)
class RequantizeAttrs:
    out_dtype: str = "uint8"
    low: int | None = None  # the clip's lower bound (a ReLU before the quantize raises it to the zero point)
    high: int | None = None  # and its upper one (a ReLU6's 6, quantized)


def _requantize_type(x: TensorType, a: TensorType, b: TensorType, attrs: RequantizeAttrs) -> TensorType:
    from ..types import broadcast_shapes

    if attrs.out_dtype not in ("uint8", "int8"):
        raise TypeCheckError(f"qnn.requantize: output dtype {attrs.out_dtype} not supported")
    if str(a.dtype) != "float32" or str(b.dtype) != "float32":
        raise TypeCheckError(f"qnn.requantize: multiplier and offset must be float32, got {a} and {b}")
    if broadcast_shapes(x.shape, a.shape, b.shape, what="qnn.requantize") != tuple(x.shape):
        raise TypeCheckError(f"qnn.requantize: {a} and {b} must broadcast to the data {x}")
    return TensorType(x.shape, attrs.out_dtype)


def _bounds(attrs: RequantizeAttrs) -> tuple[int, int]:
    info = np.iinfo(attrs.out_dtype)
    return (max(int(info.min), attrs.low if attrs.low is not None else int(info.min)),
            min(int(info.max), attrs.high if attrs.high is not None else int(info.max)))


def _requantize_reference(x: np.ndarray, a: np.ndarray, b: np.ndarray, attrs: RequantizeAttrs) -> np.ndarray:
    lo, hi = _bounds(attrs)
    v = x.astype(np.float32) * a + b  # float32 throughout, as the kernel computes it
    return np.clip(np.rint(v), lo, hi).astype(attrs.out_dtype)


REQUANTIZE = register_op(OpDef("qnn.requantize", RequantizeAttrs, _requantize_type, _requantize_reference,
                               OpPattern.BROADCAST, flops=lambda x, a, b, attrs: 4 * x.size))


@define_compute(REQUANTIZE)
def _requantize_compute(x, a, b, attrs: RequantizeAttrs):
    from tvm import te
    from tvm import tirx as tir

    lo, hi = _bounds(attrs)
    rank = len(x.shape)

    def at(t, i):
        skip = rank - len(t.shape)
        return t[tuple(0 if int(d) == 1 else i[skip + k] for k, d in enumerate(t.shape))]

    def f(*i):
        v = float_math.round_half_even(x[i].astype("float32") * at(a, i) + at(b, i))
        return tir.max(tir.min(v, tir.const(float(hi), "float32")), tir.const(float(lo), "float32")).astype(
            attrs.out_dtype)

    return te.compute(x.shape, f, name="requantize")
