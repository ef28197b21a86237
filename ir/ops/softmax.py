"""softmax, log_softmax and hardmax along one axis (ONNX ≥ 13 semantics; the frontend reshapes older models'
"coerce to 2-D" form into this)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.errors import TypeCheckError

from ..op import OpDef, OpPattern, define_compute, register_op
from ..types import TensorType, is_float
from . import float_math
from .accumulate import accumulator, cast, cast_stage


@dataclass(frozen=True)
class SoftmaxAttrs:
    axis: int = -1  # non-negative after import


def _type(op: str):
    def rule(x: TensorType, a: SoftmaxAttrs) -> TensorType:
        if not is_float(x.dtype):
            raise TypeCheckError(f"{op} takes float tensors, got {x}")
        if not 0 <= a.axis < x.ndim:
            raise TypeCheckError(f"{op}: axis {a.axis} out of range for {x}")
        return x
    return rule


def _softmax(x: np.ndarray, a: SoftmaxAttrs) -> np.ndarray:
    # in x's dtype, as ONNX's reference: the kernel sums in float32 (no difference for float16, whose NumPy sum
    # accumulates in float32; up to a bfloat16 ulp, as NumPy sums bfloat16 in bfloat16)
    e = np.exp(x - x.max(axis=a.axis, keepdims=True))
    return (e / e.sum(axis=a.axis, keepdims=True)).astype(x.dtype)


def _log_softmax(x: np.ndarray, a: SoftmaxAttrs) -> np.ndarray:
    s = x - x.max(axis=a.axis, keepdims=True)
    return (s - np.log(np.exp(s).sum(axis=a.axis, keepdims=True))).astype(x.dtype)


def _hardmax(x: np.ndarray, a: SoftmaxAttrs) -> np.ndarray:
    idx = np.expand_dims(np.argmax(x, axis=a.axis), a.axis)
    out = np.zeros_like(x)
    np.put_along_axis(out, idx, 1, axis=a.axis)
    return out


def _flops(x: TensorType, a: SoftmaxAttrs) -> int:
    return 5 * x.size if x.is_static else 0


SOFTMAX = register_op(OpDef("nn.softmax", SoftmaxAttrs, _type("nn.softmax"), _softmax, OpPattern.OPAQUE,
                            flops=_flops))
LOG_SOFTMAX = register_op(OpDef("nn.log_softmax", SoftmaxAttrs, _type("nn.log_softmax"), _log_softmax,
                                OpPattern.OPAQUE, flops=_flops))
HARDMAX = register_op(OpDef("nn.hardmax", SoftmaxAttrs, _type("nn.hardmax"), _hardmax, OpPattern.OPAQUE,
                            flops=_flops))


@define_compute(SOFTMAX)
def softmax_compute(x, a: SoftmaxAttrs):
    """Along the last axis, four stages that `schedules/x86/softmax.py` finds by name: the row max, exp(x - max)
    computed once (vectorizable, see float_math), its row sum, the quotient. float16 and bfloat16 compute in
    float32 (no bfloat16 buffer inside the kernel, which TVM's legalization mishandles) and sum in float32; the
    exponentials, their sum and the quotient each round to x's dtype, as ONNX's reference (NumPy on float16)
    and ONNX Runtime's Exp → ReduceSum → Div do. Other axes: TOPI's softmax, in float32 likewise."""
    from tvm import te, tirx as tir, topi

    acc, dtype = accumulator(x.dtype), str(x.dtype)
    if a.axis != len(x.shape) - 1:
        wide = cast_stage(x, acc, "softmax_widen")
        return cast_stage(topi.nn.softmax(wide, a.axis), dtype, "softmax_round")

    def stored(v):  # v rounded to x's dtype, held in the accumulator dtype (v itself for float32)
        return cast(cast(v, dtype), acc)

    rows, n = tuple(x.shape[:-1]), x.shape[-1]
    k = te.reduce_axis((0, n), name="k")
    top = te.compute(rows, lambda *i: te.max(cast(x[(*i, k)], acc), axis=k), name="softmax_max")
    e = te.compute(x.shape, lambda *i: stored(float_math.exp(cast(x[i], acc) - top[i[:-1]])), name="softmax_exp")
    k = te.reduce_axis((0, n), name="k")
    total = te.compute(rows, lambda *i: te.sum(e[(*i, k)], axis=k), name="softmax_sum")
    # times the reciprocal, as ONNX Runtime does (within 1 ulp of the quotient): LLVM hoists the one division out
    # of the row's loop; a vector division per element made BERT's softmax kernel 1.1-1.3x as long
    one = tir.const(1.0, acc)
    return te.compute(x.shape, lambda *i: cast(e[i] * (one / stored(total[i[:-1]])), dtype), name="softmax_norm")


@define_compute(LOG_SOFTMAX)
def log_softmax_compute(x, a: SoftmaxAttrs):
    from tvm import topi

    acc = accumulator(x.dtype)
    wide = cast_stage(x, acc, "log_softmax_widen")
    return cast_stage(topi.nn.log_softmax(wide, a.axis), str(x.dtype), "log_softmax_round")


@define_compute(HARDMAX)
def hardmax_compute(x, a: SoftmaxAttrs):
    """1 at the first maximum along the axis (a NaN counts as the maximum, as np.argmax), 0 elsewhere."""
    from tvm import te
    from tvm import tirx as tir

    from .reduce import ARGMAX, ArgReduceAttrs

    idx = ARGMAX.compute(x, ArgReduceAttrs(axis=a.axis, keepdims=True))
    one, zero = tir.const(1, x.dtype), tir.const(0, x.dtype)
    return te.compute(x.shape, lambda *i: tir.Select(
        i[a.axis].astype("int64") == idx[tuple(0 if d == a.axis else v for d, v in enumerate(i))], one, zero),
        name="hardmax")
