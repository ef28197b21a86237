"""Elementwise and broadcasting ops, one table row each: unary math, binary arithmetic, comparisons, logic.

A row gives the op name, its NumPy reference and which dtypes it accepts; the type rules are shared.
After import every row is a registered op reachable as a module attribute (`elementwise.RELU`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kiln.errors import TypeCheckError

from ..op import OpDef, OpPattern, define_compute, register_op
from ..types import TensorType, broadcast_shapes, is_float, is_int
from . import float_math

Accepts = str  # "float", "number" (float or int), "int", "bool", "any"


def _check_dtype(op: str, t: TensorType, accepts: Accepts) -> None:
    ok = {
        "float": is_float(t.dtype),
        "number": is_float(t.dtype) or is_int(t.dtype),
        "int": is_int(t.dtype),
        "bool": t.dtype == "bool",
        "any": True,
    }[accepts]
    if not ok:
        raise TypeCheckError(f"{op} takes {accepts} tensors, got {t}")


def _size(t: TensorType) -> int:
    return t.size if t.is_static else 0


@dataclass(frozen=True)
class Unary:
    name: str
    reference: Callable[[np.ndarray], np.ndarray]
    accepts: Accepts = "float"
    flops_per_element: int = 1


@dataclass(frozen=True)
class Binary:
    name: str
    reference: Callable[[np.ndarray, np.ndarray], np.ndarray]
    accepts: Accepts = "number"
    returns_bool: bool = False


def _register_unary(row: Unary) -> OpDef:
    def type_rule(x: TensorType, attrs) -> TensorType:
        _check_dtype(row.name, x, row.accepts)
        return x

    def reference(x: np.ndarray, attrs) -> np.ndarray:
        return np.asarray(row.reference(x)).astype(x.dtype, copy=False)

    return register_op(OpDef(row.name, type_rule=type_rule, reference=reference, pattern=OpPattern.ELEMWISE,
                             flops=lambda x, a: _size(x) * row.flops_per_element))


def _register_binary(row: Binary) -> OpDef:
    def type_rule(a: TensorType, b: TensorType, attrs) -> TensorType:
        _check_dtype(row.name, a, row.accepts)
        if a.dtype != b.dtype:
            raise TypeCheckError(f"{row.name}: operand dtypes differ ({a} vs {b}); insert a cast")
        shape = broadcast_shapes(a.shape, b.shape, what=row.name)
        return TensorType(shape, "bool" if row.returns_bool else a.dtype)

    def reference(a: np.ndarray, b: np.ndarray, attrs) -> np.ndarray:
        out = np.asarray(row.reference(a, b))
        return out.astype(bool if row.returns_bool else a.dtype, copy=False)

    return register_op(OpDef(row.name, type_rule=type_rule, reference=reference, pattern=OpPattern.BROADCAST,
                             flops=lambda a, b, at: _size(type_rule(a, b, at))))


UNARY = [
    Unary("nn.relu", lambda x: np.maximum(x, 0), "number"),
    Unary("negative", np.negative, "number"),
    Unary("abs", np.abs, "number"),
    Unary("exp", np.exp),
    Unary("log", np.log),
    Unary("sqrt", np.sqrt),
    Unary("sigmoid", lambda x: 1 / (1 + np.exp(-x)), flops_per_element=4),
    Unary("tanh", np.tanh, flops_per_element=4),
    Unary("erf", lambda x: _erf(x), flops_per_element=8),
    Unary("sin", np.sin), Unary("cos", np.cos), Unary("tan", np.tan),
    Unary("asin", np.arcsin), Unary("acos", np.arccos), Unary("atan", np.arctan),
    Unary("sinh", np.sinh), Unary("cosh", np.cosh),
    Unary("asinh", np.arcsinh), Unary("acosh", np.arccosh), Unary("atanh", np.arctanh),
    Unary("floor", np.floor), Unary("ceil", np.ceil),
    Unary("round", np.round),  # half to even, as ONNX asks
    Unary("sign", np.sign, "number"),
    Unary("reciprocal", np.reciprocal),
    Unary("softplus", lambda x: np.logaddexp(0, x), flops_per_element=4),
    Unary("softsign", lambda x: x / (1 + np.abs(x)), flops_per_element=3),
    Unary("nn.mish", lambda x: x * np.tanh(np.logaddexp(0, x)), flops_per_element=8),
    Unary("nn.hard_swish", lambda x: x * np.clip(x / 6 + 0.5, 0, 1), flops_per_element=4),
    Unary("copy", np.copy, "any", flops_per_element=0),  # a model output that no kernel computes gets one
    Unary("logical_not", np.logical_not, "bool"),
    Unary("bitwise_not", np.invert, "int"),
]

BINARY = [
    Binary("add", np.add),
    Binary("subtract", np.subtract),
    Binary("multiply", np.multiply),
    Binary("divide", lambda a, b: np.divide(a, b) if is_float(a.dtype.name) else _int_div(a, b)),
    Binary("maximum", np.maximum),
    Binary("minimum", np.minimum),
    Binary("power", np.power),
    Binary("equal", np.equal, "any", returns_bool=True),
    Binary("less", np.less, returns_bool=True),
    Binary("greater", np.greater, returns_bool=True),
    Binary("less_equal", np.less_equal, returns_bool=True),
    Binary("greater_equal", np.greater_equal, returns_bool=True),
    Binary("logical_and", np.logical_and, "bool"),
    Binary("logical_or", np.logical_or, "bool"),
    Binary("logical_xor", np.logical_xor, "bool"),
    Binary("bitwise_and", np.bitwise_and, "int"),
    Binary("bitwise_or", np.bitwise_or, "int"),
    Binary("bitwise_xor", np.bitwise_xor, "int"),
    Binary("left_shift", np.left_shift, "int"),
    Binary("right_shift", np.right_shift, "int"),
    Binary("floor_mod", lambda a, b: _checked_mod(a, b, np.mod)),  # sign of the divisor (Python's %)
    Binary("trunc_mod", lambda a, b: _checked_mod(a, b, np.fmod)),  # sign of the dividend (C's fmod)
    Binary("nn.prelu", lambda x, s: np.where(x < 0, x * s, x), "float"),
]


def _erf(x: np.ndarray) -> np.ndarray:
    """Elementwise erf in float64 without SciPy: math.erf is exact to double precision."""
    import math

    return np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64)) if x.size else x.astype(np.float64)


def _checked_mod(a: np.ndarray, b: np.ndarray, fn) -> np.ndarray:
    if a.dtype.kind in "iu" and np.any(b == 0):
        raise ZeroDivisionError("integer modulo by zero")
    with np.errstate(divide="ignore", invalid="ignore"):
        return fn(a, b)


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer division truncating toward zero, as C and ONNX do (NumPy floors)."""
    if np.any(b == 0):
        raise ZeroDivisionError("integer division by zero")
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) ^ (b < 0), -q, q)


