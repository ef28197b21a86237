"""nn.dense (y = x @ w.T, the core of Gemm and of MatMul by a constant matrix), nn.matmul (NumPy matmul with
broadcast batch dims) and einsum. Bias and activations fuse in after them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.errors import TypeCheckError

from ..op import OpDef, OpPattern, define_compute, register_op
from ..types import TensorType, broadcast_shapes, is_float
from .accumulate import accumulator, cast, cast_stage


@dataclass(frozen=True)
class DenseAttrs:
    out_dtype: str | None = None  # None means "same as x"; int8 inputs ask for "int32"


def _out_dtype(x_dtype, a) -> str:
    """out_dtype, else x's."""
    return a.out_dtype or x_dtype


def _sum_dtype(x_dtype, a) -> str:
    """The dtype the products are summed in: out_dtype, else x's widened (float16 sums in float32)."""
    return a.out_dtype or accumulator(x_dtype)


def dense_type(x: TensorType, w: TensorType, a: DenseAttrs) -> TensorType:
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise TypeCheckError(f"nn.dense: x is {x} but w is {w}; w must be [units, {x.shape[-1] if x.ndim else '?'}]")
    if x.dtype != w.dtype:
        raise TypeCheckError(f"nn.dense: x {x} and w {w} differ in dtype")
    return TensorType(x.shape[:-1] + (w.shape[0],), _out_dtype(x.dtype, a))


def dense_reference(x: np.ndarray, w: np.ndarray, a: DenseAttrs) -> np.ndarray:
    acc = _sum_dtype(x.dtype.name, a)  # widen before multiplying, as the kernel does
    return np.matmul(x.astype(acc), w.astype(acc).T).astype(_out_dtype(x.dtype.name, a))


def _dense_flops(x: TensorType, w: TensorType, a: DenseAttrs) -> int:
    return 2 * dense_type(x, w, a).size * w.shape[1] if x.is_static else 0


DENSE = register_op(OpDef("nn.dense", DenseAttrs, dense_type, dense_reference, OpPattern.OUT_ELEMWISE_FUSABLE,
                          flops=_dense_flops))


def matmul_type(a: TensorType, b: TensorType, at: DenseAttrs) -> TensorType:
    if a.ndim == 0 or b.ndim == 0:
        raise TypeCheckError(f"nn.matmul: operands must have rank ≥ 1, got {a} and {b}")
    if a.dtype != b.dtype:
        raise TypeCheckError(f"nn.matmul: {a} and {b} differ in dtype")
    ka = a.shape[-1]
    kb = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if isinstance(ka, int) and isinstance(kb, int) and ka != kb:
        raise TypeCheckError(f"nn.matmul: inner dims differ ({a} @ {b})")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2], what="nn.matmul batch dims")
    rows = a.shape[-2:-1] if a.ndim >= 2 else ()
    cols = b.shape[-1:] if b.ndim >= 2 else ()
    return TensorType(batch + rows + cols, _out_dtype(a.dtype, at))


def matmul_reference(a: np.ndarray, b: np.ndarray, at: DenseAttrs) -> np.ndarray:
    acc = _sum_dtype(a.dtype.name, at)
    return np.asarray(np.matmul(a.astype(acc), b.astype(acc))).astype(_out_dtype(a.dtype.name, at))


def _matmul_flops(a: TensorType, b: TensorType, at: DenseAttrs) -> int:
    out = matmul_type(a, b, at)
    return 2 * out.size * a.shape[-1] if out.is_static and isinstance(a.shape[-1], int) else 0


MATMUL = register_op(OpDef("nn.matmul", DenseAttrs, matmul_type, matmul_reference,
                           OpPattern.OUT_ELEMWISE_FUSABLE, flops=_matmul_flops))


@dataclass(frozen=True)
class EinsumAttrs:
    equation: str


def _einsum_type(xs: list[TensorType], a: EinsumAttrs) -> TensorType:
    if any(not x.is_static for x in xs):
        raise TypeCheckError("einsum needs static shapes")
    try:
        out = np.einsum(a.equation, *[np.zeros(x.shape, "float32") for x in xs])
    except ValueError as err:
        raise TypeCheckError(f"einsum '{a.equation}' does not fit {[str(x) for x in xs]}: {err}") from None
    if any(x.dtype != xs[0].dtype for x in xs) or not is_float(xs[0].dtype) and xs[0].dtype[0] != "i":
        raise TypeCheckError(f"einsum: operands {[str(x) for x in xs]} must share a numeric dtype")
    return TensorType(np.shape(out), xs[0].dtype)


EINSUM = register_op(OpDef("einsum", EinsumAttrs, _einsum_type,
                           lambda xs, a: np.asarray(np.einsum(
                               a.equation, *[x.astype(accumulator(x.dtype.name)) for x in xs])).astype(xs[0].dtype),
                           OpPattern.OPAQUE, variadic=True))


@define_compute(DENSE)
def dense_compute(x, w, a: DenseAttrs):
    from tvm import te

    acc = _sum_dtype(x.dtype, a)
    k = te.reduce_axis((0, x.shape[-1]), name="k")
    total = te.compute(tuple(x.shape[:-1]) + (w.shape[0],),
                       lambda *i: te.sum(x[(*i[:-1], k)].astype(acc) * w[i[-1], k].astype(acc), axis=k), name="dense")
    return cast_stage(total, _out_dtype(x.dtype, a), "dense_round")


