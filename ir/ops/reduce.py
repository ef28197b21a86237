"""Reductions over a set of axes (sum, mean, max, min, prod, norms, log-sum-exp) and arg-reductions.

`axes=None` reduces every axis. Rows of one table share the type rule; each gives its NumPy reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kiln.errors import TypeCheckError

from ..op import OpDef, OpPattern, define_compute, register_op
from ..types import TensorType, is_float
from . import float_math


@dataclass(frozen=True)
class ReduceAttrs:
    axes: tuple[int, ...] | None = None  # non-negative; None: all
    keepdims: bool = True


def _axes(x: TensorType, a) -> tuple[int, ...]:
    axes = tuple(range(x.ndim)) if a.axes is None else a.axes
    for ax in axes:
        if not 0 <= ax < max(x.ndim, 1):
            raise TypeCheckError(f"reduction axis {ax} out of range for {x}")
    return axes


def _reduce_type(x: TensorType, a: ReduceAttrs) -> TensorType:
    axes = _axes(x, a)
    if a.keepdims:
        return TensorType(tuple(1 if i in axes else d for i, d in enumerate(x.shape)), x.dtype)
    return TensorType(tuple(d for i, d in enumerate(x.shape) if i not in axes), x.dtype)


def _in_float(fn: Callable) -> Callable:
    """Integer inputs are reduced in float64 and cast back, as ONNX Runtime effectively does for means."""
    def run(x, axis, keepdims):
        return fn(x.astype(np.float64) if not is_float(x.dtype.name) else x, axis=axis, keepdims=keepdims)
    return run


def _logsumexp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True) if x.size else np.zeros_like(x)
    m = np.where(np.isfinite(m), m, 0)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


_REDUCERS: dict[str, Callable] = {
    "sum": np.sum,
    "mean": _in_float(np.mean),
    "max": np.max,
    "min": np.min,
    "prod": np.prod,
    "l1": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "l2": _in_float(lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims))),
    "sum_square": lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims),
    "log_sum": _in_float(lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims))),
    "log_sum_exp": _in_float(_logsumexp),
}


def _register(kind: str) -> OpDef:
    fn = _REDUCERS[kind]

    def reference(x: np.ndarray, a: ReduceAttrs) -> np.ndarray:
        axes = _axes(TensorType(x.shape, x.dtype.name), a)
        if kind in ("max", "min") and x.size == 0:
            fill = -np.inf if kind == "max" else np.inf
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape)) if a.keepdims else tuple(
                d for i, d in enumerate(x.shape) if i not in axes)
            return np.full(shape, fill).astype(x.dtype)
        with np.errstate(divide="ignore"):
            return np.asarray(fn(x, axis=axes, keepdims=a.keepdims)).astype(x.dtype)

    return register_op(OpDef(f"{kind}" if kind in ("sum", "mean", "max", "min", "prod") else f"reduce_{kind}",
                             ReduceAttrs, _reduce_type, reference, OpPattern.COMM_REDUCE,
                             flops=lambda x, a: x.size if x.is_static else 0))


REDUCE_OPS = {kind: _register(kind) for kind in _REDUCERS}
SUM, MEAN, MAX, MIN, PROD = (REDUCE_OPS[k] for k in ("sum", "mean", "max", "min", "prod"))


@dataclass(frozen=True)
class ArgReduceAttrs:
    axis: int = 0
    keepdims: bool = True
    select_last_index: bool = False


def _arg_type(x: TensorType, a: ArgReduceAttrs) -> TensorType:
    if not 0 <= a.axis < x.ndim:
        raise TypeCheckError(f"arg-reduction axis {a.axis} out of range for {x}")
    shape = tuple(1 if i == a.axis else d for i, d in enumerate(x.shape)) if a.keepdims else tuple(
        d for i, d in enumerate(x.shape) if i != a.axis)
    return TensorType(shape, "int64")


def _arg(fn):
    def reference(x: np.ndarray, a: ArgReduceAttrs) -> np.ndarray:
        if a.select_last_index:
            flipped = np.flip(x, a.axis)
            idx = x.shape[a.axis] - 1 - fn(flipped, axis=a.axis)
        else:
            idx = fn(x, axis=a.axis)
        idx = idx.astype(np.int64)
        return np.expand_dims(idx, a.axis) if a.keepdims else idx
    return reference


ARGMAX = register_op(OpDef("argmax", ArgReduceAttrs, _arg_type, _arg(np.argmax), OpPattern.COMM_REDUCE,
                           flops=lambda x, a: x.size if x.is_static else 0))
ARGMIN = register_op(OpDef("argmin", ArgReduceAttrs, _arg_type, _arg(np.argmin), OpPattern.COMM_REDUCE,
                           flops=lambda x, a: x.size if x.is_static else 0))


def _reduce_compute(kind: str):
    def compute(x, a: ReduceAttrs):
        from tvm import topi

        axes = list(range(len(x.shape))) if a.axes is None else list(a.axes)
        if kind == "mean":
            n = 1
            for ax in axes:
                n *= int(x.shape[ax])
            return topi.divide(topi.sum(x, axes, a.keepdims), float(n))
        if kind in ("max", "min"):  # a NaN among the reduced elements gives NaN, as np.max and the ONNX reference
            return _nan_reduce(x, axes, a.keepdims, float_math.reduce_max if kind == "max" else float_math.reduce_min)
        return {"sum": topi.sum, "prod": topi.prod}[kind](x, axes, a.keepdims)
    return compute


def _nan_reduce(x, axes: list[int], keepdims: bool, reducer):
    from tvm import te

    rs = {ax: te.reduce_axis((0, x.shape[ax]), name=f"k{ax}") for ax in axes}
    keep = [ax for ax in range(len(x.shape)) if ax not in rs]
    shape = [1 if ax in rs else x.shape[ax] for ax in range(len(x.shape))] if keepdims else [x.shape[ax] for ax in keep]

    def body(*i):
        if keepdims:
            idx = [rs[ax] if ax in rs else i[ax] for ax in range(len(x.shape))]
        else:
            at = dict(zip(keep, i))
            idx = [rs[ax] if ax in rs else at[ax] for ax in range(len(x.shape))]
        return reducer(x[tuple(idx)], axis=list(rs.values()))

    return te.compute(shape, body, name="reduce")


for _kind in ("sum", "mean", "max", "min", "prod"):
    define_compute(REDUCE_OPS[_kind])(_reduce_compute(_kind))