OPS: dict[str, OpDef] = {}
for _row in UNARY:
    OPS[_row.name] = _register_unary(_row)
for _row in BINARY:
    OPS[_row.name] = _register_binary(_row)

# Handles for code that refers to these ops.
RELU, NEGATIVE, ABS, EXP, LOG, SQRT = (OPS[n] for n in ("nn.relu", "negative", "abs", "exp", "log", "sqrt"))
SIGMOID, TANH, ERF, HARD_SWISH = (OPS[n] for n in ("sigmoid", "tanh", "erf", "nn.hard_swish"))
ADD, SUBTRACT, MULTIPLY, DIVIDE = (OPS[n] for n in ("add", "subtract", "multiply", "divide"))
MAXIMUM, MINIMUM, POWER, PRELU = (OPS[n] for n in ("maximum", "minimum", "power", "nn.prelu"))
EQUAL, LESS, GREATER = (OPS[n] for n in ("equal", "less", "greater"))


# --- ops with attributes -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClipAttrs:
    min: float | int | None = None
    max: float | int | None = None


def _same_type(name: str, accepts: Accepts):
    def rule(x: TensorType, attrs) -> TensorType:
        _check_dtype(name, x, accepts)
        return x
    return rule


def clip_bounds(a: ClipAttrs, dtype: str) -> tuple[float | int | None, float | int | None]:
    """A missing bound of a float clip is the dtype's finite limit, as ONNX says (ONNX Runtime: inf → 3.4e38)."""
    if not is_float(dtype):
        return a.min, a.max
    if dtype == "bfloat16":  # NumPy's finfo does not know ml_dtypes' bfloat16
        import ml_dtypes

        info = ml_dtypes.finfo(ml_dtypes.bfloat16)
    else:
        info = np.finfo(dtype)
    return (float(info.min) if a.min is None else a.min), (float(info.max) if a.max is None else a.max)


def _clip(x: np.ndarray, a: ClipAttrs) -> np.ndarray:
    lo, hi = clip_bounds(a, x.dtype.name)
    if lo is None and hi is None:
        return x.copy()
    return np.clip(x, lo, hi).astype(x.dtype)


CLIP = register_op(OpDef("clip", ClipAttrs, _same_type("clip", "number"), _clip, OpPattern.ELEMWISE,
                         flops=lambda x, a: _size(x) * 2))


