"""ONNX Runtime's quantized contrib ops (domain com.microsoft), which its QOperator format writes around
QLinearConv and QLinearMatMul: each written here as the function of standard ops it stands for (dequantize, the
float op, quantize), so `functions.expand_functions` inlines it like any ONNX function and the QDQ path runs it.

ONNX Runtime's own kernels compute some of them in fixed point or with the scale ratios folded, so a result may
sit one quantization step from theirs where a value lands next to a .5; the tests allow that step.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import onnx.parser

DOMAIN = "com.microsoft"
_OPSET = 19  # the standard ops' version the bodies are written against


def _parse(text: str) -> onnx.FunctionProto:
    return onnx.parser.parse_function(f'<domain: "{DOMAIN}", opset_import: ["": {_OPSET}]>\n{text}')


def _binary(name: str, op: str) -> onnx.FunctionProto:
    return _parse(f'''
{name} (A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point) => (C) {{
    a = DequantizeLinear(A, A_scale, A_zero_point)
    b = DequantizeLinear(B, B_scale, B_zero_point)
    c = {op}(a, b)
    C = QuantizeLinear(c, C_scale, C_zero_point)
}}''')


def _unary(name: str, op: str) -> onnx.FunctionProto:
    return _parse(f'''
{name} (X, X_scale, X_zero_point, Y_scale, Y_zero_point) => (Y) {{
    x = DequantizeLinear(X, X_scale, X_zero_point)
    y = {op}
    Y = QuantizeLinear(y, Y_scale, Y_zero_point)
}}''')


def _channels_first(node: onnx.NodeProto) -> bool:
    return not any(a.name == "channels_last" and a.i for a in node.attribute)


def _qgemm(node: onnx.NodeProto) -> onnx.FunctionProto:
    """Y = alpha · (A'B' + C), C an int32 bias at scale a_scale · b_scale (the bias is in the accumulator, so
    alpha scales it too: measured against ONNX Runtime's kernel); quantized when y_scale is given."""
    n = list(node.input) + [""] * (9 - len(node.input))
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)  # per-column scales lie along N
    bias = '''
    ab = Mul(a_scale, b_scale)
    c = DequantizeLinear(C, ab)
    y = Gemm <alpha: float = @alpha, beta: float = @alpha, transA: int = @transA, transB: int = @transB> (a, b, c)''' if n[6] else '''
    y = Gemm <alpha: float = @alpha, transA: int = @transA, transB: int = @transB> (a, b)'''
    out = "Y = QuantizeLinear(y, y_scale, y_zero_point)" if n[7] else "Y = Identity(y)"
    return _parse(f'''
QGemm <alpha, transA, transB> (A, a_scale, a_zero_point, B, b_scale, b_zero_point, C, y_scale, y_zero_point) => (Y) {{
    a = DequantizeLinear(A, a_scale, a_zero_point)
    b = DequantizeLinear <axis: int = {0 if trans_b else 1}> (B, b_scale, b_zero_point){bias}
    {out}
}}''')


def _qconcat(node: onnx.NodeProto) -> onnx.FunctionProto:
    """Inputs: Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) per tensor."""
    k = (len(node.input) - 2) // 3
    formals = ["Y_scale", "Y_zero_point"] + [f"{p}{i}" for i in range(k) for p in ("X", "S", "Z")]
    deq = "\n".join(f"    x{i} = DequantizeLinear(X{i}, S{i}, Z{i})" for i in range(k))
    xs = ", ".join(f"x{i}" for i in range(k))
    return _parse(f'''
QLinearConcat <axis> ({", ".join(formals)}) => (Y) {{
{deq}
    y = Concat <axis: int = @axis> ({xs})
    Y = QuantizeLinear(y, Y_scale, Y_zero_point)
}}''')


