"""ONNX elementwise ops → Kiln elementwise ops. Multidirectional broadcasting maps straight onto NumPy's."""

from __future__ import annotations

import numpy as np
import onnx

from kiln.ir import Constant
from kiln.ir.ops import elementwise as ew
from kiln.ir.ops import transform as tf

from ..registry import Node, converter

_UNARY = {
    "Relu": "nn.relu", "Neg": "negative", "Abs": "abs", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
    "Sigmoid": "sigmoid", "Tanh": "tanh", "Erf": "erf", "Sin": "sin", "Cos": "cos", "Tan": "tan",
    "Asin": "asin", "Acos": "acos", "Atan": "atan", "Sinh": "sinh", "Cosh": "cosh", "Asinh": "asinh",
    "Acosh": "acosh", "Atanh": "atanh", "Floor": "floor", "Ceil": "ceil", "Round": "round", "Sign": "sign",
    "Reciprocal": "reciprocal", "Softplus": "softplus", "Softsign": "softsign", "Mish": "nn.mish",
    "HardSwish": "nn.hard_swish", "Not": "logical_not", "BitwiseNot": "bitwise_not",
}
_BINARY = {
    "Add": "add", "Sub": "subtract", "Mul": "multiply", "Div": "divide", "Equal": "equal", "Less": "less",
    "Greater": "greater", "LessOrEqual": "less_equal", "GreaterOrEqual": "greater_equal", "And": "logical_and",
    "Or": "logical_or", "Xor": "logical_xor", "BitwiseAnd": "bitwise_and", "BitwiseOr": "bitwise_or",
    "BitwiseXor": "bitwise_xor",
}


@converter(*_UNARY)
def convert_unary(node: Node):
    return node.make(ew.OPS[_UNARY[node.op_type]], node.input(0))


@converter(*_BINARY)
def convert_binary(node: Node):
    a, b = node.input(0), node.input(1)
    if node.opset < 7 and node.attr_int("broadcast", 0):
        b = _legacy_broadcast(node, a, b)
    return node.make(ew.OPS[_BINARY[node.op_type]], a, b)


def _legacy_broadcast(node: Node, a, b):
    """Opset < 7 `broadcast=1`: b's shape matches a's from `axis` on (default: a's trailing dims); reshape b
    with trailing 1s so that NumPy broadcasting lines it up the same way."""
    if not (a.ttype.is_static and b.ttype.is_static):
        raise node.unsupported(f"legacy broadcast of {a.ttype} and {b.ttype} with symbolic dims")
    sa, sb = tuple(a.ttype.shape), tuple(b.ttype.shape)
    if len(sb) == 1 and sb[0] == 1 or not sb:
        return b  # a scalar broadcasts anywhere
    axis = node.attr_int("axis", len(sa) - len(sb))
    if axis < 0:
        axis += len(sa)
    if not 0 <= axis <= len(sa) - len(sb):
        raise node.invalid(f"broadcast axis {axis} does not fit {b.ttype} into {a.ttype}")
    for i, d in enumerate(sb):
        if d not in (1, sa[axis + i]):
            raise node.invalid(f"legacy broadcast: {b.ttype} does not match {a.ttype} from axis {axis}")
    shape = sb + (1,) * (len(sa) - axis - len(sb))
    return b if shape == sb else node.make(tf.RESHAPE, b, newshape=shape)


@converter("Pow")
def convert_pow(node: Node):
    x, y = node.input(0), node.input(1)
    if y.ttype.dtype != x.ttype.dtype:  # ONNX lets the exponent's type differ; the result has the base's
        y = node.make(ew.CAST, y, dtype=x.ttype.dtype)
    return node.make(ew.POWER, x, y)


@converter("Mod")
def convert_mod(node: Node):
    fmod = node.attr_int("fmod", 0)
    x, y = node.input(0), node.input(1)
    return node.make(ew.OPS["trunc_mod" if fmod else "floor_mod"], x, y)


@converter("BitShift")
def convert_bitshift(node: Node):
    direction = node.attr_string("direction")
    if direction not in ("LEFT", "RIGHT"):
        raise node.invalid(f"direction must be LEFT or RIGHT, got {direction!r}")
    return node.make(ew.OPS["left_shift" if direction == "LEFT" else "right_shift"], node.input(0), node.input(1))


@converter("PRelu")
def convert_prelu(node: Node):
    x, slope = node.input(0), node.input(1)
    if node.opset < 7 and slope.ttype.ndim == 1 and x.ttype.ndim > 2 and slope.ttype.shape[0] != 1:
        # PRelu-6 and older: a 1-D slope is per channel (axis 1), not NumPy-aligned with the last axis
        slope = node.make(tf.RESHAPE, slope, newshape=(slope.ttype.shape[0],) + (1,) * (x.ttype.ndim - 2))
    return node.make(ew.PRELU, x, slope)


@converter("Sum", "Mean", "Max", "Min")
def convert_variadic(node: Node):
    op = {"Sum": ew.ADD, "Mean": ew.ADD, "Max": ew.MAXIMUM, "Min": ew.MINIMUM}[node.op_type]
    args = [x for x in node.inputs if x is not None]
    if not args:
        raise node.invalid("needs at least one input")
    out = args[0]
    for x in args[1:]:
        out = node.make(op, out, x)
    if node.op_type == "Mean":
        out = node.make(ew.DIVIDE, out, Constant(np.array(len(args), dtype=out.ttype.dtype)))
    return out