@dataclass(frozen=True)
class AlphaBetaAttrs:
    """Scalar parameters of activation functions; each op documents which it reads."""

    alpha: float = 0.0
    beta: float = 0.0
    gamma: float = 0.0


def _activation(name: str, fn, flops: int = 2) -> OpDef:
    def reference(x: np.ndarray, a: AlphaBetaAttrs) -> np.ndarray:
        return np.asarray(fn(x, a)).astype(x.dtype)
    return register_op(OpDef(name, AlphaBetaAttrs, _same_type(name, "float"), reference, OpPattern.ELEMWISE,
                             flops=lambda x, a: _size(x) * flops))


LEAKY_RELU = _activation("nn.leaky_relu", lambda x, a: np.where(x < 0, a.alpha * x, x))  # alpha
ELU = _activation("nn.elu", lambda x, a: np.where(x < 0, a.alpha * (np.exp(x) - 1), x), 4)  # alpha
SELU = _activation("nn.selu", lambda x, a: a.gamma * np.where(x <= 0, a.alpha * (np.exp(x) - 1), x), 4)
CELU = _activation("nn.celu", lambda x, a: np.maximum(0, x) + np.minimum(0, a.alpha * (np.exp(x / a.alpha) - 1)), 4)
HARD_SIGMOID = _activation("nn.hard_sigmoid", lambda x, a: np.clip(a.alpha * x + a.beta, 0, 1), 3)
THRESHOLDED_RELU = _activation("nn.thresholded_relu", lambda x, a: np.where(x > a.alpha, x, 0))
SHRINK = _activation("nn.shrink", lambda x, a: np.where(x < -a.alpha, x + a.beta,
                                                        np.where(x > a.alpha, x - a.beta, 0)), 3)  # lambd, bias
GELU = _activation("nn.gelu", lambda x, a: 0.5 * x * (1 + _erf(x / np.sqrt(2))), 8)
GELU_TANH = _activation("nn.gelu_tanh", lambda x, a: 0.5 * x * (
    1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))), 10)


@dataclass(frozen=True)
class CastAttrs:
    dtype: str = "float32"


def _cast_type(x: TensorType, a: CastAttrs) -> TensorType:
    return TensorType(x.shape, a.dtype)


def _cast(x: np.ndarray, a: CastAttrs) -> np.ndarray:
    if a.dtype == "bool":
        return x.astype(bool)
    if is_int(a.dtype) and is_float(x.dtype.name):
        with np.errstate(invalid="ignore"):
            return np.trunc(x).astype(a.dtype)
    return x.astype(a.dtype)


CAST = register_op(OpDef("cast", CastAttrs, _cast_type, _cast, OpPattern.ELEMWISE, flops=lambda x, a: 0))


def _np_dtype(dtype: str) -> np.dtype:
    if dtype == "bfloat16":  # NumPy knows it only through ml_dtypes
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _bitcast_type(x: TensorType, a: CastAttrs) -> TensorType:
    if _np_dtype(x.dtype).itemsize != _np_dtype(a.dtype).itemsize:
        raise TypeCheckError(f"bitcast: {x.dtype} and {a.dtype} differ in size (only same-size bitcasts)")
    return TensorType(x.shape, a.dtype)


def _bitcast(x: np.ndarray, a: CastAttrs) -> np.ndarray:
    return np.ascontiguousarray(x).view(_np_dtype(a.dtype)).reshape(x.shape)


# ONNX BitCast (opset 26): the same bits read as another type of the same size. Opaque: a kernel of its own reads
# its input straight from memory, where a fused one could see a half-precision value widened to float32
BITCAST = register_op(OpDef("bitcast", CastAttrs, _bitcast_type, _bitcast, OpPattern.OPAQUE, flops=lambda x, a: 0))


def _where_type(c: TensorType, x: TensorType, y: TensorType, attrs) -> TensorType:
    if c.dtype != "bool":
        raise TypeCheckError(f"where: condition must be bool, got {c}")
    if x.dtype != y.dtype:
        raise TypeCheckError(f"where: branches differ in dtype ({x} vs {y})")
    return TensorType(broadcast_shapes(c.shape, x.shape, y.shape, what="where"), x.dtype)


WHERE = register_op(OpDef("where", type_rule=_where_type, reference=lambda c, x, y, a: np.where(c, x, y),
                          pattern=OpPattern.BROADCAST, flops=lambda c, x, y, a: 0))


def _isinf_type(x: TensorType, a) -> TensorType:
    _check_dtype("isinf", x, "float")
    return TensorType(x.shape, "bool")


