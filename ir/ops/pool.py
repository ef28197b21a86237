"""Pooling: max, average and Lp pooling over 1-3 spatial axes, and their global forms.

`ceil_mode` adds a last, partial window when the stride leaves a remainder, but only if it starts inside the
input or its begin padding (ONNX's and PyTorch's rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from kiln.errors import TypeCheckError

from ..op import OpDef, OpPattern, define_compute, register_op
from ..types import TensorType
from . import float_math
from .accumulate import accumulator, cast


@dataclass(frozen=True)
class PoolAttrs:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    padding: tuple[int, ...]  # begins then ends
    dilation: tuple[int, ...]
    ceil_mode: bool = False
    count_include_pad: bool = False  # avg only
    p: int = 2  # lp only


def pool_output_size(size: int, k: int, s: int, pb: int, pe: int, d: int, ceil_mode: bool) -> int:
    extent = (k - 1) * d + 1
    span = size + pb + pe - extent
    out = (math.ceil(span / s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + pb:
        out -= 1
    return out


def _out_shape(x: TensorType, a: PoolAttrs, op: str) -> tuple[int, ...]:
    nd = len(a.kernel)
    if x.ndim != nd + 2 or not all(isinstance(d, int) for d in x.shape[2:]):
        raise TypeCheckError(f"{op}: expected a rank-{nd + 2} tensor with static spatial dims, got {x}")
    if len(a.strides) != nd or len(a.padding) != 2 * nd or len(a.dilation) != nd:
        raise TypeCheckError(f"{op}: attrs {a} do not fit {nd} spatial axes")
    out = tuple(pool_output_size(x.shape[2 + i], a.kernel[i], a.strides[i], a.padding[i], a.padding[i + nd],
                                 a.dilation[i], a.ceil_mode) for i in range(nd))
    if min(out) < 1:
        raise TypeCheckError(f"{op}: window {list(a.kernel)} larger than padded input {x}")
    if any(p >= (k - 1) * d + 1 for p, k, d in zip(a.padding, a.kernel * 2, a.dilation * 2)):
        raise TypeCheckError(f"{op}: pads {list(a.padding)} must be smaller than the window {list(a.kernel)}")
    return out


def _pool_type(op: str):
    def rule(x: TensorType, a: PoolAttrs) -> TensorType:
        return TensorType(x.shape[:2] + _out_shape(x, a, op), x.dtype)
    return rule


def _windows(x: np.ndarray, a: PoolAttrs, fill: float) -> np.ndarray:
    """Padded sliding windows, shape (n, c, *out, *kernel); the ceil-mode tail is padded with `fill` too."""
    nd = len(a.kernel)
    out = _out_shape(TensorType(x.shape, x.dtype.name), a, "pool")
    extent = [(k - 1) * d + 1 for k, d in zip(a.kernel, a.dilation)]
    pads = []
    for i in range(nd):
        need = (out[i] - 1) * a.strides[i] + extent[i]
        pads.append((a.padding[i], max(need - x.shape[2 + i] - a.padding[i], a.padding[i + nd])))
    xp = np.pad(x, [(0, 0), (0, 0)] + pads, constant_values=fill)
    win = sliding_window_view(xp, extent, axis=tuple(range(2, 2 + nd)))
    sl = tuple(slice(0, o * s, s) for o, s in zip(out, a.strides)) + tuple(slice(None, None, d) for d in a.dilation)
    return win[(slice(None), slice(None)) + sl]


def _max_pool(x: np.ndarray, a: PoolAttrs) -> np.ndarray:
    fill = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    w = _windows(x, a, fill)
    return w.max(axis=tuple(range(-len(a.kernel), 0))).astype(x.dtype)


def _avg_pool(x: np.ndarray, a: PoolAttrs) -> np.ndarray:
    nd = len(a.kernel)
    axes = tuple(range(-nd, 0))
    total = _windows(x.astype(np.float64), a, 0.0).sum(axis=axes)
    if a.count_include_pad:
        # explicit pads count, the ceil-mode tail does not
        ones = np.pad(np.ones((1, 1) + x.shape[2:]), [(0, 0), (0, 0)] + [(a.padding[i], a.padding[i + nd])
                                                                          for i in range(nd)], constant_values=1)
        shifted = PoolAttrs(a.kernel, a.strides, (0,) * (2 * nd), a.dilation, a.ceil_mode)
        count = _windows_unchecked(ones, shifted, a, x.shape[2:])
    else:
        count = _windows(np.ones((1, 1) + x.shape[2:]), a, 0.0).sum(axis=axes)
    return (total / count).astype(x.dtype)


def _windows_unchecked(ones: np.ndarray, shifted: PoolAttrs, a: PoolAttrs, size: tuple[int, ...]) -> np.ndarray:
    nd = len(a.kernel)
    out = _out_shape(TensorType((1, 1) + tuple(size), "float32"), a, "pool")
    extent = [(k - 1) * d + 1 for k, d in zip(a.kernel, a.dilation)]
    pads = [(0, max((out[i] - 1) * a.strides[i] + extent[i] - ones.shape[2 + i], 0)) for i in range(nd)]
    op = np.pad(ones, [(0, 0), (0, 0)] + pads, constant_values=0)
    win = sliding_window_view(op, extent, axis=tuple(range(2, 2 + nd)))
    sl = tuple(slice(0, o * s, s) for o, s in zip(out, a.strides)) + tuple(slice(None, None, d) for d in a.dilation)
    return win[(slice(None), slice(None)) + sl].sum(axis=tuple(range(-nd, 0)))


def _lp_pool(x: np.ndarray, a: PoolAttrs) -> np.ndarray:
    w = _windows(np.abs(x.astype(np.float64)) ** a.p, a, 0.0)
    return (w.sum(axis=tuple(range(-len(a.kernel), 0))) ** (1.0 / a.p)).astype(x.dtype)


def _pool_flops(x: TensorType, a: PoolAttrs) -> int:
    out = _pool_type("pool")(x, a)
    return out.size * int(np.prod(a.kernel)) if out.is_static else 0


MAX_POOL = register_op(OpDef("nn.max_pool", PoolAttrs, _pool_type("nn.max_pool"), _max_pool, OpPattern.OUT_ELEMWISE_FUSABLE,
                             flops=_pool_flops))
AVG_POOL = register_op(OpDef("nn.avg_pool", PoolAttrs, _pool_type("nn.avg_pool"), _avg_pool, OpPattern.OUT_ELEMWISE_FUSABLE,
                             flops=_pool_flops))
LP_POOL = register_op(OpDef("nn.lp_pool", PoolAttrs, _pool_type("nn.lp_pool"), _lp_pool, OpPattern.OUT_ELEMWISE_FUSABLE,
                            flops=_pool_flops))


@dataclass(frozen=True)
class GlobalPoolAttrs:
    p: int = 2  # lp only


def _global_type(x: TensorType, a: GlobalPoolAttrs) -> TensorType:
    if x.ndim < 3:
        raise TypeCheckError(f"global pooling needs N, C and spatial axes, got {x}")
    return TensorType(x.shape[:2] + (1,) * (x.ndim - 2), x.dtype)


def _global(fn):
    def reference(x: np.ndarray, a: GlobalPoolAttrs) -> np.ndarray:
        return np.asarray(fn(x, tuple(range(2, x.ndim)), a)).astype(x.dtype)
    return reference


def _global_flops(x: TensorType, a: GlobalPoolAttrs) -> int:
    return x.size if x.is_static else 0


GLOBAL_AVG_POOL = register_op(OpDef(
    "nn.global_avg_pool", GlobalPoolAttrs, _global_type,
    _global(lambda x, ax, a: x.astype(np.float64).mean(axis=ax, keepdims=True)), OpPattern.OUT_ELEMWISE_FUSABLE,
    flops=_global_flops))
GLOBAL_MAX_POOL = register_op(OpDef(
    "nn.global_max_pool", GlobalPoolAttrs, _global_type, _global(lambda x, ax, a: x.max(axis=ax, keepdims=True)),
    OpPattern.OUT_ELEMWISE_FUSABLE, flops=_global_flops))
GLOBAL_LP_POOL = register_op(OpDef(
    "nn.global_lp_pool", GlobalPoolAttrs, _global_type,
    _global(lambda x, ax, a: (np.abs(x.astype(np.float64)) ** a.p).sum(axis=ax, keepdims=True) ** (1 / a.p)),
    OpPattern.OUT_ELEMWISE_FUSABLE, flops=_global_flops))


def window_count(start, k: int, d: int, lo, hi):
    """How many of the window's taps start, start + d, ..., start + (k-1) d fall in [lo, hi): with dilation the
    first tap inside need not be `lo` itself."""
    from tvm import te, tirx as tir

    first = te.max(tir.floordiv(lo - start + d - 1, d), 0)  # ceil((lo - start) / d)
    last = te.min(tir.floordiv(hi - 1 - start, d), k - 1)
    return te.max(last - first + 1, 1)


def _pool_compute(kind: str):
    def compute(x, a: PoolAttrs):
        from tvm import te, tirx as tir

        nd = len(a.kernel)
        out = _out_shape(TensorType(tuple(int(d) for d in x.shape), str(x.dtype)), a, kind)
        axes = [te.reduce_axis((0, k), name=f"r{i}") for i, k in enumerate(a.kernel)]

        def coords(i):
            return [i[2 + d] * a.strides[d] + axes[d] * a.dilation[d] - a.padding[d] for d in range(nd)]

        def inside(c):
            return tir.all(*[tir.all(c[d] >= 0, c[d] < x.shape[2 + d]) for d in range(nd)])

        shape = tuple(x.shape[:2]) + out
        acc, dtype = accumulator(x.dtype), str(x.dtype)  # window sums of float16 in float32, rounded once
        if kind == "lp":  # (sum over the window of |x|^p) ^ (1/p); padding adds 0
            total = te.compute(shape, lambda *i: te.sum(tir.if_then_else(
                inside(coords(i)), _lp_power(cast(x(i[0], i[1], *coords(i)), acc), a.p), tir.const(0, acc)),
                axis=axes), name="lp_pool_sum")
            return te.compute(shape, lambda *i: cast(_lp_root(total(*i), a.p), dtype), name="lp_pool")
        if kind == "max":  # a NaN in the window makes the result NaN (float_math.reduce_max)
            low = tir.min_value(x.dtype)
            return te.compute(shape, lambda *i: float_math.reduce_max(tir.if_then_else(
                inside(coords(i)), x(i[0], i[1], *coords(i)), low), axis=axes, from_lowest=True), name="max_pool")
        total = te.compute(shape, lambda *i: te.sum(tir.if_then_else(
            inside(coords(i)), cast(x(i[0], i[1], *coords(i)), acc), tir.const(0, acc)), axis=axes), name="pool_sum")

        def count(i):
            n = tir.const(1, "int32")
            for d in range(nd):
                start = i[2 + d] * a.strides[d] - a.padding[d]
                lo = -a.padding[d] if a.count_include_pad else 0
                hi = x.shape[2 + d] + (a.padding[d + nd] if a.count_include_pad else 0)
                n = n * window_count(start, a.kernel[d], a.dilation[d], lo, hi)
            return n

        return te.compute(shape, lambda *i: cast(total(*i) / count(i).astype(acc), dtype), name="avg_pool")
    return compute


def _lp_power(v, p: int):
    """|v|^p: a multiply for p = 2."""
    from tvm import te
    from tvm import tirx as tir

    if p == 1:
        return te.abs(v)
    return v * v if p == 2 else te.power(te.abs(v), tir.const(float(p), float_math._dtype(v)))


def _lp_root(v, p: int):
    """v^(1/p)."""
    from tvm import te
    from tvm import tirx as tir

    if p == 1:
        return v
    return te.sqrt(v) if p == 2 else te.power(v, tir.const(1.0 / p, float_math._dtype(v)))


define_compute(MAX_POOL)(_pool_compute("max"))
define_compute(LP_POOL)(_pool_compute("lp"))
define_compute(AVG_POOL)(_pool_compute("avg"))


@define_compute(GLOBAL_AVG_POOL)
def global_avg_pool_compute(x, a: GlobalPoolAttrs):
    from tvm import te

    axes = [te.reduce_axis((0, d), name=f"r{i}") for i, d in enumerate(x.shape[2:])]
    n = 1
    for d in x.shape[2:]:
        n *= int(d)
    acc = accumulator(x.dtype)  # float16 sums in float32, rounded once
    total = te.compute(tuple(x.shape[:2]) + (1,) * len(axes),
                       lambda b, c, *_: te.sum(cast(x[(b, c, *axes)], acc), axis=axes), name="global_sum")
    return te.compute(total.shape, lambda *i: cast(total(*i) / float(n), str(x.dtype)), name="global_avg_pool")


@define_compute(GLOBAL_MAX_POOL)
def global_max_pool_compute(x, a: GlobalPoolAttrs):
    from tvm import te

    axes = [te.reduce_axis((0, d), name=f"r{i}") for i, d in enumerate(x.shape[2:])]
    return te.compute(tuple(x.shape[:2]) + (1,) * len(axes),
                      lambda b, c, *_: float_math.reduce_max(x[(b, c, *axes)], axis=axes, from_lowest=True),
                      name="global_max_pool")


@define_compute(GLOBAL_LP_POOL)
def global_lp_pool_compute(x, a: GlobalPoolAttrs):
    from tvm import te

    axes = [te.reduce_axis((0, d), name=f"r{i}") for i, d in enumerate(x.shape[2:])]
    acc = accumulator(x.dtype)
    total = te.compute(tuple(x.shape[:2]) + (1,) * len(axes), lambda b, c, *_: te.sum(
        _lp_power(cast(x[(b, c, *axes)], acc), a.p), axis=axes), name="global_lp_sum")
    return te.compute(total.shape, lambda *i: cast(_lp_root(total(*i), a.p), str(x.dtype)), name="global_lp_pool")
