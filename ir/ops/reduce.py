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
from .accumulate import accumulator, cast, cast_stage


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
    # an empty reduction has no max; its shape is still the reduced one (log(0) = -inf follows)
    m = np.max(x, axis=axis, keepdims=True) if x.size else np.zeros(np.sum(x, axis=axis, keepdims=True).shape, x.dtype)
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
            # the reduction's identity: -inf / +inf, and for bool any() / all() of nothing: False / True
            fill = (kind == "min") if x.dtype == np.bool_ else -np.inf if kind == "max" else np.inf
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape)) if a.keepdims else tuple(
                d for i, d in enumerate(x.shape) if i not in axes)
            return np.full(shape, fill).astype(x.dtype)
        wide = x.astype(accumulator(x.dtype.name))  # as the kernel (exact for max and min)
        with np.errstate(divide="ignore"):
            return np.asarray(fn(wide, axis=axes, keepdims=a.keepdims)).astype(x.dtype)

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
        from tvm import te, topi
        from tvm import tirx as tir

        axes = list(range(len(x.shape))) if a.axes is None else list(a.axes)
        dtype = str(x.dtype)
        # float16 and bfloat16: the same reduction of x widened to float32, rounded once. max and min are exact in
        # float16; bfloat16 widens them too, as TVM cannot store a bfloat16 vector that is not a cast from float32
        if accumulator(dtype) != dtype and (kind not in ("max", "min") or dtype == "bfloat16"):
            if kind == "log_sum_exp":  # its exp's Lets must see the bfloat16 load itself (float_math.bind)
                return _log_sum_exp(x, axes, a.keepdims, accumulator(dtype))
            wide = compute(cast_stage(x, accumulator(dtype), "reduce_widen"), a)
            return cast_stage(wide, dtype, f"reduce_{kind}_round")
        if kind == "mean":
            n = 1
            for ax in axes:
                n *= int(x.shape[ax])
            total = topi.sum(x, axes, a.keepdims)
            # an empty input: 0 / 0 is NaN, as np.mean (a float division also for integer inputs, cast back)
            return te.compute(total.shape, lambda *i: (total(*i).astype("float64") / float(n)).astype(x.dtype)
                              if not is_float(str(x.dtype)) else total(*i) / tir.const(float(n), x.dtype),
                              name="reduce_mean")
        if kind in ("max", "min"):  # a NaN among the reduced elements gives NaN, as np.max and the ONNX reference
            reducer = float_math.reduce_max if kind == "max" else float_math.reduce_min
            if str(x.dtype) == "bool":  # any / all: TVM has no min or max value for bool, so reduce 0/1 as int8
                as_int = te.compute(x.shape, lambda *i: x(*i).astype("int8"), name="bool_as_int8")
                r = _nan_reduce(as_int, axes, a.keepdims, reducer)
                # > 0, not != 0: an empty reduction leaves int8's identity (-128 for max, 127 for min), which
                # must read False for max (any) and True for min (all)
                return te.compute(r.shape, lambda *i: r(*i) > tir.const(0, "int8"), name=f"reduce_{kind}_bool")
            whole = _whole_in_parts(x, axes, a.keepdims, reducer)
            return whole if whole is not None else _nan_reduce(x, axes, a.keepdims, reducer)
        if kind in ("sum", "prod"):
            return {"sum": topi.sum, "prod": topi.prod}[kind](x, axes, a.keepdims)
        if kind == "l1":
            return _nan_reduce(x, axes, a.keepdims, te.sum, lambda v: te.abs(v))
        if kind == "sum_square":
            return _nan_reduce(x, axes, a.keepdims, te.sum, lambda v: v * v)
        acc = dtype if is_float(dtype) else "float64"  # integers reduce in float64 (the reference)
        if kind == "log_sum_exp":
            return _log_sum_exp(x, axes, a.keepdims, acc)
        square = kind == "l2"
        total = _nan_reduce(x, axes, a.keepdims, te.sum,
                            lambda v: v.astype(acc) * v.astype(acc) if square else v.astype(acc))
        finish = te.sqrt if square else te.log
        return te.compute(total.shape, lambda *i: finish(total(*i)).astype(x.dtype), name=f"reduce_{kind}")
    return compute


def _log_sum_exp(x, axes: list[int], keepdims: bool, acc: str):
    """log(sum(exp(x - m))) + m with m the (NaN-keeping) maximum, replaced by 0 where it is not finite: a row of
    -inf gives -inf, a row holding +inf gives inf, a NaN gives NaN (the reference)."""
    from tvm import te
    from tvm import tirx as tir

    # integers through a float64 stage; float16 and bfloat16 cast as they are read
    xs = x if is_float(str(x.dtype)) else te.compute(x.shape, lambda *i: x(*i).astype(acc), name="reduce_cast")
    top = _nan_reduce(xs, axes, True, float_math.reduce_max, lambda v: cast(v, acc))
    zero = tir.const(0.0, acc)
    big = tir.const(float("inf"), acc)

    def shift(i):  # the max at a (kept-dims) element index, or 0 where it is ±inf or NaN
        m = top[tuple(0 if ax in axes else v for ax, v in enumerate(i))]
        return tir.Select(tir.all(-big < m, m < big), m, zero)

    shifted = te.compute(xs.shape, lambda *i: float_math.exp(cast(xs(*i), acc) - shift(i)),
                         name="reduce_log_sum_exp_exp")
    total = _nan_reduce(shifted, axes, keepdims, te.sum)
    keep = [ax for ax in range(len(x.shape)) if ax not in axes]

    def full(i):  # an output index → the kept-dims index of `top`
        if keepdims:
            return i
        at = dict(zip(keep, i))
        return tuple(at.get(ax, 0) for ax in range(len(x.shape)))

    return te.compute(total.shape, lambda *i: (te.log(total(*i)) + shift(full(i))).astype(x.dtype),
                      name="reduce_log_sum_exp")