@dataclass(frozen=True)
class IsInfAttrs:
    detect_positive: bool = True
    detect_negative: bool = True


ISINF = register_op(OpDef("isinf", IsInfAttrs, _isinf_type, lambda x, a: np.isinf(x) & (
    (x > 0) & a.detect_positive | (x < 0) & a.detect_negative), OpPattern.ELEMWISE))
ISNAN = register_op(OpDef("isnan", type_rule=_isinf_type, reference=lambda x, a: np.isnan(x),
                          pattern=OpPattern.ELEMWISE))


SWISH = _activation("nn.swish", lambda x, a: x / (1 + np.exp(-a.alpha * x)), 5)  # alpha


@dataclass(frozen=True)
class QuantAttrs:
    """Per-tensor or per-axis affine quantization: q = saturate(round(x / scale) + zero_point)."""

    axis: int = 1
    out_dtype: str = "uint8"
    # multiply by 1/scale instead of dividing (a division costs about ten multiplies in a vector): not the
    # spec's rounding where x / scale lands within an ulp of a .5. passes/realize_qdq.py sets it on the
    # requantization of a conv's output in a quantized model, where no such tie is the spec's to decide: the
    # int8 conv's sum is exact, not the float sum ONNX's reference rounds
    reciprocal: bool = False


