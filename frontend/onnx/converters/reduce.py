"""ONNX Reduce* and ArgMax/ArgMin → Kiln reductions. Axes moved from attribute to input at opset 13 (ReduceSum)
and 18 (the rest); an empty axes input means all axes, or nothing when noop_with_empty_axes is set."""

from __future__ import annotations

from kiln.ir.ops import reduce as rd

from ..registry import Node, converter
from .tensor import _norm_axes

_KINDS = {"ReduceSum": "sum", "ReduceMean": "mean", "ReduceMax": "max", "ReduceMin": "min", "ReduceProd": "prod",
          "ReduceL1": "l1", "ReduceL2": "l2", "ReduceSumSquare": "sum_square", "ReduceLogSum": "log_sum",
          "ReduceLogSumExp": "log_sum_exp"}


@converter(*_KINDS)
def convert_reduce(node: Node):
    x = node.input(0)
    axes_as_input = node.opset >= (13 if node.op_type == "ReduceSum" else 18)
    if axes_as_input:
        v = node.constant(1, "axes", required=False)
        axes = None if v is None or v.size == 0 else [int(a) for a in v.reshape(-1)]
    else:
        axes = node.attr_ints("axes", None)
    if axes is None and node.attr_int("noop_with_empty_axes", 0):
        return x
    keepdims = bool(node.attr_int("keepdims", 1))
    norm = None if axes is None else tuple(sorted(_norm_axes(node, axes, x.ttype.ndim)))
    return node.make(rd.REDUCE_OPS[_KINDS[node.op_type]], x, axes=norm, keepdims=keepdims)


@converter("ArgMax", "ArgMin")
def convert_arg(node: Node):
    x = node.input(0)
    axis = _norm_axes(node, [node.attr_int("axis", 0)], x.ttype.ndim)[0]
    op = rd.ARGMAX if node.op_type == "ArgMax" else rd.ARGMIN
    return node.make(op, x, axis=axis, keepdims=bool(node.attr_int("keepdims", 1)),
                     select_last_index=bool(node.attr_int("select_last_index", 0)))
