"""Normalizations: batch norm (inference form; a pass folds it into the conv before it), instance, layer and
group norm, LRN and mean-variance normalization. Statistics are computed in float64 in the references."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.errors import TypeCheckError

from ..op import OpDef, OpPattern, define_compute, register_op
from ..types import TensorType, is_float
from . import float_math
from .accumulate import accumulator, cast


@dataclass(frozen=True)
class EpsAttrs:
    epsilon: float = 1e-5


def _per_channel(op: str, x: TensorType, *params: TensorType) -> None:
    if not is_float(x.dtype) or x.ndim < 2:
        raise TypeCheckError(f"{op}: expected a float tensor with a channel axis, got {x}")
    for p in params:
        if p.shape != (x.shape[1],):
            raise TypeCheckError(f"{op}: per-channel parameter {p} does not match {x.shape[1]} channels of {x}")


def _bn_type(x, scale, bias, mean, var, a: EpsAttrs) -> TensorType:
    _per_channel("nn.batch_norm", x, scale, bias, mean, var)
    return x


def _channel(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _bn(x, scale, bias, mean, var, a: EpsAttrs) -> np.ndarray:
    s = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + a.epsilon)
    y = (x - _channel(mean, x.ndim)) * _channel(s, x.ndim) + _channel(bias, x.ndim)
    return y.astype(x.dtype)


BATCH_NORM = register_op(OpDef("nn.batch_norm", EpsAttrs, _bn_type, _bn, OpPattern.BROADCAST,
                               flops=lambda x, *rest: 2 * x.size if x.is_static else 0))


def _in_type(x, scale, bias, a: EpsAttrs) -> TensorType:
    _per_channel("nn.instance_norm", x, scale, bias)
    return x


def _instance_norm(x, scale, bias, a: EpsAttrs) -> np.ndarray:
    axes = tuple(range(2, x.ndim))
    xd = x.astype(np.float64)
    y = (xd - xd.mean(axis=axes, keepdims=True)) / np.sqrt(xd.var(axis=axes, keepdims=True) + a.epsilon)
    return (y * _channel(scale, x.ndim) + _channel(bias, x.ndim)).astype(x.dtype)


INSTANCE_NORM = register_op(OpDef("nn.instance_norm", EpsAttrs, _in_type, _instance_norm, OpPattern.OPAQUE,
                                  flops=lambda x, s, b, a: 6 * x.size if x.is_static else 0))


@dataclass(frozen=True)
class LayerNormAttrs:
    axis: int = -1  # normalize over axes [axis, ndim), non-negative after import
    epsilon: float = 1e-5


def _ln_type(x: TensorType, scale: TensorType, bias: TensorType, a: LayerNormAttrs) -> TensorType:
    if not 0 <= a.axis < x.ndim:
        raise TypeCheckError(f"nn.layer_norm: axis {a.axis} out of range for {x}")
    from ..types import broadcast_shapes

    norm_shape = x.shape[a.axis:]
    for p in (scale, bias):
        if broadcast_shapes(norm_shape, p.shape, what="nn.layer_norm") != tuple(norm_shape):
            raise TypeCheckError(f"nn.layer_norm: parameter {p} does not broadcast to {list(norm_shape)}")
    return x


def _layer_norm(x, scale, bias, a: LayerNormAttrs) -> np.ndarray:
    axes = tuple(range(a.axis, x.ndim))
    xd = x.astype(np.float64)
    y = (xd - xd.mean(axis=axes, keepdims=True)) / np.sqrt(xd.var(axis=axes, keepdims=True) + a.epsilon)
    return (y * scale + bias).astype(x.dtype)


LAYER_NORM = register_op(OpDef("nn.layer_norm", LayerNormAttrs, _ln_type, _layer_norm, OpPattern.OPAQUE,
                               flops=lambda x, s, b, a: 8 * x.size if x.is_static else 0))


@dataclass(frozen=True)
class GroupNormAttrs:
    num_groups: int
    epsilon: float = 1e-5


def _gn_type(x: TensorType, scale: TensorType, bias: TensorType, a: GroupNormAttrs) -> TensorType:
    _per_channel("nn.group_norm", x, scale, bias)
    if x.shape[1] % a.num_groups:
        raise TypeCheckError(f"nn.group_norm: {x.shape[1]} channels do not divide into {a.num_groups} groups")
    return x


def _group_norm(x, scale, bias, a: GroupNormAttrs) -> np.ndarray:
    n, c = x.shape[:2]
    xg = x.astype(np.float64).reshape(n, a.num_groups, -1)
    y = (xg - xg.mean(axis=2, keepdims=True)) / np.sqrt(xg.var(axis=2, keepdims=True) + a.epsilon)
    y = y.reshape(x.shape)
    return (y * _channel(scale, x.ndim) + _channel(bias, x.ndim)).astype(x.dtype)


GROUP_NORM = register_op(OpDef("nn.group_norm", GroupNormAttrs, _gn_type, _group_norm, OpPattern.OPAQUE,
                               flops=lambda x, s, b, a: 8 * x.size if x.is_static else 0))


@dataclass(frozen=True)
class LRNAttrs:
    size: int
    alpha: float = 1e-4
    beta: float = 0.75
    bias: float = 1.0


def _lrn(x: np.ndarray, a: LRNAttrs) -> np.ndarray:
    sq = x.astype(np.float64) ** 2
    c = x.shape[1]
    lo, hi = (a.size - 1) // 2, a.size - 1 - (a.size - 1) // 2  # floor before, ceil after (ONNX)
    padded = np.pad(sq, [(0, 0), (lo, hi)] + [(0, 0)] * (x.ndim - 2))
    # each window summed on its own: differences of a running sum made every channel after an inf NaN
    window = sum(padded[:, j:j + c] for j in range(a.size))
    return (x / (a.bias + a.alpha / a.size * window) ** a.beta).astype(x.dtype)


def _lrn_type(x: TensorType, a: LRNAttrs) -> TensorType:
    _per_channel("nn.lrn", x)
    return x


LRN = register_op(OpDef("nn.lrn", LRNAttrs, _lrn_type, _lrn, OpPattern.OPAQUE,
                        flops=lambda x, a: x.size * (a.size + 4) if x.is_static else 0))


@dataclass(frozen=True)
class MVNAttrs:
    axes: tuple[int, ...] = (0, 2, 3)


def _mvn(x: np.ndarray, a: MVNAttrs) -> np.ndarray:
    xd = x.astype(np.float64)
    mean = xd.mean(axis=a.axes, keepdims=True)
    std = np.sqrt(((xd - mean) ** 2).mean(axis=a.axes, keepdims=True))
    return ((xd - mean) / (std + 1e-9)).astype(x.dtype)


MEAN_VARIANCE_NORM = register_op(OpDef("nn.mean_variance_norm", MVNAttrs, lambda x, a: x, _mvn, OpPattern.OPAQUE,
                                       flops=lambda x, a: 6 * x.size if x.is_static else 0))


def _rms_norm(x, scale, a: LayerNormAttrs) -> np.ndarray:
    axes = tuple(range(a.axis, x.ndim))
    xd = x.astype(np.float64)
    return (xd / np.sqrt((xd * xd).mean(axis=axes, keepdims=True) + a.epsilon) * scale).astype(x.dtype)


def _rms_type(x: TensorType, scale: TensorType, a: LayerNormAttrs) -> TensorType:
    return _ln_type(x, scale, scale, a)


RMS_NORM = register_op(OpDef("nn.rms_norm", LayerNormAttrs, _rms_type, _rms_norm, OpPattern.OPAQUE,
                             flops=lambda x, s, a: 5 * x.size if x.is_static else 0))


@dataclass(frozen=True)
class LpNormAttrs:
    axis: int
    p: int = 2


def _lp_normalize(x: np.ndarray, a: LpNormAttrs) -> np.ndarray:
    xd = x.astype(np.float64)
    norm = np.abs(xd).sum(axis=a.axis, keepdims=True) if a.p == 1 else np.sqrt((xd * xd).sum(axis=a.axis, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm == 0, 0, xd / norm).astype(x.dtype)


def _lp_type(x: TensorType, a: LpNormAttrs) -> TensorType:
    if a.p not in (1, 2) or not 0 <= a.axis < x.ndim:
        raise TypeCheckError(f"nn.lp_normalize: p must be 1 or 2 and axis in range, got {a} for {x}")
    return x


LP_NORMALIZE = register_op(OpDef("nn.lp_normalize", LpNormAttrs, _lp_type, _lp_normalize, OpPattern.OPAQUE,
                                 flops=lambda x, a: 3 * x.size if x.is_static else 0))


@define_compute(LAYER_NORM)
def layer_norm_compute(x, scale, bias, a: LayerNormAttrs):
    """Two passes over each row, as TOPI's layer_norm, with stage names `schedules/x86/layer_norm.py` finds:
    the row sum, the sum of squared deviations from the mean, then the normalized, scaled output (float16 and
    bfloat16 in float32, rounded once)."""
    from tvm import te

    nd = len(x.shape)
    if len(scale.shape) != nd - a.axis or len(bias.shape) != nd - a.axis:
        raise NotImplementedError("nn.layer_norm compute needs scale over exactly the normalized axes")
    rows, normed = tuple(x.shape[:a.axis]), tuple(x.shape[a.axis:])
    count = 1
    for d in normed:
        count *= int(d)

    def row_sum(f, name):
        ks = [te.reduce_axis((0, d), name=f"k{j}") for j, d in enumerate(normed)]
        return te.compute(rows, lambda *i: te.sum(f((*i, *ks)), axis=ks), name=name)

    acc, out = accumulator(x.dtype), str(x.dtype)
    total = row_sum(lambda i: cast(x[i], acc), "layer_norm_sum")
    inv_n = 1.0 / count

    def deviation(i):
        return cast(x[i], acc) - total[i[:a.axis]] * inv_n

    squares = row_sum(lambda i: deviation(i) * deviation(i), "layer_norm_var_sum")
    return te.compute(x.shape, lambda *i: cast(deviation(i) * te.rsqrt(squares[i[:a.axis]] * inv_n + a.epsilon)
                      * cast(scale[i[a.axis:]], acc) + cast(bias[i[a.axis:]], acc), out), name="layer_norm")


UNROLLED_LRN_WINDOW = 16  # AlexNet's and GoogLeNet's window is 5


@define_compute(LRN)
def lrn_compute(x, a: LRNAttrs):
    """x / (bias + alpha / size · Σ x² over `size` channels around c)^beta, summed in the accumulator dtype.

    TOPI's LRN raised the base with powf, a scalar libm call per element: AlexNet's, ZFNet's and GoogLeNet's
    LRNs took 17–32% of their runs. Their beta, 0.75, is sqrt(b) · sqrt(sqrt(b)) here (and 0.5, 1 are exact
    forms), which vectorize; other betas keep pow. The base is at least `bias`, positive in every model (ONNX
    defaults it to 1), where the square roots are exact to half an ulp each.
    """
    from tvm import te, tirx as tir

    acc, dtype = accumulator(x.dtype), str(x.dtype)
    c = int(x.shape[1])
    lo = (a.size - 1) // 2  # ONNX: floor((size - 1) / 2) channels before, the rest after

    def square(i, ch):
        v = cast(x(i[0], ch, *i[2:]), acc)
        return tir.if_then_else(tir.all(ch >= 0, ch < c), v * v, tir.const(0, acc))

    if a.size <= UNROLLED_LRN_WINDOW:  # one elementwise stage, the window written out: no sums buffer
        def window(*i):
            total = square(i, i[1] - lo)
            for j in range(1, a.size):
                total = total + square(i, i[1] - lo + j)
            return total
    else:
        k = te.reduce_axis((0, a.size), name="lrn_k")
        window = te.compute(x.shape, lambda *i: te.sum(square(i, i[1] - lo + k), axis=k), name="lrn_sum")
    scale, bias = tir.const(a.alpha / a.size, acc), tir.const(a.bias, acc)

    def power(b):
        if a.beta == 0.75:
            return float_math.bind(te.sqrt(b), lambda r: r * te.sqrt(r))
        if a.beta == 0.5:
            return te.sqrt(b)
        if a.beta == 1.0:
            return b
        return te.power(b, tir.const(a.beta, acc))

    return te.compute(x.shape, lambda *i: cast(cast(x(*i), acc) / power(bias + scale * window(*i)), dtype),
                      name="lrn")


@define_compute(BATCH_NORM)
def batch_norm_compute(x, scale, bias, mean, var, a: EpsAttrs):
    from tvm import te

    return te.compute(x.shape, lambda n, c, *r: (x(n, c, *r) - mean[c]) * scale[c] / te.sqrt(
        var[c] + a.epsilon) + bias[c], name="batch_norm")


def _sum_over(elem, shape, axes, name: str):
    """sum of elem(index) over `axes` of `shape`, kept as 1s (keepdims)."""
    from tvm import te

    rs = {ax: te.reduce_axis((0, shape[ax]), name=f"k{ax}") for ax in axes}
    return te.compute([1 if ax in rs else d for ax, d in enumerate(shape)], lambda *i: te.sum(
        elem(tuple(rs[ax] if ax in rs else v for ax, v in enumerate(i))), axis=list(rs.values())), name=name)


def _at(stat, i, axes):
    """stat (keepdims over `axes`) at the element index i."""
    return stat[tuple(0 if ax in axes else v for ax, v in enumerate(i))]


def _moments(x, axes, name: str):
    """(deviation(i), sum of squared deviations over `axes` (keepdims), count): two passes, as layer norm, in
    the accumulator dtype (float32 for float16)."""
    acc = accumulator(x.dtype)
    count = 1
    for ax in axes:
        count *= int(x.shape[ax])
    total = _sum_over(lambda i: cast(x[i], acc), x.shape, axes, f"{name}_sum")
    inv_n = 1.0 / max(count, 1)

    def deviation(i):
        return cast(x[i], acc) - _at(total, i, axes) * inv_n

    return deviation, _sum_over(lambda i: deviation(i) * deviation(i), x.shape, axes, f"{name}_var_sum"), inv_n


@define_compute(INSTANCE_NORM)
def instance_norm_compute(x, scale, bias, a: EpsAttrs):
    from tvm import te

    axes, acc = list(range(2, len(x.shape))), accumulator(x.dtype)
    deviation, squares, inv_n = _moments(x, axes, "instance_norm")
    return te.compute(x.shape, lambda *i: cast(deviation(i) * te.rsqrt(_at(squares, i, axes) * inv_n + a.epsilon)
                      * cast(scale[i[1]], acc) + cast(bias[i[1]], acc), str(x.dtype)), name="instance_norm")


@define_compute(MEAN_VARIANCE_NORM)
def mean_variance_norm_compute(x, a: MVNAttrs):
    from tvm import te

    axes = list(a.axes)
    deviation, squares, inv_n = _moments(x, axes, "mvn")
    return te.compute(x.shape, lambda *i: cast(deviation(i) / (te.sqrt(_at(squares, i, axes) * inv_n) + 1e-9),
                                               str(x.dtype)), name="mean_variance_norm")


@define_compute(GROUP_NORM)
def group_norm_compute(x, scale, bias, a: GroupNormAttrs):
    """Statistics per (n, group) over the group's channels and every spatial position, then per-channel affine."""
    from tvm import te

    per, acc = int(x.shape[1]) // a.num_groups, accumulator(x.dtype)
    spatial = [int(d) for d in x.shape[2:]]
    count = per
    for d in spatial:
        count *= d
    inv_n = 1.0 / count

    def group_sum(elem, name):
        kc = te.reduce_axis((0, per), name="kc")
        ks = [te.reduce_axis((0, d), name=f"k{j}") for j, d in enumerate(spatial)]
        return te.compute((x.shape[0], a.num_groups), lambda n, g: te.sum(
            elem((n, g * per + kc, *ks)), axis=[kc, *ks]), name=name)

    total = group_sum(lambda i: cast(x[i], acc), "group_norm_sum")

    def deviation(i):
        return cast(x[i], acc) - total[i[0], i[1] // per] * inv_n

    squares = group_sum(lambda i: deviation(i) * deviation(i), "group_norm_var_sum")
    return te.compute(x.shape, lambda *i: cast(
        deviation(i) * te.rsqrt(squares[i[0], i[1] // per] * inv_n + a.epsilon) * cast(scale[i[1]], acc)
        + cast(bias[i[1]], acc), str(x.dtype)), name="group_norm")


def _broadcast_at(p, i):
    """p, which broadcasts to the trailing axes of an index i, at i."""
    tail = i[len(i) - len(p.shape):]
    return p[tuple(0 if int(d) == 1 else v for d, v in zip(p.shape, tail))]


@define_compute(RMS_NORM)
def rms_norm_compute(x, scale, a: LayerNormAttrs):
    from tvm import te

    axes, acc = list(range(a.axis, len(x.shape))), accumulator(x.dtype)
    squares = _sum_over(lambda i: cast(x[i], acc) * cast(x[i], acc), x.shape, axes, "rms_norm_sum")
    count = 1
    for ax in axes:
        count *= int(x.shape[ax])
    return te.compute(x.shape, lambda *i: cast(cast(x(*i), acc) * te.rsqrt(
        _at(squares, i, axes) * (1.0 / count) + a.epsilon) * cast(_broadcast_at(scale, i), acc), str(x.dtype)),
        name="rms_norm")


@define_compute(LP_NORMALIZE)
def lp_normalize_compute(x, a: LpNormAttrs):
    """x / ||x||_p along the axis; 0 where the norm is 0 (the reference), NaN where it is NaN."""
    from tvm import te
    from tvm import tirx as tir

    axes, acc = [a.axis], accumulator(x.dtype)
    norm = _sum_over(lambda i: te.abs(cast(x[i], acc)) if a.p == 1 else cast(x[i], acc) * cast(x[i], acc),
                     x.shape, axes, "lp_norm_sum")

    def body(*i):
        n = _at(norm, i, axes)
        n = n if a.p == 1 else te.sqrt(n)
        return cast(tir.Select(n == tir.const(0, acc), tir.const(0, acc), cast(x(*i), acc) / n), str(x.dtype))

    return te.compute(x.shape, body, name="lp_normalize")