def _q_param(p: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    if p.ndim == 0 or p.size == 1:
        return p.reshape(())
    shape = [1] * x.ndim
    shape[axis] = -1
    return p.reshape(shape)


def _quantize_type(x: TensorType, scale: TensorType, zero: TensorType, a: QuantAttrs) -> TensorType:
    if a.out_dtype not in ("int8", "uint8", "int16", "uint16", "int32"):
        raise TypeCheckError(f"quantize: output dtype {a.out_dtype} not supported")
    return TensorType(x.shape, a.out_dtype)


def _quantize(x, scale, zero, a: QuantAttrs) -> np.ndarray:
    """x / scale in x's dtype, as ONNX's reference and ONNX Runtime divide: in float64 0.5 / (5 / 255) is
    25.4999991, not the 25.5 that rounds (half to even) to 26 (DynamicQuantizeLinear's expanded test)."""
    info = np.iinfo(a.out_dtype)
    work = x.dtype if x.dtype.kind == "f" else np.float64  # an int32 x divides in float64, as NumPy promotes
    s = _q_param(scale, x, a.axis).astype(work)
    q = np.rint(x.astype(work) * (np.asarray(1, work) / s) if a.reciprocal else x.astype(work) / s).astype(np.float64)
    q = q + _q_param(zero, x, a.axis)
    return np.clip(q, info.min, info.max).astype(a.out_dtype)


def _dequantize_type(x: TensorType, scale: TensorType, zero: TensorType, a: QuantAttrs) -> TensorType:
    return TensorType(x.shape, scale.dtype)


def _dequantize(x, scale, zero, a: QuantAttrs) -> np.ndarray:
    d = (x.astype(np.float64) - _q_param(zero, x, a.axis)) * _q_param(scale, x, a.axis)
    return d.astype(scale.dtype)


QUANTIZE = register_op(OpDef("qnn.quantize", QuantAttrs, _quantize_type, _quantize, OpPattern.ELEMWISE,
                             flops=lambda x, s, z, a: 3 * _size(x)))
DEQUANTIZE = register_op(OpDef("qnn.dequantize", QuantAttrs, _dequantize_type, _dequantize, OpPattern.ELEMWISE,
                               flops=lambda x, s, z, a: 2 * _size(x)))


# --- TE computes (codegen) -------------------------------------------------------------------------------------

def _te_unary() -> dict[str, object]:
    from tvm import te, tirx as tir

    def sigmoid(x):
        # float32 through float_math.exp, which vectorizes: te.exp is a scalar expf call per element, and a
        # sigmoid is often a conv's epilogue (SiLU, squeeze-excite gates). Its flush of e^x below 1e-38 to 0
        # only meets 1 + e^-x, where it vanishes anyway
        return 1 / (1 + float_math.exp(-x))

    # LLVM has no sinh/cosh intrinsic on x86. exp(|x| - ln 2) is e^|x| / 2 without overflowing before the result
    # does (cosh(89) = 2.2e38 is a float32); sinh near 0 takes its series, where the exp difference cancels.
    def half_exp(a, dtype):
        return te.exp(a - tir.const(0.6931471805599453, dtype))

    def sinh(x):
        def body(v):
            a, c = te.abs(v), lambda f: tir.const(f, v.dtype)
            big = half_exp(a, v.dtype) - c(0.5) * te.exp(-a)
            v2 = v * v
            small = v * (c(1) + v2 * (c(1 / 6) + v2 * (c(1 / 120) + v2 * c(1 / 5040))))
            return tir.Select(a < c(0.5), small, tir.Select(v < c(0), -big, big))
        return float_math.bind(x, body)

    def cosh(x):
        return float_math.bind(x, lambda v: half_exp(te.abs(v), v.dtype) + tir.const(0.5, v.dtype) * te.exp(-te.abs(v)))

    def log1p(u):  # log(1 + u) to a few ulp for small u: log(1 + u) itself keeps only u's bits above 1's ulp
        one = tir.const(1, float_math._dtype(u))
        return float_math.bind(u, lambda u: float_math.bind(u + one, lambda w: tir.Select(
            w == one, u, te.log(w) * (u / (w - one)))))

    def softplus(x):  # max(x, 0) + log1p(e^-|x|): e^x never overflows (softplus(1e38) is 1e38, as in ONNX Runtime)
        return float_math.bind(x, lambda v: float_math.relu(v) + log1p(float_math.exp(-te.abs(v))))

    def tanh(x):  # TVM's (1 - e^-2x) / (1 + e^-2x) cancels near 0: tanh(1e-3) was off in its third digit
        return _tanh_float32(x) if float_math._dtype(x) == "float32" else te.tanh(x)

    def mish(x):
        """x tanh(softplus(x)) = x n / (n + 2), n = e^x (e^x + 2): one exp and no cancellation; 1 once that
        ratio rounds to 1 (x > 20 here, where n would overflow). Other dtypes: the composition."""
        if float_math._dtype(x) != "float32":
            return x * te.tanh(softplus(x))

        c = lambda f: tir.const(f, "float32")
        ratio = lambda n: n / (n + c(2))
        return float_math.bind(x, lambda v: float_math.bind(float_math.exp(v), lambda e: tir.Select(
            c(20) < v, v, v * float_math.bind(e * (e + c(2)), ratio))))

    return {
        "nn.relu": float_math.relu,  # NaN stays NaN, in the one maxps that te.max(x, 0) took
        "negative": lambda x: -x,
        "abs": te.abs, "exp": lambda x: float_math.exp(x, subnormal=True), "log": te.log, "sqrt": te.sqrt,
        "sigmoid": sigmoid, "tanh": tanh,
        "erf": float_math.erf, "sin": te.sin, "cos": te.cos, "tan": te.tan, "asin": te.asin, "acos": te.acos,
        "atan": te.atan, "sinh": sinh, "cosh": cosh, "asinh": te.asinh, "acosh": te.acosh,
        "atanh": te.atanh, "floor": te.floor, "ceil": te.ceil, "round": float_math.round_half_even,
        "sign": lambda x: tir.Select(x > 0, tir.const(1, x.dtype), tir.Select(x < 0, tir.const(-1, x.dtype),
                                                                                x)),  # ±0 or NaN: itself
        "reciprocal": lambda x: tir.const(1, x.dtype) / x,
        "softplus": softplus,
        "softsign": lambda x: x / (1 + te.abs(x)),
        "nn.mish": mish,
        # typed constants: a Python float (0.5) would make a float16 or bfloat16 expression float32 in TVM 0.27
        "nn.hard_swish": lambda x: x * float_math.clamp(x / 6 + tir.const(0.5, float_math._dtype(x)), 0, 1),
        "copy": lambda x: x,
        "logical_not": lambda x: tir.Not(x),
        "bitwise_not": lambda x: ~x,
    }


# tanh(x) = x P(x²) / Q(x²) for |x| < 0.55 (x itself below 4e-4): Eigen's float tanh, 2 ulp there
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)
_TANH_SMALL, _TANH_TINY = 0.55, 0.0004


def _tanh_float32(x):
    """tanh of a float32 TE expression in adds, multiplies, divides and float_math.exp, which vectorize (TVM's
    own is two scalar expf calls a lane). Above 0.55, 1 - 2 / (e^2|x| + 1) subtracts at most a half (musl's
    tanhf does the same): 1 exactly from 9.01, ±1 for ±inf; NaN stays NaN through the exp."""
    from tvm import te, tirx as tir

    c = lambda f: tir.const(f, "float32")

    def body(v):
        a = te.abs(v)
        small = float_math.bind(v * v, lambda v2: v * float_math._horner(_TANH_P, v2, c)
                                / float_math._horner(_TANH_Q, v2, c))
        large = tir.copysign(c(1) - c(2) / (float_math.exp(a + a) + c(1)), v)
        return tir.Select(a < c(_TANH_TINY), v, tir.Select(a < c(_TANH_SMALL), small, large))
    return float_math.bind(x, body)


