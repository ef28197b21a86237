"""ONNX's integer and QOperator ops (what ONNX Runtime's quantization tools emit besides QDQ pairs) → Kiln ops:
MatMulInteger, ConvInteger, QLinearMatMul, QLinearConv.

Each becomes the exact integer computation the ONNX spec defines: operands widened to int32 with their zero
points subtracted, an int32 matmul or conv, and for the QLinear ops a requantization in float64 (the spec's
reference multiplies the int32 result by the float32 scale ratio in NumPy, which computes that in float64;
a float32 multiply rounds some values to the other side of a .5 and so one step off). Constant operands (the
weights) fold at import, so only the activation side costs work at run time. These are correct, not fast:
the kernels are Kiln's int32 ones, not VNNI int8 dot products.
"""

from __future__ import annotations

import numpy as np

from kiln.ir import Constant, Expr
from kiln.ir.ops import conv as cv
from kiln.ir.ops import dense as dn
from kiln.ir.ops import elementwise as ew

from ..registry import Node, converter
from .nn import _auto_pad
from .tensor import _static_shape, reshape

_INT8 = ("int8", "uint8")


def _int8_operand(node: Node, x: Expr, what: str) -> Expr:
    if x.ttype.dtype not in _INT8:
        raise node.invalid(f"{what} must be int8 or uint8, got {x.ttype.dtype}")
    return x


def _centered(node: Node, x: Expr, zero: Expr | None, axis: int | None) -> Expr:
    """x - zero in int32. `zero` is a scalar, or 1-D along `axis` of x (per row, per column or per channel)."""
    out = node.make(ew.CAST, x, dtype="int32")
    if zero is None:
        return out
    if zero.ttype.dtype != x.ttype.dtype:
        raise node.invalid(f"zero point dtype {zero.ttype.dtype} differs from its operand's {x.ttype.dtype}")
    z = node.make(ew.CAST, zero, dtype="int32")
    return node.make(ew.SUBTRACT, out, _along(node, z, x.ttype.ndim, axis, "zero point"))


def _along(node: Node, p: Expr, ndim: int, axis: int | None, what: str) -> Expr:
    """A scalar or 1-element parameter as a scalar; a 1-D one shaped to broadcast along `axis` of an ndim-D
    tensor (axis None: only a single value is accepted)."""
    shape = _static_shape(node, p)
    size = int(np.prod(shape, dtype=np.int64))
    if size == 1:
        return reshape(node, p, ())
    if len(shape) != 1 or axis is None:
        raise node.unsupported(f"a {what} of shape {list(shape)} (scalars, or 1-D per row, column or channel)")
    target = [1] * ndim
    target[axis % ndim] = size
    return reshape(node, p, tuple(target))


def _int_matmul(node: Node, a: Expr, b: Expr) -> Expr:
    if isinstance(b, Constant) and b.ttype.ndim == 2 and a.ttype.ndim >= 2:
        return node.make(dn.DENSE, a, Constant(np.ascontiguousarray(b.value.T)))  # as MatMul: weights pre-transposed
    return node.make(dn.MATMUL, a, b)


@converter("MatMulInteger")
def convert_matmul_integer(node: Node):
    a = _int8_operand(node, node.input(0), "A")
    b = _int8_operand(node, node.input(1), "B")
    a32 = _centered(node, a, node.input(2, required=False), -2 if a.ttype.ndim >= 2 else None)
    b32 = _centered(node, b, node.input(3, required=False), -1)
    return _int_matmul(node, a32, b32)


def _requantize(node: Node, acc: Expr, scale: Expr, y_scale: Expr, y_zero: Expr | None, out_dtype: str) -> Expr:
    """saturate(round(acc * (scale / y_scale)) + y_zero): the ratio in float32 as the reference forms it, the
    product and the rounding in float64."""
    ratio = node.make(ew.DIVIDE, scale, y_scale)
    y = node.make(ew.MULTIPLY, node.make(ew.CAST, acc, dtype="float64"), node.make(ew.CAST, ratio, dtype="float64"))
    if y_zero is not None:
        y = node.make(ew.ADD, y, node.make(ew.CAST, y_zero, dtype="float64"))
    info = np.iinfo(out_dtype)
    y = node.make(ew.CLIP, node.make(ew.OPS["round"], y), min=float(info.min), max=float(info.max))
    return node.make(ew.CAST, y, dtype=out_dtype)


@converter("QLinearMatMul")
def convert_qlinear_matmul(node: Node):
    a = _int8_operand(node, node.input(0), "a")
    b = _int8_operand(node, node.input(3), "b")
    a_scale, b_scale, y_scale = node.input(1), node.input(4), node.input(6)
    a_zero, b_zero = node.input(2, required=False), node.input(5, required=False)
    y_zero = node.input(7, required=False)
    row = -2 if a.ttype.ndim >= 2 else None
    acc = _int_matmul(node, _centered(node, a, a_zero, row), _centered(node, b, b_zero, -1))
    nd = acc.ttype.ndim
    scale = node.make(ew.MULTIPLY, _along(node, a_scale, nd, -2 if nd >= 2 else None, "a_scale"),
                      _along(node, b_scale, nd, -1, "b_scale"))
    out = y_zero.ttype.dtype if y_zero is not None else a.ttype.dtype
    return _requantize(node, acc, scale, _along(node, y_scale, 0, None, "y_scale"), y_zero, out)


def _int_conv(node: Node, x32: Expr, w32: Expr, kernel_from: Expr) -> Expr:
    nd = x32.ttype.ndim - 2
    if nd not in cv.CONV_BY_RANK:
        raise node.unsupported(f"{nd}-D convolution")
    kernel = node.attr_ints("kernel_shape", None) or tuple(_static_shape(node, kernel_from)[2:])
    strides = node.attr_ints("strides", (1,) * nd)
    dilation = node.attr_ints("dilations", (1,) * nd)
    pads = _auto_pad(node, _static_shape(node, x32)[2:], kernel, strides, dilation)
    return node.make(cv.CONV_BY_RANK[nd], x32, w32, strides=strides, padding=pads, dilation=dilation,
                     groups=node.attr_int("group", 1))


@converter("ConvInteger")
def convert_conv_integer(node: Node):
    x = _int8_operand(node, node.input(0), "x")
    w = _int8_operand(node, node.input(1), "w")
    x32 = _centered(node, x, node.input(2, required=False), None)
    return _int_conv(node, x32, _centered(node, w, node.input(3, required=False), 0), w)


@converter("QLinearConv")
def convert_qlinear_conv(node: Node):
    x = _int8_operand(node, node.input(0), "x")
    w = _int8_operand(node, node.input(3), "w")
    x_scale, w_scale, y_scale = node.input(1), node.input(4), node.input(6)
    x_zero, w_zero, y_zero = node.input(2, required=False), node.input(5, required=False), node.input(7, required=False)
    bias = node.input(8, required=False)
    acc = _int_conv(node, _centered(node, x, x_zero, None), _centered(node, w, w_zero, 0), w)
    nd = acc.ttype.ndim
    if bias is not None:
        if bias.ttype.dtype != "int32":
            raise node.invalid(f"B must be int32, got {bias.ttype.dtype}")
        acc = node.make(ew.ADD, acc, _along(node, bias, nd, 1, "bias"))
    scale = node.make(ew.MULTIPLY, _along(node, x_scale, 0, None, "x_scale"), _along(node, w_scale, nd, 1, "w_scale"))
    out = y_zero.ttype.dtype if y_zero is not None else x.ttype.dtype
    return _requantize(node, acc, scale, _along(node, y_scale, 0, None, "y_scale"), y_zero, out)