@converter("Clip")
def convert_clip(node: Node):
    x = node.input(0)
    if node.opset < 11:
        lo, hi = node.attr_float("min", None), node.attr_float("max", None)
    else:
        lo_v, hi_v = node.constant(1, "min", required=False), node.constant(2, "max", required=False)
        lo = None if lo_v is None else lo_v.item()
        hi = None if hi_v is None else hi_v.item()
    return node.make(ew.CLIP, x, min=lo, max=hi)


_SELU_ALPHA, _SELU_GAMMA = 1.67326319217681884765625, 1.05070102214813232421875


@converter("LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid", "ThresholdedRelu", "Shrink")
def convert_activation(node: Node):
    t, x = node.op_type, node.input(0)
    if t == "LeakyRelu":
        return node.make(ew.LEAKY_RELU, x, alpha=node.attr_float("alpha", 0.01))
    if t == "Elu":
        return node.make(ew.ELU, x, alpha=node.attr_float("alpha", 1.0))
    if t == "Selu":
        return node.make(ew.SELU, x, alpha=node.attr_float("alpha", _SELU_ALPHA),
                         gamma=node.attr_float("gamma", _SELU_GAMMA))
    if t == "Celu":
        return node.make(ew.CELU, x, alpha=node.attr_float("alpha", 1.0))
    if t == "HardSigmoid":
        return node.make(ew.HARD_SIGMOID, x, alpha=node.attr_float("alpha", 0.2), beta=node.attr_float("beta", 0.5))
    if t == "ThresholdedRelu":
        return node.make(ew.THRESHOLDED_RELU, x, alpha=node.attr_float("alpha", 1.0))
    return node.make(ew.SHRINK, x, alpha=node.attr_float("lambd", 0.5), beta=node.attr_float("bias", 0.0))


@converter("Gelu")
def convert_gelu(node: Node):
    approx = node.attr_string("approximate", "none")
    if approx not in ("none", "tanh"):
        raise node.invalid(f"approximate must be 'none' or 'tanh', got {approx!r}")
    return node.make(ew.GELU if approx == "none" else ew.GELU_TANH, node.input(0))


@converter("Where")
def convert_where(node: Node):
    return node.make(ew.WHERE, node.input(0), node.input(1), node.input(2))


@converter("IsNaN")
def convert_isnan(node: Node):
    return node.make(ew.ISNAN, node.input(0))


@converter("IsInf")
def convert_isinf(node: Node):
    return node.make(ew.ISINF, node.input(0), detect_positive=bool(node.attr_int("detect_positive", 1)),
                     detect_negative=bool(node.attr_int("detect_negative", 1)))


def onnx_dtype(node: Node, code: int) -> str:
    """An ONNX TensorProto dtype code as a Kiln dtype name, or an UnsupportedError naming the node."""
    from kiln.errors import KilnError
    from kiln.ir.types import normalize_dtype

    try:
        return normalize_dtype(onnx.helper.tensor_dtype_to_np_dtype(code))
    except (KeyError, TypeError, ValueError, KilnError):
        name = onnx.TensorProto.DataType.Name(code) if code in onnx.TensorProto.DataType.values() else code
        raise node.unsupported(f"dtype {name}") from None


@converter("Cast")
def convert_cast(node: Node):
    to = onnx_dtype(node, node.attr_int("to"))
    if to == "string" or node.input(0).ttype.dtype == "string":
        raise node.unsupported("casts to or from strings")
    if node.input(0).ttype.dtype == to:
        return node.input(0)
    return node.make(ew.CAST, node.input(0), dtype=to)


@converter("BitCast")
def convert_bitcast(node: Node):
    to = onnx_dtype(node, node.attr_int("to"))
    x = node.input(0)
    if "string" in (to, x.ttype.dtype):
        raise node.unsupported("bit casts to or from strings")
    return x if x.ttype.dtype == to else node.make(ew.BITCAST, x, dtype=to)


@converter("CastLike")
def convert_castlike(node: Node):
    to = node.input(1).ttype.dtype
    if to == "string" or node.input(0).ttype.dtype == "string":
        raise node.unsupported("casts to or from strings")
    return node.input(0) if node.input(0).ttype.dtype == to else node.make(ew.CAST, node.input(0), dtype=to)


@converter("Identity")
def convert_identity(node: Node):
    return node.input(0)


@converter("Swish")
def convert_swish(node: Node):
    return node.make(ew.SWISH, node.input(0), alpha=node.attr_float("alpha", 1.0))


def _quant_axis(node: Node, x, scale) -> int:
    axis = node.attr_int("axis", 1)
    if node.attr_int("block_size", 0):
        raise node.unsupported("blocked quantization (block_size)")
    return axis % x.ttype.ndim if x.ttype.ndim else 0


@converter("QuantizeLinear")
def convert_quantize(node: Node):
    x, scale = node.input(0), node.input(1)
    zero = node.input(2, required=False)
    if zero is not None:
        out = zero.ttype.dtype
    else:
        code = node.attr_int("output_dtype", 0)
        out = onnx_dtype(node, code) if code else "uint8"
        zero = Constant(np.zeros((), out))
    if out not in ("int8", "uint8", "int16", "uint16", "int32"):
        raise node.unsupported(f"quantizing to {out}")
    return node.make(ew.QUANTIZE, x, scale, zero, axis=_quant_axis(node, x, scale), out_dtype=out)


@converter("DequantizeLinear")
def convert_dequantize(node: Node):
    x, scale = node.input(0), node.input(1)
    if x.ttype.dtype not in ("int8", "uint8", "int16", "uint16", "int32"):
        raise node.unsupported(f"dequantizing {x.ttype.dtype}")
    zero = node.input(2, required=False)
    if zero is None:
        zero = Constant(np.zeros((), x.ttype.dtype))
    return node.make(ew.DEQUANTIZE, x, scale, zero, axis=_quant_axis(node, x, scale))