def _qavgpool(node: onnx.NodeProto) -> onnx.FunctionProto | None:
    if not _channels_first(node):
        return None
    attrs = [a.name for a in node.attribute if a.name != "channels_last"]
    kinds = {"kernel_shape": "ints", "strides": "ints", "pads": "ints", "auto_pad": "string",
             "count_include_pad": "int", "ceil_mode": "int", "dilations": "ints"}
    attrs = [a for a in attrs if a in kinds]
    decl = f" <{', '.join(attrs)}>" if attrs else ""
    refs = f" <{', '.join(f'{a}: {kinds[a]} = @{a}' for a in attrs)}>" if attrs else ""
    return _parse(f'''
QLinearAveragePool{decl} (X, x_scale, x_zero_point, y_scale, y_zero_point) => (Y) {{
    x = DequantizeLinear(X, x_scale, x_zero_point)
    y = AveragePool{refs} (x)
    Y = QuantizeLinear(y, y_scale, y_zero_point)
}}''')


def _qglobal_avgpool(node: onnx.NodeProto) -> onnx.FunctionProto | None:
    if not _channels_first(node):
        return None
    return _parse('''
QLinearGlobalAveragePool (X, x_scale, x_zero_point, y_scale, y_zero_point) => (Y) {
    x = DequantizeLinear(X, x_scale, x_zero_point)
    y = GlobalAveragePool(x)
    Y = QuantizeLinear(y, y_scale, y_zero_point)
}''')


def _leaky(node: onnx.NodeProto) -> onnx.FunctionProto:
    return _with_defaults(_parse('''
QLinearLeakyRelu <alpha> (X, X_scale, X_zero_point, Y_scale, Y_zero_point) => (Y) {
    x = DequantizeLinear(X, X_scale, X_zero_point)
    y = LeakyRelu <alpha: float = @alpha> (x)
    Y = QuantizeLinear(y, Y_scale, Y_zero_point)
}'''), alpha=0.01)


def _with_defaults(f: onnx.FunctionProto, **defaults) -> onnx.FunctionProto:
    """The contrib schema's attribute defaults, which the inliner needs spelled out (functions.py fills them in)."""
    f.attribute_proto.extend(onnx.helper.make_attribute(k, v) for k, v in defaults.items())
    return f


def _qdq_alias(op: str) -> Callable[[onnx.NodeProto], onnx.FunctionProto]:
    """com.microsoft's QuantizeLinear / DequantizeLinear (ONNX Runtime's quantizer writes them for 16-bit types
    and for opsets before the standard ops had an axis): the standard op, per axis where the node says so."""
    def build(node: onnx.NodeProto) -> onnx.FunctionProto:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        return _parse(f'''
{op} (x, scale, zero_point) => (y) {{
    y = {op} <axis: int = {axis}> (x, scale, zero_point)
}}''')
    return build


BODIES: dict[str, Callable[[onnx.NodeProto], onnx.FunctionProto | None]] = {
    "QuantizeLinear": _qdq_alias("QuantizeLinear"),
    "DequantizeLinear": _qdq_alias("DequantizeLinear"),
    "QLinearAdd": lambda node: _binary("QLinearAdd", "Add"),
    "QLinearMul": lambda node: _binary("QLinearMul", "Mul"),
    "QLinearSigmoid": lambda node: _unary("QLinearSigmoid", "Sigmoid(x)"),
    "QLinearLeakyRelu": _leaky,
    "QGemm": lambda node: _with_defaults(_qgemm(node), alpha=1.0, transA=0, transB=0),
    "QLinearConcat": _qconcat,
    "QLinearAveragePool": _qavgpool,
    "QLinearGlobalAveragePool": _qglobal_avgpool,
}


def body(node: onnx.NodeProto, opset: int = _OPSET) -> onnx.FunctionProto | None:
    """The function `node` (an ONNX Runtime contrib op) stands for, or None when it is not one written here or
    takes a form these bodies do not cover (channels-last pooling). The body imports the model's standard
    opset (`opset`) from 13 on: the ops it uses mean the same from there, and a body at another version than
    the model's needs a version conversion at inlining."""
    if node.domain != DOMAIN or node.op_type not in BODIES:
        return None
    f = BODIES[node.op_type](node)
    if f is not None and opset >= 13:  # per-axis dequantize (QGemm's per-column b_scale) needs 13
        for o in f.opset_import:
            if o.domain == "":
                o.version = opset
    return f
