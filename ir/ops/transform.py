"""Tensor-manipulation ops: reshape, transpose, concat/split, slicing, gathers and scatters, padding, tiling.

Every attribute is static (shapes, axes, pads already resolved by the frontend), so each type rule computes an
exact output shape and codegen sees fixed index arithmetic. Axes in attrs are non-negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.errors import TypeCheckError

from ..expr import Call
from ..op import OpDef, OpPattern, define_compute, register_op
from ..types import TensorType, TupleType, is_int


def _static(t: TensorType, op: str) -> tuple[int, ...]:
    if not t.is_static:
        raise TypeCheckError(f"{op} needs static shapes, got {t}; bind symbolic dims with --input-shape")
    return t.shape  # type: ignore[return-value]


def _axis(axis: int, ndim: int, op: str) -> int:
    if not -ndim <= axis < max(ndim, 1):
        raise TypeCheckError(f"{op}: axis {axis} out of range for rank {ndim}")
    return axis % max(ndim, 1)


# --- reshape -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReshapeAttrs:
    newshape: tuple[int, ...]


def _reshape_type(x: TensorType, a: ReshapeAttrs) -> TensorType:
    if any(d < 0 for d in a.newshape):
        raise TypeCheckError(f"reshape: target {list(a.newshape)} must be fully resolved")
    if x.is_static and x.size != int(np.prod(a.newshape, dtype=np.int64)):
        raise TypeCheckError(f"reshape: cannot reshape {x} ({x.size} elements) to {list(a.newshape)}")
    return TensorType(a.newshape, x.dtype)


RESHAPE = register_op(OpDef("reshape", ReshapeAttrs, _reshape_type, lambda x, a: x.reshape(a.newshape),
                            OpPattern.INJECTIVE, flops=lambda x, a: 0))


def resolve_reshape(shape: tuple[int, ...], target: tuple[int, ...], allowzero: bool = False) -> tuple[int, ...]:
    """ONNX Reshape's target semantics: 0 copies the input dim (unless allowzero), -1 is inferred."""
    out = [shape[i] if d == 0 and not allowzero and i < len(shape) else d for i, d in enumerate(target)]
    if out.count(-1) > 1:
        raise TypeCheckError(f"reshape target {list(target)} has more than one -1")
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        total = int(np.prod(shape, dtype=np.int64))
        if known == 0 or total % known:
            raise TypeCheckError(f"reshape: cannot infer -1 in {list(target)} for shape {list(shape)}")
        out[out.index(-1)] = total // known
    return tuple(out)


# --- transpose -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TransposeAttrs:
    axes: tuple[int, ...]


def _transpose_type(x: TensorType, a: TransposeAttrs) -> TensorType:
    if sorted(a.axes) != list(range(x.ndim)):
        raise TypeCheckError(f"transpose: perm {list(a.axes)} is not a permutation of {x.ndim} axes")
    return TensorType(tuple(x.shape[i] for i in a.axes), x.dtype)


TRANSPOSE = register_op(OpDef("transpose", TransposeAttrs, _transpose_type,
                              lambda x, a: np.ascontiguousarray(np.transpose(x, a.axes)), OpPattern.INJECTIVE,
                              flops=lambda x, a: 0))


# --- concatenate / split -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AxisAttrs:
    axis: int = 0


def _concat_type(xs: list[TensorType], a: AxisAttrs) -> TensorType:
    if not xs:
        raise TypeCheckError("concatenate of nothing")
    first = xs[0]
    for x in xs[1:]:
        if x.ndim != first.ndim or x.dtype != first.dtype:
            raise TypeCheckError(f"concatenate: {x} does not match {first}")
        for i, (p, q) in enumerate(zip(x.shape, first.shape)):
            if i != a.axis and p != q:
                raise TypeCheckError(f"concatenate on axis {a.axis}: {x} and {first} differ on axis {i}")
    dims = [x.shape[a.axis] for x in xs]
    total = sum(dims) if all(isinstance(d, int) for d in dims) else "+".join(map(str, dims))
    return TensorType(first.shape[: a.axis] + (total,) + first.shape[a.axis + 1:], first.dtype)


CONCATENATE = register_op(OpDef("concatenate", AxisAttrs, _concat_type,
                                lambda xs, a: np.concatenate(xs, axis=a.axis), OpPattern.INJECTIVE,
                                flops=lambda xs, a: 0, variadic=True))


@dataclass(frozen=True)
class SplitAttrs:
    axis: int
    sizes: tuple[int, ...]


def _split_type(x: TensorType, a: SplitAttrs) -> TupleType:
    if not -x.ndim <= a.axis < x.ndim:
        raise TypeCheckError(f"split: axis {a.axis} out of range for {x}")
    axis = a.axis % x.ndim
    if x.shape[axis] != sum(a.sizes):
        raise TypeCheckError(f"split: sizes {list(a.sizes)} do not add up to axis {a.axis} of {x}")
    return TupleType(tuple(TensorType(x.shape[:axis] + (s,) + x.shape[axis + 1:], x.dtype) for s in a.sizes))


def _split(x: np.ndarray, a: SplitAttrs):
    return tuple(np.split(x, np.cumsum(a.sizes)[:-1], axis=a.axis))


