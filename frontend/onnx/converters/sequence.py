"""ONNX sequence ops with statically known lengths: a sequence is a Python tuple of IR values during import.

Kiln IR has no sequence type. SequenceConstruct, SplitToSequence, SequenceInsert... build a `SeqValue` in the
importer; SequenceAt and ConcatFromSequence turn it back into tensors. A sequence may flow through Identity,
If branches and Loop-carried values, but not out of the graph: Kiln's outputs are tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.ir import Constant, Expr
from kiln.ir.ops import transform as tf

from ..registry import Node, converter
from .elementwise import onnx_dtype
from .tensor import _norm_axes, _static_shape, reshape


@dataclass(frozen=True)
class SeqValue:
    """An ONNX sequence during import: its tensors, and their dtype (known even when it is empty)."""

    items: tuple[Expr, ...]
    dtype: str

    def __len__(self) -> int:
        return len(self.items)


def sequence_input(node: Node, i: int) -> SeqValue:
    x = node.input(i)
    if not isinstance(x, SeqValue):
        raise node.invalid(f"input {i} ('{node.proto.input[i]}') must be a sequence, got a tensor")
    return x


def _position(node: Node, i: int, n: int, default: int, insert: bool = False) -> int:
    p = node.constant(i, "position", required=False)
    pos = default if p is None else int(np.asarray(p).item())
    hi = n if insert else n - 1
    if not -n <= pos <= hi:
        raise node.invalid(f"position {pos} out of range for a sequence of {n}")
    return pos + n if pos < 0 else pos


@converter("SequenceConstruct")
def convert_sequence_construct(node: Node):
    items = tuple(x for x in node.inputs if x is not None)
    if not items:
        raise node.invalid("needs at least one input")
    return SeqValue(items, items[0].ttype.dtype)


@converter("SequenceEmpty")
def convert_sequence_empty(node: Node):
    code = node.attr_int("dtype", None)
    return SeqValue((), "float32" if code is None else onnx_dtype(node, code))


@converter("SequenceLength")
def convert_sequence_length(node: Node):
    return Constant(np.array(len(sequence_input(node, 0)), dtype=np.int64))


@converter("SequenceAt")
def convert_sequence_at(node: Node):
    seq = sequence_input(node, 0)
    if not len(seq):
        raise node.invalid("reads from an empty sequence")
    return seq.items[_position(node, 1, len(seq), 0)]


@converter("SequenceInsert")
def convert_sequence_insert(node: Node):
    seq = sequence_input(node, 0)
    x = node.input(1)
    pos = _position(node, 2, len(seq), len(seq), insert=True)
    return SeqValue(seq.items[:pos] + (x,) + seq.items[pos:], seq.dtype if seq.items else x.ttype.dtype)


@converter("SequenceErase")
def convert_sequence_erase(node: Node):
    seq = sequence_input(node, 0)
    if not len(seq):
        raise node.invalid("erases from an empty sequence")
    pos = _position(node, 1, len(seq), len(seq) - 1)
    return SeqValue(seq.items[:pos] + seq.items[pos + 1:], seq.dtype)


@converter("SplitToSequence")
def convert_split_to_sequence(node: Node):
    x = node.input(0)
    shape = _static_shape(node, x)
    axis = _norm_axes(node, [node.attr_int("axis", 0)], len(shape))[0]
    n = shape[axis]
    split = node.constant(1, "split", required=False)
    if split is None:
        sizes, squeeze = [1] * n, not node.attr_int("keepdims", 1)
    else:
        split = np.asarray(split)
        if split.ndim == 0:
            size = int(split)
            if size <= 0:
                raise node.invalid(f"split {size} must be positive")
            sizes = [min(size, n - i) for i in range(0, n, size)]
        else:
            sizes = [int(s) for s in split]
        squeeze = False
    if sum(sizes) != n:
        raise node.invalid(f"split sizes {sizes} do not add up to {n} (axis {axis})")
    items, start = [], 0
    for s in sizes:
        begin, end = [0] * len(shape), [None] * len(shape)
        begin[axis], end[axis] = start, start + s
        part = node.make(tf.STRIDED_SLICE, x, begin=tuple(begin), end=tuple(end), strides=(1,) * len(shape))
        if squeeze:
            part = reshape(node, part, shape[:axis] + shape[axis + 1:])
        items.append(part)
        start += s
    return SeqValue(tuple(items), x.ttype.dtype)


@converter("ConcatFromSequence")
def convert_concat_from_sequence(node: Node):
    seq = sequence_input(node, 0)
    if not len(seq):
        raise node.invalid("concatenates an empty sequence")
    new_axis = bool(node.attr_int("new_axis", 0))
    ndim = seq.items[0].ttype.ndim
    axis = _norm_axes(node, [node.attr_int("axis")], ndim + new_axis)[0]
    items = list(seq.items)
    if new_axis:
        items = [reshape(node, x, _static_shape(node, x)[:axis] + (1,) + _static_shape(node, x)[axis:]) for x in items]
    return items[0] if len(items) == 1 else node.make(tf.CONCATENATE, *items, axis=axis)
