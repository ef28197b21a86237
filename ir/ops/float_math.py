"""TE float helpers shared by the op computes: exp and erf of float32, and max, min, clamp and their reductions
with NaN propagating as in ONNX Runtime (every op that clamps or takes a maximum lowers through these).

exp and erf are adds, multiplies and bit operations, which LLVM vectorizes: TVM lowers `te.exp` and `te.erf` on
CPUs to scalar libm calls (`expf`, `erff`), one call per lane. Both stay within a few ulp of the exact value (the
tests measure it); other dtypes keep TVM's own functions.

NaN: TVM lowers `te.max(a, b)` to `a > b ? a : b` (x86 `maxps a, b`), which returns `b` when either is NaN, so
`te.max(x, 0)` turns a NaN into 0. `x < c ? c : x` is the same single `maxps` with the operands the other way
round, and keeps the NaN: the constant-bound forms below cost nothing (docs/architecture.md, "NaN and Inf").
"""

from __future__ import annotations

import contextlib
import contextvars

# Cephes expf: exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in two parts (C1 exact in float32)
_LOG2E = 1.44269504088896341
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
# 2^n stays a normal float32: n in [-126, 127] (n = 127 up to 127.5 ln 2); above ln(FLT_MAX) exp is inf
_EXP_MIN, _EXP_MAX, _EXP_OVERFLOW = -87.33654475, 88.376, 88.72283935546875
_EXP_MIN_SUBNORMAL = -103.97208  # ln(2^-150): below it e^x rounds to 0 even as a denormal

# erf(x) = x P(x²) / Q(x²) on [-4, 4], ±1 outside (to float32 precision): the rational fit Eigen uses
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _dtype(x) -> str:
    return str(x.dtype) if hasattr(x, "dtype") else str(x.ty)  # arithmetic nodes carry only `ty` in TVM 0.27


def _horner(coeffs, x, const):
    acc = const(coeffs[0])
    for c in coeffs[1:]:
        acc = acc * x + const(c)
    return acc


def _is_leaf(v) -> bool:
    import tvm
    from tvm import te
    from tvm import tirx as tir

    # a tensor element (TensorSlice, or the te.tensor_load call it becomes) is a load: LLVM loads it once
    if isinstance(v, tvm.ir.Call):
        return v.op.name == "te.tensor_load"
    return isinstance(v, (te.TensorSlice, tvm.ir.expr.TensorLoad, tir.Var, tir.IntImm, tir.FloatImm))


_OPERANDS = ("a", "b", "value", "condition", "true_value", "false_value", "args", "body")


def _reads_bfloat16(v) -> bool:
    """Whether a bfloat16 value (a load, a cast from one) occurs anywhere in the expression v (0.27's Python
    has no TIR expression visitor; these fields cover arithmetic, casts, selects, calls and Lets)."""
    todo = [v]
    while todo:
        e = todo.pop()
        if (hasattr(e, "dtype") or hasattr(e, "ty")) and _dtype(e) == "bfloat16":
            return True
        for field in _OPERANDS:
            child = getattr(e, field, None)
            if isinstance(child, (list, tuple)) or type(child).__name__ == "Array":
                todo.extend(child)
            elif child is not None and not isinstance(child, (str, int, float)):
                todo.append(child)
    return False


def _let(var, v, body):
    """Let var = v in body(var); body(v) when v reads bfloat16 (see bind)."""
    from tvm import tirx as tir

    return body(v) if _reads_bfloat16(v) else tir.Let(var, v, body(var))


def bind(v, body):
    """body(v), with v computed once: a Let unless v is a load, a variable or a constant, or reads bfloat16.
    TVM's bfloat16 storage legalization does not rewrite a Let's value: a bfloat16 load there is read as its
    uint16 bits converted to float (exp of 1.0 gave inf), so v is written out at each use instead."""
    from tvm import tirx as tir

    return body(v) if _is_leaf(v) else _let(tir.Var("v", _dtype(v)), v, body)


def at_least(v, lo):
    """max(v, lo) for a constant lo, NaN kept: `v < lo ? lo : v` is `maxps lo, v` on x86 (one instruction)."""
    from tvm import tirx as tir

    c = tir.const(lo, _dtype(v))
    return bind(v, lambda u: tir.Select(u < c, c, u))