SPLIT = register_op(OpDef("split", SplitAttrs, _split_type, _split, OpPattern.INJECTIVE, flops=lambda x, a: 0))


# --- strided slice -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SliceAttrs:
    """Per axis of the input, a Python slice already clamped: start, stop (None = to the end), step."""

    begin: tuple[int, ...]
    end: tuple[int | None, ...]
    strides: tuple[int, ...]


def _slices(a: SliceAttrs) -> tuple[slice, ...]:
    return tuple(slice(b, e, s) for b, e, s in zip(a.begin, a.end, a.strides))


def _slice_type(x: TensorType, a: SliceAttrs) -> TensorType:
    shape = _static(x, "strided_slice")
    if not len(a.begin) == len(a.end) == len(a.strides) == x.ndim:
        raise TypeCheckError(f"strided_slice: needs one begin/end/stride per axis of {x}")
    if any(s == 0 for s in a.strides):
        raise TypeCheckError("strided_slice: a step of 0")
    dims = tuple(len(range(*sl.indices(n))) for sl, n in zip(_slices(a), shape))
    return TensorType(dims, x.dtype)


STRIDED_SLICE = register_op(OpDef("strided_slice", SliceAttrs, _slice_type,
                                  lambda x, a: np.ascontiguousarray(x[_slices(a)]), OpPattern.INJECTIVE,
                                  flops=lambda x, a: 0))


# --- gathers and scatters ------------------------------------------------------------------------------------

def _check_indices(i: TensorType, op: str) -> None:
    if not is_int(i.dtype):
        raise TypeCheckError(f"{op}: indices must be integers, got {i}")


def _take_type(x: TensorType, i: TensorType, a: AxisAttrs) -> TensorType:
    _check_indices(i, "take")
    axis = _axis(a.axis, x.ndim, "take")
    return TensorType(x.shape[:axis] + i.shape + x.shape[axis + 1:], x.dtype)


def _bounded(i: np.ndarray, n: int, op: str) -> np.ndarray:
    if i.size and (i.min() < -n or i.max() >= n):
        raise IndexError(f"{op}: index out of range [-{n}, {n})")
    return np.where(i < 0, i + n, i)


def _take(x: np.ndarray, i: np.ndarray, a: AxisAttrs) -> np.ndarray:
    return np.take(x, _bounded(i, x.shape[a.axis], "take"), axis=a.axis)


TAKE = register_op(OpDef("take", AxisAttrs, _take_type, _take, OpPattern.INJECTIVE, flops=lambda x, i, a: 0))


def _gather_elements_type(x: TensorType, i: TensorType, a: AxisAttrs) -> TensorType:
    _check_indices(i, "gather_elements")
    if i.ndim != x.ndim:
        raise TypeCheckError(f"gather_elements: indices {i} and data {x} differ in rank")
    return TensorType(i.shape, x.dtype)


GATHER_ELEMENTS = register_op(OpDef(
    "gather_elements", AxisAttrs, _gather_elements_type,
    lambda x, i, a: np.take_along_axis(x, _bounded(i, x.shape[a.axis], "gather_elements"), axis=a.axis),
    OpPattern.INJECTIVE, flops=lambda x, i, a: 0))


@dataclass(frozen=True)
class GatherNDAttrs:
    batch_dims: int = 0


def _gather_nd_type(x: TensorType, i: TensorType, a: GatherNDAttrs) -> TensorType:
    _check_indices(i, "gather_nd")
    k = i.shape[-1]
    if not isinstance(k, int) or a.batch_dims + k > x.ndim:
        raise TypeCheckError(f"gather_nd: last indices dim {k} too large for {x}")
    return TensorType(i.shape[:-1] + x.shape[a.batch_dims + k:], x.dtype)


def _gather_nd(x: np.ndarray, i: np.ndarray, a: GatherNDAttrs) -> np.ndarray:
    b = a.batch_dims
    batch = x.shape[:b]
    nb = int(np.prod(batch, dtype=np.int64))
    xs = x.reshape((nb,) + x.shape[b:])
    idx = i.reshape((nb,) + i.shape[b:])
    k = i.shape[-1]
    outs = []
    for n in range(nb):
        flat = idx[n].reshape(-1, k)
        flat = np.where(flat < 0, flat + np.array(xs.shape[1:1 + k]), flat)
        outs.append(np.stack([xs[n][tuple(row)] for row in flat]) if len(flat) else
                    np.zeros((0,) + xs.shape[1 + k:], x.dtype))
    out = np.stack(outs)
    return out.reshape(i.shape[:-1] + x.shape[b + k:])


GATHER_ND = register_op(OpDef("gather_nd", GatherNDAttrs, _gather_nd_type, _gather_nd, OpPattern.INJECTIVE,
                              flops=lambda x, i, a: 0))


@dataclass(frozen=True)
class ScatterAttrs:
    axis: int = 0
    reduction: str = "none"  # none, add, mul, max, min


_REDUCERS = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


