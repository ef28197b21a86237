"""exp and erf of float32 as TE expressions of adds, multiplies and bit operations, which LLVM vectorizes: TVM
lowers `te.exp` and `te.erf` on CPUs to scalar libm calls (`expf`, `erff`), one call per lane. Both stay within a
few ulp of the exact value (the tests measure it); other dtypes keep TVM's own functions."""

from __future__ import annotations

# Cephes expf: exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in two parts (C1 exact in float32)
_LOG2E = 1.44269504088896341
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_EXP_MIN, _EXP_MAX = -87.33654475, 88.0  # 2^n stays a normal float32: n in [-126, 127]

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


def exp(x):
    """exp(x) for a float32 TE expression; 0 below -87.3 (where float32 exp is denormal), wrong above 88.
    Other dtypes: te.exp."""
    from tvm import te
    from tvm import tirx as tir

    if _dtype(x) != "float32":
        return te.exp(x)

    def const(v):
        return tir.const(v, "float32")

    xv, n, r = tir.Var("x", "float32"), tir.Var("n", "float32"), tir.Var("r", "float32")
    poly = _horner(_EXP_POLY, r, const) * (r * r) + r + const(1.0)
    two_n = tir.reinterpret("float32", (n.astype("int32") + tir.const(127, "int32")) << tir.const(23, "int32"))
    body = tir.Select(xv < const(_EXP_MIN), const(0.0), poly * two_n)
    xc = te.min(te.max(xv, const(_EXP_MIN)), const(_EXP_MAX))
    body = tir.Let(r, xc - n * const(_LN2_HI) - n * const(_LN2_LO), body)
    body = tir.Let(n, te.floor(xc * const(_LOG2E) + const(0.5)), body)
    return tir.Let(xv, x, body)


def erf(x):
    """erf(x) for a float32 TE expression; other dtypes: te.erf."""
    from tvm import te
    from tvm import tirx as tir

    if _dtype(x) != "float32":
        return te.erf(x)

    def const(v):
        return tir.const(v, "float32")

    xc, x2 = tir.Var("x", "float32"), tir.Var("x2", "float32")
    body = tir.Let(x2, xc * xc, xc * _horner(_ERF_P, x2, const) / _horner(_ERF_Q, x2, const))
    return tir.Let(xc, te.min(te.max(x, const(-4.0)), const(4.0)), body)
