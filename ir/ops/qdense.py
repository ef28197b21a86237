"""qnn.dense_packed: uint8 rows times int8 weights summed in int32, the integer core of a quantized MatMul/Gemm.

`passes/realize_qdq` rewrites dense(dequantize(x_q), W) into this op on the raw bytes, then a per-unit float
scale (as for qnn.conv2d, the zero point's share, zx · ΣW_q[n], is subtracted after it in int32). Weights are
packed [N/b, K/4, b, 4]: b output units × the 4 consecutive k one int32 lane sums per dot-product instruction,
so a step of the kernel broadcasts 4 input bytes against one vector of b lanes × 4 weight bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.errors import TypeCheckError

from ..op import OpDef, OpPattern, define_compute, register_op
from ..types import TensorType
from .qconv import DOT


@dataclass(frozen=True)
class QDenseAttrs:
    block: int  # output units per vector


def pack_qdense_weight(w: np.ndarray, block: int) -> np.ndarray:
    """[N, K] → [N/b, K/4, b, 4]."""
    n, k = w.shape
    return np.ascontiguousarray(w.reshape(n // block, block, k // DOT, DOT).transpose(0, 2, 1, 3))


def unpack_qdense_weight(w: np.ndarray) -> np.ndarray:
    nb, kq, b, d = w.shape
    return np.ascontiguousarray(w.transpose(0, 2, 1, 3).reshape(nb * b, kq * d))


def _type(x: TensorType, w: TensorType, a: QDenseAttrs) -> TensorType:
    if str(x.dtype) not in ("uint8", "int8") or str(w.dtype) != "int8":
        raise TypeCheckError(f"qnn.dense_packed: takes uint8 or int8 data and int8 weights, got {x} and {w}")
    if w.ndim != 4 or w.shape[2] != a.block or w.shape[3] != DOT or x.ndim < 1 or x.shape[-1] != w.shape[1] * DOT:
        raise TypeCheckError(f"qnn.dense_packed: x is {x}, packed w is {w}; expected [units/{a.block}, "
                             f"{x.shape[-1] if x.ndim else '?'}/{DOT}, {a.block}, {DOT}]")
    return TensorType(x.shape[:-1] + (w.shape[0] * a.block,), "int32")


def _reference(x: np.ndarray, w: np.ndarray, a: QDenseAttrs) -> np.ndarray:
    return np.matmul(x.astype(np.int64), unpack_qdense_weight(w).astype(np.int64).T).astype(np.int32)


QDENSE_PACKED = register_op(OpDef(
    "qnn.dense_packed", QDenseAttrs, _type, _reference, OpPattern.OUT_ELEMWISE_FUSABLE,
    flops=lambda x, w, a: 2 * _type(x, w, a).size * int(x.shape[-1]) if x.is_static else 0))


@define_compute(QDENSE_PACKED)
def _compute(x, w, a: QDenseAttrs):
    """Reduction axes (k / 4, k % 4), the 4 innermost: what the dot-product intrinsic matches."""
    from tvm import te

    kq, kd = te.reduce_axis((0, int(w.shape[1])), name="kq"), te.reduce_axis((0, DOT), name="kd")
    n = int(w.shape[0]) * a.block
    return te.compute(tuple(x.shape[:-1]) + (n,), lambda *i: te.sum(
        x[(*i[:-1], kq * DOT + kd)].astype("int32") * w[i[-1] // a.block, kq, i[-1] % a.block, kd].astype("int32"),
        axis=[kq, kd]), name="qdense_packed")