def _scatter_elements_type(x: TensorType, i: TensorType, u: TensorType, a: ScatterAttrs) -> TensorType:
    _check_indices(i, "scatter_elements")
    if i.shape != u.shape or u.dtype != x.dtype:
        raise TypeCheckError(f"scatter_elements: indices {i} and updates {u} must match, updates as {x}")
    return x


def _scatter_elements(x: np.ndarray, i: np.ndarray, u: np.ndarray, a: ScatterAttrs) -> np.ndarray:
    out = x.copy()
    i = _bounded(i, x.shape[a.axis], "scatter_elements")
    for pos in np.ndindex(*i.shape):
        target = list(pos)
        target[a.axis] = i[pos]
        t = tuple(target)
        out[t] = u[pos] if a.reduction == "none" else _REDUCERS[a.reduction](out[t], u[pos])
    return out


SCATTER_ELEMENTS = register_op(OpDef("scatter_elements", ScatterAttrs, _scatter_elements_type,
                                     _scatter_elements, OpPattern.OPAQUE, flops=lambda x, i, u, a: 0))


def _scatter_nd_type(x: TensorType, i: TensorType, u: TensorType, a: ScatterAttrs) -> TensorType:
    _check_indices(i, "scatter_nd")
    if u.dtype != x.dtype:
        raise TypeCheckError(f"scatter_nd: updates {u} must have the data's dtype ({x})")
    return x


def _scatter_nd(x: np.ndarray, i: np.ndarray, u: np.ndarray, a: ScatterAttrs) -> np.ndarray:
    out = x.copy()
    k = i.shape[-1]
    flat_i = i.reshape(-1, k)
    flat_u = u.reshape((-1,) + x.shape[k:])
    for idx, upd in zip(flat_i, flat_u):
        t = tuple(idx)
        out[t] = upd if a.reduction == "none" else _REDUCERS[a.reduction](out[t], upd)
    return out


SCATTER_ND = register_op(OpDef("scatter_nd", ScatterAttrs, _scatter_nd_type, _scatter_nd, OpPattern.OPAQUE,
                               flops=lambda x, i, u, a: 0))


# --- broadcast, tile, pad ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShapeAttrs:
    shape: tuple[int, ...]


def _broadcast_to_type(x: TensorType, a: ShapeAttrs) -> TensorType:
    from ..types import broadcast_shapes

    return TensorType(broadcast_shapes(x.shape, a.shape, what="broadcast_to"), x.dtype)


BROADCAST_TO = register_op(OpDef(
    "broadcast_to", ShapeAttrs, _broadcast_to_type,
    lambda x, a: np.ascontiguousarray(np.broadcast_to(x, np.broadcast_shapes(x.shape, a.shape))),
    OpPattern.BROADCAST, flops=lambda x, a: 0))


@dataclass(frozen=True)
class TileAttrs:
    reps: tuple[int, ...]


def _tile_type(x: TensorType, a: TileAttrs) -> TensorType:
    shape = _static(x, "tile")
    if len(a.reps) != x.ndim or any(r < 0 for r in a.reps):
        raise TypeCheckError(f"tile: repeats {list(a.reps)} do not fit {x}")
    return TensorType(tuple(d * r for d, r in zip(shape, a.reps)), x.dtype)


TILE = register_op(OpDef("tile", TileAttrs, _tile_type, lambda x, a: np.tile(x, a.reps), OpPattern.INJECTIVE,
                         flops=lambda x, a: 0))


@dataclass(frozen=True)
class PadAttrs:
    pads: tuple[tuple[int, int], ...]  # (before, after) per axis; negative crops
    mode: str = "constant"  # constant, reflect, edge, wrap
    value: float | int = 0


def _pad_type(x: TensorType, a: PadAttrs) -> TensorType:
    shape = _static(x, "pad")
    if len(a.pads) != x.ndim:
        raise TypeCheckError(f"pad: {len(a.pads)} pad pairs for {x}")
    if a.mode not in ("constant", "reflect", "edge", "wrap"):
        raise TypeCheckError(f"pad: unknown mode {a.mode!r}")
    dims = tuple(d + b + e for d, (b, e) in zip(shape, a.pads))
    if any(d < 0 for d in dims):
        raise TypeCheckError(f"pad: pads {list(a.pads)} crop {x} below zero")
    return TensorType(dims, x.dtype)


def _pad(x: np.ndarray, a: PadAttrs) -> np.ndarray:
    grow = [(max(b, 0), max(e, 0)) for b, e in a.pads]
    if a.mode == "constant":
        out = np.pad(x, grow, mode="constant", constant_values=np.array(a.value).astype(x.dtype))
    else:
        out = np.pad(x, grow, mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[a.mode])
    crop = tuple(slice(-min(b, 0), out.shape[i] + min(e, 0)) for i, (b, e) in enumerate(a.pads))
    return np.ascontiguousarray(out[crop])


PAD = register_op(OpDef("pad", PadAttrs, _pad_type, _pad, OpPattern.INJECTIVE, flops=lambda x, a: 0))


# --- depth/space ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockAttrs:
    block_size: int
    mode: str = "DCR"  # DCR or CRD (depth_to_space only)


