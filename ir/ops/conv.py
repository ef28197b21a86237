"""Convolutions: nn.conv1d/2d/3d and nn.conv{1,2,3}d_transpose, grouped and dilated, in NC[D]HW layout.

`padding` lists the begin pads of every spatial axis, then the end pads (ONNX's order). The references are
im2col + matmul (NumPy's BLAS), fast enough to interpret VGG-19 in a test.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from kiln.errors import TypeCheckError

from ..op import OpDef, OpPattern, define_compute, register_op
from ..types import TensorType, is_float
from .accumulate import accumulator, cast_stage


@dataclass(frozen=True)
class ConvAttrs:
    strides: tuple[int, ...]
    padding: tuple[int, ...]  # begins then ends
    dilation: tuple[int, ...]
    groups: int = 1
    out_dtype: str | None = None  # int8 convs accumulate into "int32"


def _spatial(t: TensorType, nd: int, what: str) -> tuple[int, ...]:
    if t.ndim != nd + 2:
        raise TypeCheckError(f"{what}: expected a rank-{nd + 2} tensor, got {t}")
    if not all(isinstance(d, int) for d in t.shape[2:]):
        raise TypeCheckError(f"{what}: spatial dims of {t} must be static")
    return t.shape[2:]  # type: ignore[return-value]


def _check_attrs(a: ConvAttrs, nd: int, op: str) -> None:
    if len(a.strides) != nd or len(a.dilation) != nd or len(a.padding) != 2 * nd:
        raise TypeCheckError(f"{op}: strides/dilation need {nd} values and padding {2 * nd}, got {a}")
    if min(a.strides + a.dilation, default=1) < 1 or a.groups < 1 or min(a.padding, default=0) < 0:
        raise TypeCheckError(f"{op}: strides, dilation and groups must be ≥ 1 and pads ≥ 0, got {a}")


def conv_output_size(size: int, k: int, stride: int, pad_total: int, dilation: int) -> int:
    return (size + pad_total - ((k - 1) * dilation + 1)) // stride + 1


def _bytes_times_floats(x: TensorType, w: TensorType, a: ConvAttrs) -> bool:
    """8-bit data with float weights summed in the weights' dtype: a dequantize of zero point 0 folded into the
    conv after it (its scale into the weights; passes/realize_qdq.py), so the conv reads the bytes."""
    return str(x.dtype) in ("uint8", "int8") and str(w.dtype) == "float32" and a.out_dtype == "float32"


def _conv_type(nd: int, op: str):
    def rule(x: TensorType, w: TensorType, a: ConvAttrs) -> TensorType:
        _check_attrs(a, nd, op)
        sp = _spatial(x, nd, op)
        ks = _spatial(w, nd, op + " weight")
        c, o = x.shape[1], w.shape[0]
        if isinstance(c, int) and c != w.shape[1] * a.groups:
            raise TypeCheckError(f"{op}: input has {c} channels but weight {w} with groups={a.groups} "
                                 f"expects {w.shape[1] * a.groups}")
        if o % a.groups:
            raise TypeCheckError(f"{op}: {o} output channels do not divide into {a.groups} groups")
        if x.dtype != w.dtype and not _bytes_times_floats(x, w, a):
            raise TypeCheckError(f"{op}: input {x} and weight {w} differ in dtype")
        out = tuple(conv_output_size(sp[i], ks[i], a.strides[i], a.padding[i] + a.padding[i + nd], a.dilation[i])
                    for i in range(nd))
        if min(out) < 1:
            raise TypeCheckError(f"{op}: kernel {list(ks)} larger than padded input {x}")
        return TensorType((x.shape[0], o) + out, a.out_dtype or x.dtype)
    return rule


# float16 and bfloat16 convs sum in float32 and round once, as ONNX Runtime and the ONNX reference do (summing in
# float16 left 1-ulp differences that a SiLU after the conv turned into failures): every conv compute and the
# reference (accumulate.py)


def conv_reference(x: np.ndarray, w: np.ndarray, a: ConvAttrs) -> np.ndarray:
    nd = x.ndim - 2
    acc = a.out_dtype or (accumulator(x.dtype.name) if is_float(x.dtype.name) else "int64")
    x, w = x.astype(acc, copy=False), w.astype(acc, copy=False)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(a.padding[i], a.padding[i + nd]) for i in range(nd)])
    n, c = x.shape[:2]
    o, ks, g = w.shape[0], w.shape[2:], a.groups
    extent = tuple((k - 1) * d + 1 for k, d in zip(ks, a.dilation))
    win = sliding_window_view(xp, extent, axis=tuple(range(2, 2 + nd)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in a.strides)
              + tuple(slice(None, None, d) for d in a.dilation)]
    out_sp = win.shape[2:2 + nd]
    cg, og = c // g, o // g
    win = win.reshape((n, g, cg) + out_sp + ks)
    perm = (0, 1) + tuple(range(3, 3 + nd)) + (2,) + tuple(range(3 + nd, 3 + 2 * nd))
    cols = win.transpose(perm).reshape(n, g, int(np.prod(out_sp)), cg * int(np.prod(ks)))
    wm = w.reshape(g, og, -1).transpose(0, 2, 1)
    out = np.matmul(cols, wm)  # n, g, positions, og
    return np.ascontiguousarray(out.transpose(0, 1, 3, 2).reshape((n, o) + out_sp)).astype(
        a.out_dtype or x.dtype)


def _conv_flops(x: TensorType, w: TensorType, a: ConvAttrs) -> int:
    nd = len(a.strides)
    out = _conv_type(nd, "conv")(x, w, a)
    if not out.is_static:
        return 0
    return 2 * out.size * int(np.prod(w.shape[1:]))


CONV1D, CONV2D, CONV3D = (register_op(OpDef(
    f"nn.conv{nd}d", ConvAttrs, _conv_type(nd, f"nn.conv{nd}d"), conv_reference, OpPattern.OUT_ELEMWISE_FUSABLE,
    flops=_conv_flops)) for nd in (1, 2, 3))
CONV_BY_RANK = {1: CONV1D, 2: CONV2D, 3: CONV3D}


# --- transposed convolution ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvTransposeAttrs:
    strides: tuple[int, ...]
    padding: tuple[int, ...]  # begins then ends, cropped from the full output
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...]
    groups: int = 1


def _conv_t_type(nd: int, op: str):
    def rule(x: TensorType, w: TensorType, a: ConvTransposeAttrs) -> TensorType:
        sp, ks = _spatial(x, nd, op), _spatial(w, nd, op + " weight")
        if isinstance(x.shape[1], int) and x.shape[1] != w.shape[0]:
            raise TypeCheckError(f"{op}: input has {x.shape[1]} channels, weight {w} expects {w.shape[0]}")
        if w.shape[0] % a.groups:
            raise TypeCheckError(f"{op}: {w.shape[0]} channels do not divide into {a.groups} groups")
        out = tuple(a.strides[i] * (sp[i] - 1) + a.output_padding[i] + (ks[i] - 1) * a.dilation[i] + 1
                    - a.padding[i] - a.padding[i + nd] for i in range(nd))
        if min(out) < 1:
            raise TypeCheckError(f"{op}: pads {list(a.padding)} leave no output")
        return TensorType((x.shape[0], w.shape[1] * a.groups) + out, x.dtype)
    return rule


def conv_transpose_reference(x: np.ndarray, w: np.ndarray, a: ConvTransposeAttrs) -> np.ndarray:
    nd = x.ndim - 2
    n, c = x.shape[:2]
    g, og, ks = a.groups, w.shape[1], w.shape[2:]
    cg = c // g
    full = tuple(a.strides[i] * (x.shape[2 + i] - 1) + (ks[i] - 1) * a.dilation[i] + 1 + a.output_padding[i]
                 for i in range(nd))
    out = np.zeros((n, g * og) + full, dtype=x.dtype)
    for kk in np.ndindex(*ks):
        region = tuple(slice(kk[i] * a.dilation[i], kk[i] * a.dilation[i] + (x.shape[2 + i] - 1) * a.strides[i] + 1,
                             a.strides[i]) for i in range(nd))
        for gi in range(g):
            xg = x[:, gi * cg:(gi + 1) * cg]
            wg = w[(slice(gi * cg, (gi + 1) * cg), slice(None), *kk)]  # cg, og
            out[(slice(None), slice(gi * og, (gi + 1) * og)) + region] += np.einsum(
                "nc...,co->no...", xg, wg).astype(x.dtype)
    crop = tuple(slice(a.padding[i], full[i] - a.padding[i + nd]) for i in range(nd))
    return np.ascontiguousarray(out[(slice(None), slice(None)) + crop])


def _conv_t_flops(x: TensorType, w: TensorType, a: ConvTransposeAttrs) -> int:
    if not x.is_static:
        return 0
    return 2 * x.size * int(np.prod(w.shape[1:]))


CONV1D_TRANSPOSE, CONV2D_TRANSPOSE, CONV3D_TRANSPOSE = (register_op(OpDef(
    f"nn.conv{nd}d_transpose", ConvTransposeAttrs, _conv_t_type(nd, f"nn.conv{nd}d_transpose"),
    conv_transpose_reference, OpPattern.OUT_ELEMWISE_FUSABLE, flops=_conv_t_flops)) for nd in (1, 2, 3))
CONV_TRANSPOSE_BY_RANK = {1: CONV1D_TRANSPOSE, 2: CONV2D_TRANSPOSE, 3: CONV3D_TRANSPOSE}


# The plane a pointwise conv is computed over, when a CPU template asked for it padded (schedules/x86/
# conv2d_direct.py: a plane of whole vectors); 0: as the op says.
_PADDED_PLANE: contextvars.ContextVar[int] = contextvars.ContextVar("padded_plane", default=0)


@contextlib.contextmanager
def padded_plane(plane: int):
    """Within the block, nn.conv2d builds a pointwise conv over its output plane padded to `plane` elements: its
    input copied into a padded plane (`pad_temp`, the tail zeros), the conv over the padded plane, and
    `plane_trim` taking the H x W outputs back out. The padded outputs are computed and never read."""
    token = _PADDED_PLANE.set(plane)
    try:
        yield
    finally:
        _PADDED_PLANE.reset(token)


def _pointwise_padded(x, w, a: ConvAttrs, acc: str, plane: int):
    from tvm import te, tirx

    n, c, h, wd = (int(d) for d in x.shape)
    oc, k = int(w.shape[0]), int(w.shape[1])
    pointwise = (int(w.shape[2]), int(w.shape[3])) == (1, 1) and tuple(a.strides) == (1, 1) and not any(a.padding)
    if not pointwise or plane < h * wd:
        raise TypeCheckError(f"nn.conv2d: a padded plane of {plane} needs a pointwise conv of a smaller plane; "
                             f"got {x.shape} * {w.shape}, {a}")
    opg = oc // a.groups
    zero = tirx.const(0, x.dtype)
    xp = te.compute((n, c, plane), lambda b, ci, p: tirx.if_then_else(p < h * wd, x[b, ci, p // wd, p % wd], zero),
                    name="pad_temp")
    rc = te.reduce_axis((0, k), name="rc")
    name = "conv2d_nchw" if a.groups == 1 else "group_conv2d_nchw"  # topi's names, which the templates expect
    conv = te.compute((n, oc, plane), lambda b, o, p: te.sum(
        xp[b, o // opg * k + rc, p].astype(acc) * w[o, rc, 0, 0].astype(acc), axis=rc), name=name)
    return te.compute((n, oc, h, wd), lambda b, o, y, xx: conv[b, o, y * wd + xx], name="plane_trim")


@define_compute(CONV2D)
def conv2d_compute(x, w, a: ConvAttrs):
    from tvm import topi

    pad = (a.padding[0], a.padding[1], a.padding[2], a.padding[3])
    acc = a.out_dtype or accumulator(x.dtype)
    plane = _PADDED_PLANE.get()
    if plane:
        return cast_stage(_pointwise_padded(x, w, a, acc, plane), a.out_dtype or str(x.dtype), "conv2d_round")
    if a.groups == 1:
        out = topi.nn.conv2d_nchw(x, w, a.strides, pad, a.dilation, out_dtype=acc)
    else:
        out = topi.nn.group_conv2d_nchw(x, w, a.strides, pad, a.dilation, a.groups, out_dtype=acc)
    return cast_stage(out, a.out_dtype or str(x.dtype), "conv2d_round")


def _conv_nd_compute(x, w, a: ConvAttrs):
    """Direct 1-D/3-D conv: out[n, o, y...] = Σ xp[n, g·cg + rc, y·stride + r·dilation] · w[o, rc, r...], the
    input padded by a `pad` block the default schedule inlines (ONNX's 1-D/3-D convs are rare enough that a
    template is not worth it). Output channels and rows run in parallel, the innermost output axis in vectors,
    the reduction loops outside it."""
    from tvm import te
    from tvm import tirx as tir

    nd = len(x.shape) - 2
    n, c, o = x.shape[0], int(x.shape[1]), int(w.shape[0])
    sizes, ks = [int(s) for s in x.shape[2:]], [int(k) for k in w.shape[2:]]
    cg, og = c // a.groups, o // a.groups
    out_dtype = a.out_dtype or str(x.dtype)
    acc = a.out_dtype or accumulator(x.dtype)
    out_sp = [conv_output_size(sizes[i], ks[i], a.strides[i], a.padding[i] + a.padding[i + nd], a.dilation[i])
              for i in range(nd)]
    xp = x
    if any(a.padding):
        def padded(ni, ci, *ii):
            src = [ii[i] - a.padding[i] for i in range(nd)]
            inside = tir.all(*[tir.all(src[i] >= 0, src[i] < sizes[i]) for i in range(nd)])
            return tir.if_then_else(inside, x[(ni, ci) + tuple(src)], tir.const(0, x.dtype))

        xp = te.compute((n, c) + tuple(sizes[i] + a.padding[i] + a.padding[i + nd] for i in range(nd)), padded,
                        name="pad")
    rc = te.reduce_axis((0, cg), name="rc")
    rs = [te.reduce_axis((0, ks[i]), name=("rd", "ry", "rx")[3 - nd + i]) for i in range(nd)]

    def body(ni, oc, *ys):
        ci = oc // og * cg + rc if a.groups > 1 else rc
        xi = tuple(ys[i] * a.strides[i] + rs[i] * a.dilation[i] for i in range(nd))
        return te.sum(xp[(ni, ci) + xi].astype(acc) * w[(oc, rc) + tuple(rs)].astype(acc), axis=[rc, *rs])

    return cast_stage(te.compute((n, o) + tuple(out_sp), body, name=f"conv{nd}d"), out_dtype, f"conv{nd}d_round")


for _op in (CONV1D, CONV3D):
    define_compute(_op)(_conv_nd_compute)


def _conv_t_taps(y, k: int, stride: int, dilation: int, pad: int, size: int, t):
    """(kernel index, input index, valid) of tap `t` for output coordinate `y` along one axis.

    Output y takes input i through kernel tap j when y + pad = i * stride + j * dilation. With dilation 1 only
    the taps j ≡ y + pad (mod stride) contribute, ceil(k / stride) of them, so the reduction skips the zeros a
    conv over the stride-dilated input would multiply; the input index may then fall up to taps - 1 before the
    input or past its end, into the padding `_conv_t_input_pads` adds. Otherwise every tap is tried and the
    others masked (and the index clamped, so loads stay in bounds).
    """
    from tvm import tirx as tir

    if dilation == 1:
        j = tir.floormod(y + pad, stride) + stride * t if stride > 1 else t
        i = tir.floordiv(y + pad, stride) - t if stride > 1 else y + pad - t
        if k % stride:
            return tir.min(j, k - 1), i, j < k
        return j, i, None
    num = y + pad - t * dilation
    i = tir.floordiv(num, stride)
    valid = tir.all(num >= 0, i < size, *([tir.floormod(num, stride) == 0] if stride > 1 else []))
    return t, tir.max(tir.min(i, size - 1), 0), valid


def conv_transpose_taps(k: int, stride: int, dilation: int) -> int:
    return -(-k // stride) if dilation == 1 else k


def _conv_t_input_pads(size: int, out: int, k: int, stride: int, dilation: int, pad: int) -> tuple[int, int]:
    """Zeros before and after the input along one axis, so a dilation-1 gather never leaves it."""
    if dilation != 1:
        return 0, 0
    last = (out - 1 + pad) // stride  # the largest input index tap 0 reads
    return conv_transpose_taps(k, stride, dilation) - 1, max(0, last - (size - 1))


def _conv_transpose_compute(x, w, a: ConvTransposeAttrs):
    """out[n, o, y...] = Σ x[n, c, i...] · w[c, o, j...] over y + pad = i·stride + j·dilation, as a gather: the
    weights are first repacked [j..., c-in-group, o] so a vector of output channels loads contiguously, and the
    input padded once so the inner loop loads without bounds checks."""
    from tvm import te
    from tvm import tirx as tir

    nd = len(x.shape) - 2
    c = int(x.shape[1])
    og, ks = int(w.shape[1]), [int(k) for k in w.shape[2:]]
    sizes = [int(s) for s in x.shape[2:]]
    g = a.groups
    cg, o = c // g, og * g
    out_sp = [a.strides[i] * (sizes[i] - 1) + a.output_padding[i] + (ks[i] - 1) * a.dilation[i] + 1
              - a.padding[i] - a.padding[i + nd] for i in range(nd)]
    pads = [_conv_t_input_pads(sizes[i], out_sp[i], ks[i], a.strides[i], a.dilation[i], a.padding[i])
            for i in range(nd)]

    def packed(*idx):
        j, rc, oc = idx[:nd], idx[nd], idx[nd + 1]
        return w[(oc // og * cg + rc, oc % og) + tuple(j)] if g > 1 else w[(rc, oc) + tuple(j)]

    wp = te.compute(tuple(ks) + (cg, o), packed, name="conv_transpose_weight")
    xp = x
    if any(lo or hi for lo, hi in pads):
        def padded(n, ci, *ii):
            src = [ii[i] - pads[i][0] for i in range(nd)]
            inside = tir.all(*[tir.all(src[i] >= 0, src[i] < sizes[i]) for i in range(nd) if any(pads[i])])
            clamped = [tir.max(tir.min(src[i], sizes[i] - 1), 0) if any(pads[i]) else src[i] for i in range(nd)]
            return tir.if_then_else(inside, x[(n, ci) + tuple(clamped)], tir.const(0, x.dtype))

        xp = te.compute((x.shape[0], c) + tuple(sizes[i] + sum(pads[i]) for i in range(nd)), padded,
                        name="conv_transpose_pad")
    rc = te.reduce_axis((0, cg), name="rc")
    names = ("rd", "ry", "rx")[3 - nd:]
    taps = [te.reduce_axis((0, conv_transpose_taps(ks[i], a.strides[i], a.dilation[i])), name=names[i])
            for i in range(nd)]

    def body(n, oc, *ys):
        js, ins, valids = zip(*(_conv_t_taps(ys[i], ks[i], a.strides[i], a.dilation[i], a.padding[i], sizes[i],
                                             taps[i]) for i in range(nd)))
        ci = oc // og * cg + rc if g > 1 else rc
        xv = xp[(n, ci) + tuple(ins[i] + pads[i][0] for i in range(nd))]
        if conds := [v for v in valids if v is not None]:
            xv = tir.if_then_else(tir.all(*conds), xv, tir.const(0, x.dtype))
        return te.sum(xv * wp[tuple(js) + (rc, oc)], axis=[rc, *taps])

    return te.compute((x.shape[0], o) + tuple(out_sp), body, name="conv_transpose")


for _op in CONV_TRANSPOSE_BY_RANK.values():
    define_compute(_op)(_conv_transpose_compute)