def _te_binary() -> dict[str, object]:
    from tvm import te, tirx as tir, topi

    def divide(a, b):
        if str(a.dtype).startswith(("float", "bfloat")):  # bfloat16 too: truncdiv takes integers only
            return topi.divide(a, b)
        return _broadcast(a, b, tir.truncdiv, "divide")  # truncates toward zero, as C and ONNX (every int width)

    def power(a, b):
        n = _small_integer_exponent(a, b)
        if n is not None:  # x*x, x*x*x: powf is a scalar libm call per element that does not vectorize
            return te.compute(a.shape, lambda *i: a(*i) * a(*i) if n == 2 else a(*i) * a(*i) * a(*i),
                              name="power")
        if str(a.dtype).startswith("float"):
            return topi.power(a, b)
        # integer powers through float64, as np.power's result for the ONNX reference's operand mixes; exact
        # below 2**53
        return _broadcast(a, b, lambda x, y: tir.Cast(str(a.dtype), te.power(tir.Cast("float64", x),
                                                                               tir.Cast("float64", y))), "power")

    return {
        "add": topi.add, "subtract": topi.subtract, "multiply": topi.multiply, "divide": divide,
        "maximum": lambda a, b: _broadcast(a, b, float_math.maximum, "maximum"),  # NaN from either side
        "minimum": lambda a, b: _broadcast(a, b, float_math.minimum, "minimum"),
        "power": power, "equal": topi.equal,
        "less": topi.less, "greater": topi.greater, "less_equal": topi.less_equal,
        "greater_equal": topi.greater_equal, "logical_and": topi.logical_and, "logical_or": topi.logical_or,
        "logical_xor": topi.logical_xor, "bitwise_and": topi.bitwise_and, "bitwise_or": topi.bitwise_or,
        "bitwise_xor": topi.bitwise_xor, "left_shift": topi.left_shift, "right_shift": topi.right_shift,
        "floor_mod": lambda a, b: _mod(a, b, floor=True), "trunc_mod": lambda a, b: _mod(a, b, floor=False),
        "nn.prelu": lambda x, s: topi.where(topi.less(x, tir.const(0, x.dtype)), topi.multiply(x, s), x),
    }


def _small_integer_exponent(a, b) -> int | None:
    """2 or 3 when `b` is that scalar constant (codegen makes a 0-d constant a compute of one literal) and `a`
    is float32 or float64: GPT-2's tanh-GELU cubes, layer norms written out square. x*x*x rounds twice where
    powf rounds once (within 2 ulp); signs, zeros, infinities and NaN come out as powf's. The 1.6 MB cube of
    GPT-2's 768→3072 dense took 0.63 ms of its 0.83 through powf."""
    from tvm import te, tirx as tir

    if str(a.dtype) not in ("float32", "float64") or len(b.shape) != 0 or not isinstance(b.op, te.ComputeOp):
        return None
    body = b.op.body[0]
    if isinstance(body, tir.FloatImm) and body.value in (2.0, 3.0):
        return int(body.value)
    return None


def _mod(a, b, floor: bool):
    """ONNX Mod. Integers: topi's floor_mod / mod (truncating). Floats: C's fmod (exact; libm's), and for
    fmod=0 NumPy's np.mod built on it: the remainder moves to the divisor's side, a zero remainder takes the
    divisor's sign. So -3 mod inf is inf, 3 mod inf is 3, x mod 0 and inf mod y are NaN, 0 mod -2 is -0 (the
    `a - floor(a / b) * b` of topi gave NaN for an infinite divisor). float16 and bfloat16 work in float32, as
    NumPy's half-precision mod does; the remainder is exact there and rounds once."""
    from tvm import tirx as tir, topi

    dtype = str(a.dtype)
    if not dtype.startswith(("float", "bfloat")):
        return topi.floor_mod(a, b) if floor else topi.mod(a, b)
    work = dtype if dtype == "float64" else "float32"

    def fn(x, y):
        if dtype != work:
            x, y = x.astype(work), y.astype(work)
        m = tir.call_pure_extern(work, "fmod" if work == "float64" else "fmodf", x, y)  # 0.27 lowers no tirx.fmod
        if floor:
            z = tir.const(0.0, work)
            # signs differ: Or/And of compares (`!=` of two compares is an fcmp of i1s in 0.27's LLVM)
            m = float_math.bind(m, lambda r: float_math.bind(y, lambda d: tir.Select(
                r == z, tir.copysign(r, d),
                tir.Select(tir.Or(tir.And(d < z, z < r), tir.And(z < d, r < z)), r + d, r))))
        return m.astype(dtype) if dtype != work else m

    return _broadcast(a, b, fn, "floor_mod" if floor else "trunc_mod")


