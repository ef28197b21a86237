"""The dtype a reduction accumulates in, for every op's compute and reference: float16 and bfloat16 inputs sum
(matmul, softmax, reductions, norm statistics) in float32 and round once to the output dtype, as ONNX Runtime
and the ONNX reference do; every other dtype accumulates in itself, so those kernels stay as they were."""

from __future__ import annotations

# 11 (float16) or 8 (bfloat16) significant bits lose a summand below 2^-11 of the running sum: a K=4096 dot
# product of values near 1 is off by several units in its last place, and ONNX's tests notice
_WIDER = {"float16": "float32", "bfloat16": "float32"}


def accumulator(dtype) -> str:
    """The dtype that sums of `dtype` values accumulate in."""
    return _WIDER.get(str(dtype), str(dtype))


def cast(v, dtype: str):
    """A TE expression (or tensor element) as `dtype`: itself when it already is (float32 kernels see no Cast)."""
    from .float_math import _dtype

    return v if _dtype(v) == dtype else v.astype(dtype)


def cast_stage(t, dtype: str, name: str):
    """A TE tensor as `dtype` by one elementwise stage named `name`: a sum rounded to the output dtype, or an
    input widened for a TOPI compute (the schedules inline it); `t` itself when it is already `dtype`."""
    from tvm import te

    if str(t.dtype) == str(dtype):
        return t
    return te.compute(t.shape, lambda *i: t(*i).astype(dtype), name=name)