def _d2s_type(x: TensorType, a: BlockAttrs) -> TensorType:
    n, c, h, w = _static(x, "depth_to_space") if x.ndim == 4 else (None,) * 4
    if x.ndim != 4 or c % (a.block_size ** 2):
        raise TypeCheckError(f"depth_to_space: needs NCHW with C divisible by {a.block_size ** 2}, got {x}")
    b = a.block_size
    return TensorType((n, c // (b * b), h * b, w * b), x.dtype)


def _d2s(x: np.ndarray, a: BlockAttrs) -> np.ndarray:
    n, c, h, w = x.shape
    b = a.block_size
    if a.mode == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    return np.ascontiguousarray(y.reshape(n, c // (b * b), h * b, w * b))


DEPTH_TO_SPACE = register_op(OpDef("nn.depth_to_space", BlockAttrs, _d2s_type, _d2s, OpPattern.INJECTIVE,
                                   flops=lambda x, a: 0))


def _s2d_type(x: TensorType, a: BlockAttrs) -> TensorType:
    if x.ndim != 4:
        raise TypeCheckError(f"space_to_depth: needs NCHW, got {x}")
    n, c, h, w = _static(x, "space_to_depth")
    b = a.block_size
    if h % b or w % b:
        raise TypeCheckError(f"space_to_depth: H and W of {x} must divide by {b}")
    return TensorType((n, c * b * b, h // b, w // b), x.dtype)


def _s2d(x: np.ndarray, a: BlockAttrs) -> np.ndarray:
    n, c, h, w = x.shape
    b = a.block_size
    perm = (0, 3, 5, 1, 2, 4) if a.mode == "DCR" else (0, 1, 3, 5, 2, 4)
    y = x.reshape(n, c, h // b, b, w // b, b).transpose(perm)
    return np.ascontiguousarray(y.reshape(n, c * b * b, h // b, w // b))


SPACE_TO_DEPTH = register_op(OpDef("nn.space_to_depth", BlockAttrs, _s2d_type, _s2d, OpPattern.INJECTIVE,
                                   flops=lambda x, a: 0))


# --- scans, one-hot, triangles, top-k ------------------------------------------------------------------------

@dataclass(frozen=True)
class CumsumAttrs:
    axis: int
    exclusive: bool = False
    reverse: bool = False


def _cumsum(x: np.ndarray, a: CumsumAttrs) -> np.ndarray:
    y = np.flip(x, a.axis) if a.reverse else x
    out = np.cumsum(y, axis=a.axis, dtype=x.dtype)
    if a.exclusive:
        out = out - y
    return np.ascontiguousarray(np.flip(out, a.axis) if a.reverse else out)


CUMSUM = register_op(OpDef("cumsum", CumsumAttrs, lambda x, a: x, _cumsum, OpPattern.OPAQUE,
                           flops=lambda x, a: x.size if x.is_static else 0))


def _cumprod(x: np.ndarray, a: CumsumAttrs) -> np.ndarray:
    y = np.flip(x, a.axis) if a.reverse else x
    if a.exclusive:  # shift by one along the axis, starting from the identity 1
        pad = [(0, 0)] * x.ndim
        pad[a.axis] = (1, 0)
        y = np.take(np.pad(y, pad, constant_values=1), np.arange(x.shape[a.axis]), axis=a.axis)
    out = np.cumprod(y, axis=a.axis, dtype=x.dtype)
    return np.ascontiguousarray(np.flip(out, a.axis) if a.reverse else out)


CUMPROD = register_op(OpDef("cumprod", CumsumAttrs, lambda x, a: x, _cumprod, OpPattern.OPAQUE,
                            flops=lambda x, a: x.size if x.is_static else 0))


@dataclass(frozen=True)
class OneHotAttrs:
    depth: int
    axis: int = -1


def _one_hot_type(i: TensorType, values: TensorType, a: OneHotAttrs) -> TensorType:
    _check_indices(i, "one_hot") if i.dtype not in ("float32", "float64") else None
    axis = a.axis if a.axis >= 0 else i.ndim + 1 + a.axis
    return TensorType(i.shape[:axis] + (a.depth,) + i.shape[axis:], values.dtype)


def _one_hot(i: np.ndarray, values: np.ndarray, a: OneHotAttrs) -> np.ndarray:
    idx = i.astype(np.int64)
    idx = np.where(idx < 0, idx + a.depth, idx)
    axis = a.axis if a.axis >= 0 else i.ndim + 1 + a.axis
    hot = np.expand_dims(idx, axis) == np.arange(a.depth).reshape([-1 if d == axis else 1
                                                                     for d in range(i.ndim + 1)])
    return np.where(hot, values[1], values[0]).astype(values.dtype)


ONE_HOT = register_op(OpDef("one_hot", OneHotAttrs, _one_hot_type, _one_hot, OpPattern.INJECTIVE,
                            flops=lambda i, v, a: 0))


@dataclass(frozen=True)
class TriluAttrs:
    upper: bool = True
    k: int = 0


TRILU = register_op(OpDef("trilu", TriluAttrs, lambda x, a: x,
                          lambda x, a: np.triu(x, a.k) if a.upper else np.tril(x, a.k), OpPattern.INJECTIVE,
                          flops=lambda x, a: 0))


@dataclass(frozen=True)
class TopKAttrs:
    k: int
    axis: int = -1
    largest: bool = True
    sorted: bool = True


def _topk_type(x: TensorType, a: TopKAttrs) -> TupleType:
    axis = _axis(a.axis, x.ndim, "topk")
    if isinstance(x.shape[axis], int) and a.k > x.shape[axis]:
        raise TypeCheckError(f"topk: k={a.k} exceeds axis {axis} of {x}")
    shape = x.shape[:axis] + (a.k,) + x.shape[axis + 1:]
    return TupleType((TensorType(shape, x.dtype), TensorType(shape, "int64")))


def _topk(x: np.ndarray, a: TopKAttrs):
    axis = a.axis % x.ndim
    # A stable sort on a descending key keeps the lower index first among equal values, as ONNX asks;
    # ~x reverses integer order without the overflow of -x.
    key = (-x if x.dtype.kind == "f" else ~x) if a.largest else x
    order = np.argsort(key, axis=axis, kind="stable")
    idx = np.take(order, np.arange(a.k), axis=axis)
    return np.take_along_axis(x, idx, axis=axis), idx.astype(np.int64)


def _topk_item(call, index: int):
    """Item `index` of a topk call as a single-output expression (a kernel has one tensor output): the indices
    are `topk_indices`, the values a gather_elements of the input at those indices (CSE shares the indices)."""
    x, a = call.args[0], call.attrs
    idx = Call(TOPK_INDICES, (x,), a, f"{call.span}:1" if call.span else None)
    if index == 1:
        return idx
    axis = a.axis % x.ttype.ndim
    return Call(GATHER_ELEMENTS, (x, idx), AxisAttrs(axis), f"{call.span}:0" if call.span else None)


TOPK = register_op(OpDef("topk", TopKAttrs, _topk_type, _topk, OpPattern.OPAQUE, flops=lambda x, a: 0,
                         num_outputs=2, extra={"item": _topk_item}))
TOPK_INDICES = register_op(OpDef("topk_indices", TopKAttrs, lambda x, a: _topk_type(x, a).fields[1],
                                 lambda x, a: _topk(x, a)[1], OpPattern.OPAQUE, flops=lambda x, a: 0))


@define_compute(TOPK_INDICES)
def topk_indices_compute(x, a: TopKAttrs):
    """Rank then select: rank[i] counts the elements of i's fiber that come before x[i] (larger, or smaller,
    with ties to the lower index; NaN after every number, as the reference's argsort puts it), a permutation of
    0..n-1; output j is the i whose rank is j. O(n²) compares per fiber, each loop vectorizable."""
    from tvm import te, tirx as tir

    axis, n = a.axis % len(x.shape), int(x.shape[a.axis % len(x.shape)])
    is_float = str(x.dtype).startswith(("float", "bfloat"))

    def before(u, v, iu, iv):  # does element (u, iu) come before (v, iv)?
        better = u > v if a.largest else u < v
        tie = tir.all(u == v, iu < iv)
        if not is_float:
            return tir.any(better, tie)
        nan_u, nan_v = tir.isnan(u), tir.isnan(v)
        return tir.any(tir.all(tir.Not(nan_u), tir.any(nan_v, better, tie)), tir.all(nan_u, nan_v, iu < iv))

    m = te.reduce_axis((0, n), name="m")

    def rank(*o):
        xi, xm = x(*o), x(*o[:axis], m, *o[axis + 1:])
        return te.sum(tir.Select(before(xm, xi, m, o[axis]), tir.const(1, "int32"), tir.const(0, "int32")),
                      axis=m)

    ranks = te.compute(x.shape, rank, name="topk_rank")
    s = te.reduce_axis((0, n), name="s")
    out = tuple(x.shape[:axis]) + (a.k,) + tuple(x.shape[axis + 1:])
    return te.compute(out, lambda *o: te.sum(tir.Select(ranks(*o[:axis], s, *o[axis + 1:]) == o[axis],
                                                        s.astype("int64"), tir.const(0, "int64")), axis=s),
                      name="topk_indices")


@dataclass(frozen=True)
class ReverseSequenceAttrs:
    batch_axis: int = 1
    time_axis: int = 0


def _reverse_sequence(x: np.ndarray, lens: np.ndarray, a: ReverseSequenceAttrs) -> np.ndarray:
    out = x.copy()
    for b, n in enumerate(lens):
        src = [slice(None)] * x.ndim
        src[a.batch_axis], src[a.time_axis] = b, slice(0, int(n))
        dst = list(src)
        dst[a.time_axis] = slice(int(n) - 1, None, -1) if n > 0 else slice(0, 0)
        out[tuple(src)] = x[tuple(dst)]
    return out


REVERSE_SEQUENCE = register_op(OpDef("reverse_sequence", ReverseSequenceAttrs, lambda x, lens, a: x,
                                     _reverse_sequence, OpPattern.INJECTIVE, flops=lambda x, lens, a: 0))


# --- TE computes (codegen) -------------------------------------------------------------------------------------

@define_compute(RESHAPE)
def reshape_compute(x, a: ReshapeAttrs):
    from tvm import topi

    return topi.reshape(x, a.newshape)


@define_compute(TRANSPOSE)
def transpose_compute(x, a: TransposeAttrs):
    from tvm import topi

    return topi.transpose(x, a.axes)


@define_compute(CONCATENATE)
def concatenate_compute(xs, a: AxisAttrs):
    from tvm import topi

    return topi.concatenate(list(xs), a.axis)


@define_compute(STRIDED_SLICE)
def strided_slice_compute(x, a: SliceAttrs):
    from tvm import te

    shape = [int(d) for d in x.shape]
    starts = [sl.indices(n)[0] for sl, n in zip(_slices(a), shape)]
    out = [len(range(*sl.indices(n))) for sl, n in zip(_slices(a), shape)]
    return te.compute(out, lambda *i: x(*[s + j * st for s, j, st in zip(starts, i, a.strides)]),
                      name="strided_slice")


@define_compute(TAKE)
def take_compute(x, i, a: AxisAttrs):
    from tvm import te, tirx as tir

    n = x.shape[a.axis]
    k = len(i.shape)

    def f(*idx):
        j = _index(i(*idx[a.axis:a.axis + k]), n)
        j = tir.Select(j < 0, j + n, j)
        return x(*idx[:a.axis], j, *idx[a.axis + k:])

    return te.compute(tuple(x.shape[:a.axis]) + tuple(i.shape) + tuple(x.shape[a.axis + 1:]), f, name="take")


@define_compute(BROADCAST_TO)
def broadcast_to_compute(x, a: ShapeAttrs):
    from tvm import topi

    return topi.broadcast_to(x, np.broadcast_shapes(tuple(int(d) for d in x.shape), a.shape))


@define_compute(PAD)
def pad_compute(x, a: PadAttrs):
    from tvm import topi

    if a.mode == "constant" and all(b >= 0 and e >= 0 for b, e in a.pads):
        return topi.nn.pad(x, [b for b, _ in a.pads], [e for _, e in a.pads], a.value)
    return _pad_any(x, a)


def _pad_source(j, n: int, mode: str):
    """The input index that output-side index j (in input coordinates, possibly outside [0, n)) reads, for the
    non-constant modes; periodic, as np.pad is when a pad exceeds the axis."""
    from tvm import tirx as tir

    if mode == "edge":
        return tir.max(tir.min(j, n - 1), 0)
    if mode == "wrap":
        return tir.floormod(j, n)
    if n == 1:  # reflect of a single element: itself
        return tir.const(0, str(j.ty))
    # in j's own index type: an int64 index here met int32 ones where a resize's tables were inlined into it
    m = tir.floormod(j, 2 * (n - 1))
    return tir.Select(m < n, m, 2 * (n - 1) - m)


def _pad_any(x, a: PadAttrs):
    """Reflect, edge and wrap pads, and negative (cropping) pads of any mode: each output element names the input
    element it copies, so the kernel is injective (parallel, vectorized stores)."""
    from tvm import te, tirx as tir

    shape = [int(d) for d in x.shape]
    out = [d + b + e for d, (b, e) in zip(shape, a.pads)]

    def f(*o):
        src = [j - b for j, (b, _) in zip(o, a.pads)]
        if a.mode != "constant":
            return x(*[_pad_source(s, n, a.mode) for s, n in zip(src, shape)])
        inside = [tir.And(s >= 0, s < n) for s, n, (b, e) in zip(src, shape, a.pads) if b > 0 or e > 0]
        value = x(*src)
        return tir.Select(tir.all(*inside), value, tir.const(a.value, x.dtype)) if inside else value

    return te.compute(out, f, name="pad")


def _index(j, n):
    """An index read from a tensor, in the type of the loop indices around it (int32) wherever the axis allows:
    an int64 index met int32 ones where a concat before a gather was inlined into it, which CUDA's lowering
    refuses (an index in range of an axis this short fits either type)."""
    return j.astype("int32" if int(n) < 2 ** 31 else "int64")


def _normalized(j, n):
    from tvm import tirx as tir

    j = _index(j, n)
    return tir.Select(j < 0, j + n, j)


@define_compute(GATHER_ELEMENTS)
def gather_elements_compute(x, i, a: AxisAttrs):
    from tvm import te

    n = int(x.shape[a.axis])
    return te.compute(i.shape, lambda *o: x(*o[:a.axis], _normalized(i(*o), n), *o[a.axis + 1:]),
                      name="gather_elements")


@define_compute(GATHER_ND)
def gather_nd_compute(x, i, a: GatherNDAttrs):
    from tvm import te

    b, k, r = a.batch_dims, int(i.shape[-1]), len(i.shape) - 1
    out = tuple(i.shape[:-1]) + tuple(x.shape[b + k:])

    def f(*o):
        coords = [_normalized(i(*o[:r], m), int(x.shape[b + m])) for m in range(k)]
        return x(*o[:b], *coords, *o[r:])

    return te.compute(out, f, name="gather_nd")


@define_compute(TILE)
def tile_compute(x, a: TileAttrs):
    from tvm import te, tirx as tir

    shape = [int(d) for d in x.shape]
    return te.compute([d * r for d, r in zip(shape, a.reps)],
                      lambda *o: x(*[j if r == 1 else tir.floormod(j, d) for j, d, r in zip(o, shape, a.reps)]),
                      name="tile")


@define_compute(DEPTH_TO_SPACE)
def depth_to_space_compute(x, a: BlockAttrs):
    from tvm import te

    n, c, h, w = (int(d) for d in x.shape)
    b, c_out = a.block_size, c // (a.block_size ** 2)

    def f(ni, ci, hi, wi):
        bh, bw = hi % b, wi % b
        ch = (bh * b + bw) * c_out + ci if a.mode == "DCR" else (ci * b + bh) * b + bw
        return x[ni, ch, hi // b, wi // b]

    return te.compute((n, c_out, h * b, w * b), f, name="depth_to_space")


@define_compute(SPACE_TO_DEPTH)
def space_to_depth_compute(x, a: BlockAttrs):
    from tvm import te

    n, c, h, w = (int(d) for d in x.shape)
    b = a.block_size

    def f(ni, co, hi, wi):
        if a.mode == "DCR":
            bh, bw, ci = co // (b * c), co // c % b, co % c
        else:
            ci, bh, bw = co // (b * b), co // b % b, co % b
        return x[ni, ci, hi * b + bh, wi * b + bw]

    return te.compute((n, c * b * b, h // b, w // b), f, name="space_to_depth")


@define_compute(ONE_HOT)
def one_hot_compute(i, values, a: OneHotAttrs):
    from tvm import te, tirx as tir

    axis = a.axis if a.axis >= 0 else len(i.shape) + 1 + a.axis
    out = tuple(i.shape[:axis]) + (a.depth,) + tuple(i.shape[axis:])

    def f(*o):
        j = _normalized(i(*o[:axis], *o[axis + 1:]), a.depth)
        return tir.Select(j == o[axis].astype("int64"), values[1], values[0])

    return te.compute(out, f, name="one_hot")


@define_compute(TRILU)
def trilu_compute(x, a: TriluAttrs):
    from tvm import te, tirx as tir

    def f(*o):
        d = o[-1] - o[-2]
        keep = d >= a.k if a.upper else d <= a.k
        return tir.Select(keep, x(*o), tir.const(0, x.dtype))

    return te.compute(x.shape, f, name="trilu")


@define_compute(REVERSE_SEQUENCE)
def reverse_sequence_compute(x, lens, a: ReverseSequenceAttrs):
    from tvm import te, tirx as tir

    def f(*o):
        t, n = o[a.time_axis].astype("int64"), lens[o[a.batch_axis]].astype("int64")
        src = list(o)
        src[a.time_axis] = tir.Select(t < n, n - 1 - t, t)
        return x(*src)

    return te.compute(x.shape, f, name="reverse_sequence")


# --- scatters and scans: sequential along one dimension, so written as loop nests (te.extern) ---------------
# Each kernel copies or scans with its outer loop parallel and its innermost loop unit-stride; scatter updates run
# in the reference's order, so duplicate indices resolve (or reduce) as they do there. A statement whose innermost
# loop has independent, unit-stride iterations (the copy of the data, a scan step across the axes after the
# scanned one, a scatter_nd row) sits in a block named CONTIGUOUS: schedules/x86/scan_scatter.py vectorizes the
# loop around it (TVM's schedule primitives reach no other loop of an extern nest).

CONTIGUOUS = "contiguous"
_COPY_ROW = 256  # elements: a copy's rows are the trailing dims that reach this many
_SCAN_CHUNK = 64  # a scan along the first axis runs its columns in parallel chunks of this many


def _strides(shape) -> list[int]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return out[::-1]


def _combine(reduction: str):
    from . import float_math

    return {"none": lambda old, new: new, "add": lambda old, new: old + new, "mul": lambda old, new: old * new,
            "max": float_math.maximum, "min": float_math.minimum}[reduction]


def _extern(name: str, x, ins, body):
    """A te.extern of x's shape and dtype; body(ins buffers, out buffer, T) writes the loop nest."""
    from tvm import te, tirx as tir
    from tvm.script.ir_builder import IRBuilder, tirx as T

    def gen(in_bufs, out_buf):
        # a scope for the nest (T.seq_scope's pragma makes LLVM warn), named apart from te.extern's own block
        with IRBuilder() as ib, T.sblock(f"{name}_nest"):
            body([T.buffer_proxy(b) for b in in_bufs], T.buffer_proxy(out_buf), T)
        return ib.get()

    out_buf = tir.decl_buffer(x.shape, x.dtype, f"{name}_out")
    return te.extern([x.shape], ins, lambda i, o: gen(i, o[0]), dtype=x.dtype, out_buffers=[out_buf], name=name)


def _copy(T, src, dst, shape) -> None:
    total = int(np.prod(shape, dtype=np.int64))
    row = 1
    for d in reversed(shape):  # rows of whole trailing dims, so they tile the tensor exactly
        if row >= _COPY_ROW:
            break
        row *= d
    with T.parallel(0, total // row if row else 0) as r, T.serial(0, row) as j, T.sblock(CONTIGUOUS):
        dst[r * row + j] = src[r * row + j]


@define_compute(SCATTER_ELEMENTS)
def scatter_elements_compute(x, i, u, a: ScatterAttrs):
    from tvm import tirx as tir

    shape, ishape = [int(d) for d in x.shape], [int(d) for d in i.shape]
    ds, js = _strides(shape), _strides(ishape)
    others = [m for m in range(len(ishape)) if m != a.axis]
    fibers = int(np.prod([ishape[m] for m in others], dtype=np.int64))
    combine, n = _combine(a.reduction), shape[a.axis]

    def body(ins, out, T):
        data, idx, upd = ins
        _copy(T, data, out, shape)
        with T.parallel(0, fibers) as f:  # fibers along the axis are disjoint in the output
            d_base, i_base, rest = tir.const(0, "int64"), tir.const(0, "int64"), f.astype("int64")
            for m in reversed(others):
                c = tir.floormod(rest, ishape[m])
                rest = tir.floordiv(rest, ishape[m])
                d_base, i_base = d_base + c * ds[m], i_base + c * js[m]
            with T.serial(0, ishape[a.axis]) as k:
                at = i_base + k.astype("int64") * js[a.axis]
                t = _normalized(idx[at], n)
                dst = d_base + t * ds[a.axis]
                out[dst] = combine(out[dst], upd[at])

    return _extern("scatter_elements", x, [x, i, u], body)


@define_compute(SCATTER_ND)
def scatter_nd_compute(x, i, u, a: ScatterAttrs):
    shape, ishape = [int(d) for d in x.shape], [int(d) for d in i.shape]
    ds, k = _strides(shape), ishape[-1]
    rows = int(np.prod(ishape[:-1], dtype=np.int64))
    size = int(np.prod(shape[k:], dtype=np.int64))
    combine = _combine(a.reduction)

    def body(ins, out, T):
        data, idx, upd = ins
        _copy(T, data, out, shape)
        with T.serial(0, rows) as m:  # in order: a later duplicate overwrites (or reduces into) an earlier one
            base = 0
            for lvl in range(k):
                base = base + _normalized(idx[m.astype("int64") * k + lvl], shape[lvl]) * ds[lvl]
            def put(j):  # a row's destinations are distinct: its iterations are independent
                dst = base + j.astype("int64")
                out[dst] = combine(out[dst], upd[m.astype("int64") * size + j.astype("int64")])

            if size >= 4096:  # long rows: parallel chunks, each a contiguous run
                with T.parallel(0, size // _COPY_ROW) as jo, T.serial(0, _COPY_ROW) as ji, T.sblock(CONTIGUOUS):
                    put(jo * _COPY_ROW + ji)
                if size % _COPY_ROW:
                    with T.serial(0, size % _COPY_ROW) as jt, T.sblock(CONTIGUOUS):
                        put(size // _COPY_ROW * _COPY_ROW + jt)
            else:
                with T.serial(0, size) as j, T.sblock(CONTIGUOUS):
                    put(j)

    return _extern("scatter_nd", x, [x, i, u], body)


def _scan_compute(x, a: CumsumAttrs, op, identity, name: str):
    from tvm import tirx as tir

    shape = [int(d) for d in x.shape]
    n = shape[a.axis]
    before = int(np.prod(shape[:a.axis], dtype=np.int64))
    after = int(np.prod(shape[a.axis + 1:], dtype=np.int64))

    def pos(k):
        return n - 1 - k if a.reverse else k

    def body(ins, out, T):
        (data,) = ins

        def at(i, k, j):
            return (i * n + pos(k)) * after + j

        def first(i, j):
            return tir.const(identity, x.dtype) if a.exclusive else data[at(i, 0, j)]

        def step(i, k, j):
            return op(out[at(i, k - 1, j)], data[at(i, k - 1, j) if a.exclusive else at(i, k, j)])

        if n == 0:
            return
        if after == 1:  # the scanned axis is the innermost: one sequential fiber per outer index, in parallel
            with T.parallel(0, before) as i:
                out[at(i, 0, 0)] = first(i, 0)
                with T.serial(1, n) as k:
                    out[at(i, k, 0)] = step(i, k, 0)
            return
        # each step of the scan runs across the `after` axis (unit stride, independent): outer fibers in parallel,
        # or, scanning the first axis, chunks of columns
        chunk = _SCAN_CHUNK if before == 1 and after % _SCAN_CHUNK == 0 and after >= 2 * _SCAN_CHUNK else after
        per = after // chunk
        with T.parallel(0, before * per) as p:
            i, j0 = p // per, p % per * chunk
            with T.serial(0, chunk) as j, T.sblock(CONTIGUOUS):
                out[at(i, 0, j0 + j)] = first(i, j0 + j)
            with T.serial(1, n) as k, T.serial(0, chunk) as j, T.sblock(CONTIGUOUS):
                out[at(i, k, j0 + j)] = step(i, k, j0 + j)

    return _extern(name, x, [x], body)


@define_compute(CUMSUM)
def cumsum_compute(x, a: CumsumAttrs):
    return _scan_compute(x, a, lambda p, q: p + q, 0, "cumsum")


@define_compute(CUMPROD)
def cumprod_compute(x, a: CumsumAttrs):
    return _scan_compute(x, a, lambda p, q: p * q, 1, "cumprod")