def _broadcast(a, b, fn, name: str):
    """fn(a[i], b[j]) over the broadcast shape of two TE tensors (numpy rules, as topi's broadcast ops)."""
    from tvm import te

    rank = max(len(a.shape), len(b.shape))
    shape_a = [1] * (rank - len(a.shape)) + [int(d) for d in a.shape]
    shape_b = [1] * (rank - len(b.shape)) + [int(d) for d in b.shape]
    shape = [max(p, q) for p, q in zip(shape_a, shape_b)]

    def index(t, dims, i):
        skip = rank - len(t.shape)
        return tuple(0 if d == 1 and n != 1 else i[k] for k, (d, n) in enumerate(zip(dims, shape)) if k >= skip)

    return te.compute(shape, lambda *i: fn(a[index(a, shape_a, i)], b[index(b, shape_b, i)]), name=name)


def _unary_compute(name: str):
    def compute(x, attrs):
        from tvm import te

        fn = _te_unary()[name]
        return te.compute(x.shape, lambda *i: fn(x[i]), name=name.replace(".", "_"))
    return compute


def _binary_compute(name: str):
    def compute(a, b, attrs):
        return _te_binary()[name](a, b)
    return compute


for _row in UNARY:
    define_compute(OPS[_row.name])(_unary_compute(_row.name))
for _row in BINARY:
    define_compute(OPS[_row.name])(_binary_compute(_row.name))


@define_compute(CLIP)
def clip_compute(x, a: ClipAttrs):
    from tvm import te

    lo, hi = clip_bounds(a, str(x.dtype))
    return te.compute(x.shape, lambda *i: float_math.clamp(x[i], lo, hi), name="clip")  # NaN stays NaN


def _activation_compute(op: OpDef, fn):
    def compute(x, a: AlphaBetaAttrs):
        from tvm import te, tirx as tir

        c = lambda v: tir.const(v, x.dtype)
        return te.compute(x.shape, lambda *i: fn(x[i], a, c, te, tir), name=op.name.replace(".", "_"))
    define_compute(op)(compute)


_activation_compute(LEAKY_RELU, lambda v, a, c, te, tir: tir.Select(v < c(0), v * c(a.alpha), v))
_activation_compute(ELU, lambda v, a, c, te, tir: tir.Select(v < c(0), c(a.alpha) * (te.exp(v) - c(1)), v))
_activation_compute(HARD_SIGMOID, lambda v, a, c, te, tir: float_math.clamp(c(a.alpha) * v + c(a.beta), 0, 1))
_activation_compute(GELU, lambda v, a, c, te, tir: c(0.5) * v * (c(1) + float_math.erf(v * c(0.7071067811865476))))
_activation_compute(GELU_TANH, lambda v, a, c, te, tir: c(0.5) * v * (c(1) + te.tanh(
    c(0.7978845608028654) * (v + c(0.044715) * v * v * v))))
_activation_compute(SWISH, lambda v, a, c, te, tir: v / (c(1) + te.exp(-c(a.alpha) * v)))


@define_compute(CAST)
def cast_compute(x, a: CastAttrs):
    from tvm import te

    return te.compute(x.shape, lambda *i: x[i].astype(a.dtype), name="cast")


@define_compute(BITCAST)
def bitcast_compute(x, a: CastAttrs):
    """tir.reinterpret; a bool is one byte holding 0 or 1, so to and from it the bits are those of a cast."""
    from tvm import te
    from tvm import tirx as tir

    if "bool" in (str(x.dtype), a.dtype):
        return te.compute(x.shape, lambda *i: x[i].astype(a.dtype), name="bitcast")
    return te.compute(x.shape, lambda *i: tir.reinterpret(a.dtype, x[i]), name="bitcast")


@define_compute(WHERE)
def where_compute(c, x, y, attrs):
    from tvm import topi

    return topi.where(c, x, y)


# NaN as in the references: SELU and CELU keep it (every path is arithmetic on x), THRESHOLDED_RELU and SHRINK
# send it to 0 (their comparisons are false for NaN, as np.where's are)
_activation_compute(SELU, lambda v, a, c, te, tir: c(a.gamma) * tir.Select(
    v <= c(0), c(a.alpha) * (float_math.exp(v) - c(1)), v))