@define_compute(MATMUL)
def matmul_compute(a, b, at: DenseAttrs):
    """NumPy matmul: a 1-D a is a row [1, k] and a 1-D b a column [k, 1], whose unit dim leaves the output."""
    from tvm import te

    acc = _sum_dtype(a.dtype, at)
    a_batch = a.shape[:-2] if len(a.shape) >= 2 else ()
    b_batch = b.shape[:-2] if len(b.shape) >= 2 else ()
    batch = [max(int(p), int(q)) for p, q in _aligned_batch(a_batch, b_batch)]
    rows = (a.shape[-2],) if len(a.shape) >= 2 else ()
    cols = (b.shape[-1],) if len(b.shape) >= 2 else ()
    k = te.reduce_axis((0, a.shape[-1]), name="k")

    def index(dims, bi):
        off = len(batch) - len(dims)
        return [0 if int(d) == 1 else bi[off + j] for j, d in enumerate(dims)]

    def f(*i):
        bi, rest = i[:len(batch)], i[len(batch):]
        row, col = rest[:len(rows)], rest[len(rows):]
        x = a[(*index(a_batch, bi), *row, k)]
        y = b[(*index(b_batch, bi), k, *col)]
        return te.sum(x.astype(acc) * y.astype(acc), axis=k)

    total = te.compute(tuple(batch) + tuple(rows) + tuple(cols), f, name="matmul")
    return cast_stage(total, _out_dtype(a.dtype, at), "matmul_round")


def _aligned_batch(p, q):
    n = max(len(p), len(q))
    p = [1] * (n - len(p)) + list(p)
    q = [1] * (n - len(q)) + list(q)
    return list(zip(p, q))


# --- dense with pre-packed weights ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PackedDenseAttrs:
    """w is packed as [units / block, k, block]: `block` consecutive output units sit side by side, so a kernel
    loads them as one vector while it walks k."""

    block: int
    out_dtype: str | None = None


def dense_packed_type(x: TensorType, wp: TensorType, a: PackedDenseAttrs) -> TensorType:
    if wp.ndim != 3 or wp.shape[2] != a.block or x.shape[-1] != wp.shape[1]:
        raise TypeCheckError(f"nn.dense_packed: x is {x}, packed w is {wp}; expected [units/{a.block}, "
                             f"{x.shape[-1]}, {a.block}]")
    return TensorType(x.shape[:-1] + (wp.shape[0] * a.block,), a.out_dtype or x.dtype)


def pack_dense_weight(w: np.ndarray, block: int) -> np.ndarray:
    n, k = w.shape
    return np.ascontiguousarray(w.reshape(n // block, block, k).transpose(0, 2, 1))


def dense_packed_reference(x: np.ndarray, wp: np.ndarray, a: PackedDenseAttrs) -> np.ndarray:
    w = wp.transpose(0, 2, 1).reshape(-1, wp.shape[1])
    return dense_reference(x, w, DenseAttrs(a.out_dtype))


DENSE_PACKED = register_op(OpDef(
    "nn.dense_packed", PackedDenseAttrs, dense_packed_type, dense_packed_reference, OpPattern.OUT_ELEMWISE_FUSABLE,
    flops=lambda x, wp, a: 2 * dense_packed_type(x, wp, a).size * wp.shape[1] if x.is_static else 0))


@define_compute(DENSE_PACKED)
def dense_packed_compute(x, wp, a: PackedDenseAttrs):
    from tvm import te

    acc = _sum_dtype(x.dtype, a)
    k = te.reduce_axis((0, x.shape[-1]), name="k")
    n = wp.shape[0] * a.block
    total = te.compute(tuple(x.shape[:-1]) + (n,), lambda *i: te.sum(
        x[(*i[:-1], k)].astype(acc) * wp[i[-1] // a.block, k, i[-1] % a.block].astype(acc), axis=k),
        name="dense_packed")
    return cast_stage(total, _out_dtype(x.dtype, a), "dense_packed_round")


def _einsum_terms(equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """Explicit subscripts: each '...' becomes capital letters (right-aligned across operands, as broadcasting
    is), and an implicit output is the ellipsis dims then the letters used once, sorted (NumPy's rule)."""
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    n_ell = max((r - len(t.replace("...", "")) for t, r in zip(terms, ranks) if "..." in t), default=0)
    ell = "".join(chr(ord("A") + j) for j in range(n_ell))
    out = []
    for t, r in zip(terms, ranks):
        m = r - len(t.replace("...", "")) if "..." in t else 0
        out.append(t.replace("...", ell[n_ell - m:]))
    if arrow:
        return out, rhs.replace("...", ell)
    letters = "".join(out)
    return out, ell + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c.islower()))


@define_compute(EINSUM)
def einsum_compute(xs, a: EinsumAttrs):
    """One te reduction for any equation: a product of the operands at their subscripts, summed over the letters
    the output leaves out (the generic schedule splits its innermost spatial loop to vectors)."""
    from tvm import te, tirx as tir

    terms, out = _einsum_terms(a.equation, [len(x.shape) for x in xs])
    size: dict[str, int] = {}
    for t, x in zip(terms, xs):
        for c, d in zip(t, x.shape):
            size[c] = max(size.get(c, 1), int(d))  # a broadcast (size-1) ellipsis dim takes the other's size
    summed = sorted(set("".join(terms)) - set(out))
    red = {c: te.reduce_axis((0, size[c]), name=f"k{c}") for c in summed}
    dtype = str(xs[0].dtype)
    acc = accumulator(dtype)

    def f(*o):
        var = dict(zip(out, o)) | red
        prod = None
        for t, x in zip(terms, xs):
            v = cast(x[tuple(0 if int(d) == 1 and size[c] != 1 else var[c] for c, d in zip(t, x.shape))], acc)
            prod = v if prod is None else prod * v
        if prod is None:
            prod = tir.const(1, acc)
        return te.sum(prod, axis=list(red.values())) if red else prod

    return cast_stage(te.compute(tuple(size[c] for c in out), f, name="einsum"), dtype, "einsum_round")