def at_most(v, hi):
    """min(v, hi) for a constant hi, NaN kept (`minps hi, v`)."""
    from tvm import tirx as tir

    c = tir.const(hi, _dtype(v))
    return bind(v, lambda u: tir.Select(c < u, c, u))


def relu(v):
    return at_least(v, 0)


def clamp(v, lo=None, hi=None):
    """v clamped to [lo, hi] (either bound may be None); a NaN stays NaN, as np.clip and ONNX Runtime do."""
    if lo is not None:
        v = at_least(v, lo)
    if hi is not None:
        v = at_most(v, hi)
    return v


def _is_float(v) -> bool:
    return _dtype(v).startswith(("float", "bfloat"))


_NAN_BITS = {"float16": ("int16", 0x7FFF, 0x7C00), "float32": ("int32", 0x7FFFFFFF, 0x7F800000),
              "float64": ("int64", 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
              "bfloat16": ("int16", 0x7FFF, 0x7F80)}  # LLVM has no isnan of bfloat16: TVM refuses tir.isnan


def is_nan(v):
    """isnan(v) from the bits: |v| above inf's pattern. TVM scalarizes a whole vector loop where `tir.isnan` wraps
    the if_then_else of inlined padding (max pooling: 5-20x the instructions); integer ops vectorize."""
    from tvm import tirx as tir

    if _dtype(v) not in _NAN_BITS:
        return tir.isnan(v)
    int_type, magnitude, inf = _NAN_BITS[_dtype(v)]
    bits = tir.reinterpret(int_type, v) & tir.const(magnitude, int_type)
    return tir.const(inf, int_type) < bits


def maximum(a, b):
    """max(a, b) that is NaN when either is (np.maximum, ONNX Max); a few instructions where te.max is one."""
    from tvm import te
    from tvm import tirx as tir

    if not _is_float(a):
        return te.max(a, b)
    # `b < a ? a : b` passes b's NaN through; the isnan select adds a's
    return bind(a, lambda x: bind(b, lambda y: tir.Select(is_nan(x), x, tir.Select(y < x, x, y))))


def minimum(a, b):
    """min(a, b) that is NaN when either is (np.minimum, ONNX Min)."""
    from tvm import te
    from tvm import tirx as tir

    if not _is_float(a):
        return te.min(a, b)
    return bind(a, lambda x: bind(b, lambda y: tir.Select(is_nan(x), x, tir.Select(x < y, x, y))))


def reduce_max(expr, axis, from_lowest: bool = False):
    """te.max(expr, axis=axis) whose result is NaN when any element is (ONNX ReduceMax, np.max). It starts from
    -inf, or with `from_lowest` from the dtype's lowest finite value, as ONNX Runtime's max pooling does (an all
    -inf window gives -3.4e38 there)."""
    return _nan_reducer("max", from_lowest)(expr, axis=axis)


def reduce_min(expr, axis):
    """te.min(expr, axis=axis) whose result is NaN when any element is."""
    return _nan_reducer("min", False)(expr, axis=axis)


def _nan_reducer(kind: str, from_lowest: bool):
    from tvm import te
    from tvm import tirx as tir

    def combine(acc, x):
        if not _is_float(acc):
            return te.max(acc, x) if kind == "max" else te.min(acc, x)
        # `acc < x ? x : acc` keeps a NaN accumulator (the compare is false); the isnan select takes a NaN x.
        # Symmetric in NaN, so partial results (rfactor, cross-thread) may combine in any order.
        better = acc < x if kind == "max" else x < acc
        return tir.Select(is_nan(x), x, tir.Select(better, x, acc))

    def identity(dtype):  # ∓inf for floats: an all -inf row's max is -inf (np.max; ONNX Runtime's ReduceMax)
        if str(dtype).startswith(("float", "bfloat")) and not from_lowest:
            return tir.const(float("-inf") if kind == "max" else float("inf"), dtype)
        return tir.min_value(dtype) if kind == "max" else tir.max_value(dtype)

    return te.comm_reducer(combine, identity, name=f"nan_{kind}{'_from_lowest' if from_lowest else ''}")


def exp(x, subnormal: bool = False):
    """exp(x) for a float32 TE expression; 0 below -87.3 (where float32 exp is denormal), inf above ln(FLT_MAX),
    NaN for NaN. Other dtypes: te.exp.

    `subnormal`: down to -103.97, where e^x is a denormal float32, scale by 2^(n + 64) and then by 2^-64, so the
    result rounds once into the denormal range as expf's does (the Exp op: NumPy and ONNX Runtime keep those
    values; inside softmax, tanh or sigmoid they vanish and the cheaper flush stays)."""
    from tvm import te
    from tvm import tirx as tir

    if _dtype(x) != "float32":
        return te.exp(x)

    def const(v):
        return tir.const(v, "float32")

    def of(xv):
        def with_n(n):
            def with_r(r):
                poly = _horner(_EXP_POLY, r, const) * (r * r) + r + const(1.0)
                if not subnormal:
                    return tir.Select(xv < const(_EXP_MIN), const(0.0), tir.Select(
                        const(_EXP_OVERFLOW) < xv, const(float("inf")), poly * _pow2(n)))
                # each 2^k built only for exponents it can hold: the unselected lanes stay plain numbers
                normal = poly * _pow2(te.max(n, const(-126.0)))
                tiny = poly * _pow2(te.min(n, const(-127.0)) + const(64.0)) * const(2.0 ** -64)
                return tir.Select(xv < const(_EXP_MIN_SUBNORMAL), const(0.0), tir.Select(
                    const(_EXP_OVERFLOW) < xv, const(float("inf")), tir.Select(n < const(-126.0), tiny, normal)))

            # n comes from x clamped the plain way, so it is finite even for a NaN (a NaN converted to int32 is
            # poison in LLVM); r uses x itself, so a NaN flows through the polynomial into the result. Up to
            # 88.38 r stays in [-ln2/2, ln2/2]; from there to 88.72, n stays 127 and r grows to ln 2, within a
            # few ulp.
            return _let(tir.Var("r", "float32"), xv - n * const(_LN2_HI) - n * const(_LN2_LO), with_r)

        xn = te.min(te.max(xv, const(_EXP_MIN_SUBNORMAL if subnormal else _EXP_MIN)), const(_EXP_MAX))
        return _let(tir.Var("n", "float32"), te.floor(xn * const(_LOG2E) + const(0.5)), with_n)

    return _let(tir.Var("x", "float32"), x, of)


def _pow2(n):
    """2^n for a float32 TE expression holding an integer in [-126, 127], from its exponent bits."""
    from tvm import tirx as tir

    return tir.reinterpret("float32", (n.astype("int32") + tir.const(127, "int32")) << tir.const(23, "int32"))


def erf(x):
    """erf(x) for a float32 TE expression; float16 and bfloat16 through it (LLVM lowers no half tirx.erf);
    other dtypes: te.erf."""
    from tvm import te
    from tvm import tirx as tir

    if _dtype(x) in ("float16", "bfloat16"):
        return erf(x.astype("float32")).astype(_dtype(x))
    if _dtype(x) != "float32":
        return te.erf(x)

    def const(v):
        return tir.const(v, "float32")

    def of(xc):
        return _let(tir.Var("x2", "float32"), xc * xc,
                    lambda x2: xc * _horner(_ERF_P, x2, const) / _horner(_ERF_Q, x2, const))

    return _let(tir.Var("x", "float32"), clamp(x, -4.0, 4.0), of)  # NaN stays NaN


# --- rounding half to even ----------------------------------------------------------------------------------

_LLVM = contextvars.ContextVar("kiln_lowering_for_llvm", default=False)


@contextlib.contextmanager
def lowering_for(target_kind: str):
    """Computes built inside this lower for `target_kind` (codegen/lower.py sets it around each group)."""
    token = _LLVM.set(target_kind == "llvm")
    try:
        yield
    finally:
        _LLVM.reset(token)


def round_half_even(v):
    """v rounded to the nearest integer, ties to even (ONNX Round, QuantizeLinear). On LLVM targets TVM lowers
    both `tir.nearbyint` and `tir.round` to llvm.nearbyint, but its loop vectorizer keeps only `tir.round`
    vector once an int→float cast precedes it: with `tir.nearbyint` every quantize after an int32 sum ran as
    a scalar loop that LLVM re-vectorized across rows with gathers and byte-wise stores (MobileNetV2's
    quantized 16→96 expansion 0.52 ms). CUDA's `round` rounds ties away from zero, so it keeps nearbyint."""
    from tvm import tirx as tir

    return tir.round(v) if _LLVM.get() else tir.nearbyint(v)