def _celu(v, a, c, te, tir):
    if float_math._dtype(v) == "bfloat16":  # TVM's bfloat16 legalization rejects Lets: float32, written out
        u, f = v.astype("float32"), (lambda x: tir.const(x, "float32"))
        w = f(a.alpha) * (te.exp(u / f(a.alpha)) - f(1))
        return (tir.Select(u < f(0), f(0), u) + tir.Select(f(0) < w, f(0), w)).astype("bfloat16")
    return float_math.bind(v, lambda u: float_math.at_least(u, 0) + float_math.at_most(
        c(a.alpha) * (float_math.exp(u / c(a.alpha)) - c(1)), 0))


_activation_compute(CELU, _celu)
_activation_compute(THRESHOLDED_RELU, lambda v, a, c, te, tir: tir.Select(c(a.alpha) < v, v, c(0)))
_activation_compute(SHRINK, lambda v, a, c, te, tir: tir.Select(
    v < c(-a.alpha), v + c(a.beta), tir.Select(c(a.alpha) < v, v - c(a.beta), c(0))))


@define_compute(ISINF)
def isinf_compute(x, a: IsInfAttrs):
    from tvm import te, tirx as tir

    inf = tir.const(float("inf"), x.dtype)

    def f(v):
        if a.detect_positive and a.detect_negative:
            return tir.Or(v == inf, v == -inf)
        if a.detect_positive:
            return v == inf
        return v == -inf if a.detect_negative else tir.const(False, "bool")

    return te.compute(x.shape, lambda *i: f(x[i]), name="isinf")


@define_compute(ISNAN)
def isnan_compute(x, attrs):
    from tvm import te

    return te.compute(x.shape, lambda *i: float_math.is_nan(x[i]), name="isnan")


_NARROW_INTS = ("int8", "uint8", "int16", "uint16")


def _q_index(p, x, axis: int, i):
    """The element of a per-tensor (scalar or 1-element) or per-axis (1-D) quantization parameter at x[i]."""
    if len(p.shape) == 0:
        return p[()]
    if int(np.prod([int(d) for d in p.shape])) == 1:
        return p[(0,) * len(p.shape)]
    return p[i[axis]]


@define_compute(QUANTIZE)
def quantize_compute(x, scale, zero, a: QuantAttrs):
    """As the reference: x / scale in x's dtype rounded half to even; then plus the zero point, saturated (in
    float64 as the reference does, or in float32 where that gives the same result). The saturation is min/max, not float_math.clamp: clamp's Let, once a second quantize of the same
    fused group has the first inlined in its value, made tvm.compile fail ("Let cannot bind the same var to two
    different values") on every Q→DQ→Q→DQ chain, i.e. on QDQ models from ONNX Runtime's quantizer. A NaN, which
    ONNX leaves undefined here, saturates to the high bound (255 for uint8) instead of casting a NaN to an integer."""
    from tvm import te, tirx as tir

    info = np.iinfo(a.out_dtype)
    work = str(x.dtype) if str(x.dtype).startswith(("float", "bfloat")) else "float64"
    # the rounded quotient plus an 8- or 16-bit zero point is exact in float32 below 2^24, and beyond that it
    # saturates either way: float64 (half the lanes) only for wider outputs or narrower inputs
    acc = "float32" if work == "float32" and a.out_dtype in _NARROW_INTS else "float64"

    def f(*i):
        s = _q_index(scale, x, a.axis, i).astype(work)
        if a.reciprocal:  # 1/s is loop-invariant for a per-tensor scale: LLVM computes it once
            q = float_math.round_half_even(x[i].astype(work) * (tir.const(1.0, work) / s)).astype(acc)
        else:
            q = float_math.round_half_even(x[i].astype(work) / s).astype(acc)
        q = q + _q_index(zero, x, a.axis, i).astype(acc)
        lo, hi = tir.const(float(info.min), acc), tir.const(float(info.max), acc)
        return tir.max(tir.min(q, hi), lo).astype(a.out_dtype)

    return te.compute(x.shape, f, name="quantize")


@define_compute(DEQUANTIZE)
def dequantize_compute(x, scale, zero, a: QuantAttrs):
    from tvm import te

    # (q - zero) of 8- or 16-bit values is exact in float32, and so one float32 multiply rounds the exact
    # product as the float64 one cast back does: the same bits at twice the lanes
    acc = "float32" if str(scale.dtype) == "float32" and str(x.dtype) in _NARROW_INTS else "float64"

    def f(*i):
        d = x[i].astype(acc) - _q_index(zero, x, a.axis, i).astype(acc)
        return (d * _q_index(scale, x, a.axis, i).astype(acc)).astype(scale.dtype)

    return te.compute(x.shape, f, name="dequantize")
