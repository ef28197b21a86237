"""ONNX elementwise ops → Kiln elementwise ops. Multidirectional broadcasting maps straight onto NumPy's."""

from __future__ import annotations

from kiln.ir.ops import elementwise as ew

from ..registry import Node, converter

_UNARY = {"Relu": ew.RELU, "Neg": ew.NEGATIVE, "Abs": ew.ABS, "Exp": ew.EXP, "Log": ew.LOG, "Sqrt": ew.SQRT,
          "Sigmoid": ew.SIGMOID, "Tanh": ew.TANH}
_BINARY = {"Add": ew.ADD, "Sub": ew.SUBTRACT, "Mul": ew.MULTIPLY, "Div": ew.DIVIDE, "Pow": ew.POWER,
           "Equal": ew.EQUAL, "Less": ew.LESS, "Greater": ew.GREATER}


@converter(*_UNARY)
def convert_unary(node: Node):
    return node.make(_UNARY[node.op_type], node.input(0))


@converter(*_BINARY)
def convert_binary(node: Node):
    if node.opset < 7 and node.has_attr("broadcast"):
        raise node.unsupported("legacy broadcast attribute (opset < 7)")
    return node.make(_BINARY[node.op_type], node.input(0), node.input(1))