PARTS, LANES = 16, 16  # a whole-tensor max/min in parts × lanes partial results


def _whole_in_parts(x, axes: list[int], keepdims: bool, reducer):
    """A max or min over every element of a large tensor (DynamicQuantizeLinear's range, in ONNX Runtime's
    `quantize_dynamic` models) in two stages: PARTS × LANES partial results over contiguous stretches, which
    the schedule runs in parallel and vectorized, then one small reduction of those. The NaN-keeping reducers
    are not ones TVM's rfactor knows, so as one stage it ran as a scalar loop on one core (1.47 ms for a
    128 × 3072 activation). None where the tensor is not whole-reduced or not large and divisible enough."""
    from tvm import te

    shape = [int(d) for d in x.shape]
    total = 1
    for d in shape:
        total *= d
    if sorted(axes) != list(range(len(shape))) or total < 64 * PARTS * LANES or total % (PARTS * LANES):
        return None
    per = total // (PARTS * LANES)
    j = te.reduce_axis((0, per), name="j")

    def element(f):
        idx = []
        for d in reversed(shape):
            idx.append(f % d)
            f = f // d
        return x[tuple(reversed(idx))]

    partial = te.compute((PARTS, LANES), lambda p, lane: reducer(element((p * per + j) * LANES + lane), axis=[j]),
                         name="reduce_part")
    rp, rl = te.reduce_axis((0, PARTS), name="rp"), te.reduce_axis((0, LANES), name="rl")
    out_shape = [1] * len(shape) if keepdims else []
    return te.compute(out_shape, lambda *i: reducer(partial[rp, rl], axis=[rp, rl]), name="reduce")


def _nan_reduce(x, axes: list[int], keepdims: bool, reducer, elem=None):
    """reducer(elem(x[...])) over `axes`, with the output shape of ReduceAttrs(axes, keepdims)."""
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
        v = x[tuple(idx)]
        return reducer(elem(v) if elem is not None else v, axis=list(rs.values()))

    return te.compute(shape, body, name="reduce")


def _arg_reducer(kind: str, last: bool):
    """(index, value) pairs → the index of the max (min) value; NaN counts as the extreme, as np.argmax/argmin;
    ties go to the smaller index, or with `last` the larger. Commutative, so any reduction order gives the same."""
    from tvm import te
    from tvm import tirx as tir

    def combine(a, b):
        (ia, va), (ib, vb) = a, b
        if float_math._dtype(va).startswith(("float", "bfloat")):
            na, nb = float_math.is_nan(va), float_math.is_nan(vb)
            better = (vb > va) if kind == "max" else (vb < va)
            take_b = tir.Or(tir.And(nb, tir.Not(na)), tir.And(tir.Not(na), better))
            same = tir.Or(tir.And(na, nb), vb == va)
        else:
            take_b = (vb > va) if kind == "max" else (vb < va)
            same = vb == va
        take_b = tir.Or(take_b, tir.And(same, (ib > ia) if last else (ib < ia)))
        return tir.Select(take_b, ib, ia), tir.Select(take_b, vb, va)

    def identity(i_dtype, v_dtype):
        worst = (tir.const(float("-inf") if kind == "max" else float("inf"), v_dtype)
                 if str(v_dtype).startswith(("float", "bfloat"))
                 else tir.min_value(v_dtype) if kind == "max" else tir.max_value(v_dtype))
        return tir.const(-1, i_dtype) if last else tir.max_value(i_dtype), worst

    return te.comm_reducer(combine, identity, name=f"arg{kind}{'_last' if last else ''}")


def _arg_compute(kind: str):
    def compute(x, a: ArgReduceAttrs):
        from tvm import te

        k = te.reduce_axis((0, x.shape[a.axis]), name="k")
        nd = len(x.shape)
        shape = [1 if ax == a.axis else x.shape[ax] for ax in range(nd)] if a.keepdims else [
            x.shape[ax] for ax in range(nd) if ax != a.axis]
        reducer = _arg_reducer(kind, a.select_last_index)

        def body(*i):
            if a.keepdims:
                idx = [k if ax == a.axis else i[ax] for ax in range(nd)]
            else:
                rest = list(i)
                idx = [k if ax == a.axis else rest.pop(0) for ax in range(nd)]
            v = x[tuple(idx)]
            if str(x.dtype) in ("float16", "bfloat16"):  # compared in float32, exactly: TVM's bfloat16 lowering
                v = v.astype("float32")                    # does not rewrite the reduction's value binding
            return reducer((k.var.astype("int64"), v), axis=k)

        both = te.compute(shape, body, name=f"arg{kind}")
        return te.compute(shape, lambda *i: both[0](*i), name=f"arg{kind}_index")
    return compute


for _kind in _REDUCERS:
    define_compute(REDUCE_OPS[_kind])(_reduce_compute(_kind))
define_compute(ARGMAX)(_arg_compute("max"))
define_compute(ARGMIN)(_arg_compute("min"))
