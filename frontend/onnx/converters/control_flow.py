"""ONNX control flow, resolved at import: If on a known condition inlines the taken branch; Loop and Scan with a
static trip count unroll, one copy of the body per iteration. Kiln compiles static graphs, so a condition, trip
count or termination that depends on the input data is refused, naming the node.

Ops whose output shape depends on the input values (NonZero, Unique, NonMaxSuppression) are refused the same
way unless their inputs are constants, which fold.
"""

from __future__ import annotations

import numpy as np

from kiln.ir import Constant, Expr
from kiln.ir.ops import transform as tf

from ..registry import Node, converter
from .sequence import SeqValue
from .tensor import _norm_axes, _static_shape, reshape

_MAX_ITERATIONS = 4096  # unrolling more copies of a body than this is not a compile-time loop any more


def _bool_value(node: Node, v: Expr, what: str) -> bool:
    if not isinstance(v, Constant):
        raise node.unsupported(f"{what} depends on the input data; Kiln unrolls loops only when it is known "
                               f"at compile time")
    return bool(np.asarray(v.value).reshape(-1)[0])


def _stack(node: Node, items: list[Expr], axis: int = 0) -> Expr:
    """Tensors of one shape stacked along a new `axis`."""
    shape = _static_shape(node, items[0])
    axis = axis % (len(shape) + 1)
    parts = [reshape(node, x, shape[:axis] + (1,) + shape[axis:]) for x in items]
    return parts[0] if len(parts) == 1 else node.make(tf.CONCATENATE, *parts, axis=axis)


def _step(node: Node, x: Expr, axis: int, t: int) -> Expr:
    """x[t] along `axis`, with that axis dropped."""
    shape = _static_shape(node, x)
    begin, end = [0] * len(shape), [None] * len(shape)
    begin[axis], end[axis] = t, t + 1
    part = node.make(tf.STRIDED_SLICE, x, begin=tuple(begin), end=tuple(end), strides=(1,) * len(shape))
    return reshape(node, part, shape[:axis] + shape[axis + 1:])


@converter("If")
def convert_if(node: Node):
    cond = node.constant(0, "the condition of If (Kiln inlines the branch it takes)")
    branch = "then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"
    return node.run_graph(branch, [])


@converter("Loop")
def convert_loop(node: Node):
    m = node.constant(0, "the trip count of Loop (Kiln unrolls it)", required=False)
    c = node.constant(1, "the initial condition of Loop", required=False)
    trips = None if m is None else int(np.asarray(m).item())
    cond = True if c is None else bool(np.asarray(c).reshape(-1)[0])
    carried = list(node.inputs[2:])
    n_carried = len(carried)
    scans: list[list[Expr]] = []
    i = 0
    while cond and (trips is None or i < trips):
        if i >= _MAX_ITERATIONS:
            raise node.unsupported(f"more than {_MAX_ITERATIONS} iterations to unroll")
        outs = node.run_graph("body", [Constant(np.array(i, np.int64)), Constant(np.array(cond)), *carried])
        if len(outs) < 1 + n_carried:
            raise node.invalid(f"body returns {len(outs)} values; needs the condition and {n_carried} carried")
        cond_out, carried, scan_outs = outs[0], outs[1:1 + n_carried], outs[1 + n_carried:]
        if not scans:
            scans = [[] for _ in scan_outs]
        for acc, v in zip(scans, scan_outs):
            if isinstance(v, SeqValue):
                raise node.unsupported("scan outputs that are sequences")
            acc.append(v)
        cond = _bool_value(node, cond_out, "the loop condition computed by the body (data-dependent termination)")
        i += 1
    n_scan = len(node.proto.output) - n_carried
    if n_scan and i == 0:
        raise node.unsupported("scan outputs of a loop that runs zero times (their shape is unknown)")
    return list(carried) + [_stack(node, acc) for acc in scans[:n_scan]]


def _scan(node: Node, states: list, xs: list[Expr], in_axes, in_rev, out_axes, out_rev, n_out: int) -> list:
    lengths = {_static_shape(node, x)[a] for x, a in zip(xs, in_axes)}
    if len(lengths) != 1:
        raise node.invalid(f"scan inputs differ in length along their scan axes ({sorted(lengths)})")
    n = lengths.pop()
    outs: list[list[Expr]] = [[] for _ in range(n_out)]
    for t in range(n):
        steps = [_step(node, x, a, n - 1 - t if r else t) for x, a, r in zip(xs, in_axes, in_rev)]
        res = node.run_graph("body", [*states, *steps])
        states = res[:len(states)]
        for acc, v in zip(outs, res[len(states):]):
            acc.append(v)
    if n == 0 and n_out:
        raise node.unsupported("scan outputs of a Scan over zero steps (their shape is unknown)")
    stacked = []
    for acc, a, r in zip(outs, out_axes, out_rev):
        stacked.append(_stack(node, acc[::-1] if r else acc, a))
    return list(states) + stacked


@converter("Scan")
def convert_scan(node: Node):
    m = node.attr_int("num_scan_inputs")
    if node.opset < 9:
        return _scan8(node, m)
    args = list(node.inputs)
    n_state = len(args) - m
    states, xs = args[:n_state], args[n_state:]
    n_out = len(node.proto.output) - n_state
    in_axes = [_norm_axes(node, [a], x.ttype.ndim)[0] for a, x in
               zip(node.attr_ints("scan_input_axes", None) or [0] * m, xs)]
    in_rev = node.attr_ints("scan_input_directions", None) or [0] * m
    out_axes = node.attr_ints("scan_output_axes", None) or [0] * n_out
    out_rev = node.attr_ints("scan_output_directions", None) or [0] * n_out
    return _scan(node, states, xs, in_axes, in_rev, out_axes, out_rev, n_out)


def _scan8(node: Node, m: int) -> list:
    """Scan-8: a leading batch axis on every input and output, and optional per-batch sequence lengths."""
    lens = node.constant(0, "sequence_lens", required=False)
    args = list(node.inputs[1:])
    n_state = len(args) - m
    states, xs = args[:n_state], args[n_state:]
    if lens is not None and len(set(np.asarray(lens).reshape(-1).tolist())) > 1:
        raise node.unsupported("sequence_lens that differ between batch entries")
    n_out = len(node.proto.output) - n_state
    rev = node.attr_ints("directions", None) or [0] * m
    batch = _static_shape(node, (states + xs)[0])[0]
    per_batch = []
    for b in range(batch):
        s_b = [_step(node, s, 0, b) for s in states]
        x_b = [_step(node, x, 0, b) for x in xs]
        per_batch.append(_scan(node, s_b, x_b, [0] * m, rev, [0] * n_out, [0] * n_out, n_out))
    return [_stack(node, [res[k] for res in per_batch]) for k in range(n_state + n_out)]


@converter("NonZero", "Unique", "NonMaxSuppression")
def convert_data_dependent(node: Node):
    args = [x for x in node.inputs if x is not None]
    if node.op_type != "NonMaxSuppression" and all(isinstance(x, Constant) for x in args):
        return _fold_data_dependent(node, args[0].value)
    raise node.unsupported("its output shape depends on the input values (data-dependent); Kiln compiles "
                           "static shapes, so it takes this op only on constant inputs")


def _fold_data_dependent(node: Node, x: np.ndarray):
    if node.op_type == "NonZero":
        return Constant(np.array(np.nonzero(x), dtype=np.int64).reshape(x.ndim, -1))
    axis = node.attr_int("axis", None)
    sort = bool(node.attr_int("sorted", 1))
    if axis is not None:
        axis = _norm_axes(node, [axis], x.ndim)[0]
    y, first, inverse, counts = np.unique(x if axis is not None else x.reshape(-1), return_index=True,
                                          return_inverse=True, return_counts=True, axis=axis)
    if not sort:  # order of first occurrence
        order = np.argsort(first, kind="stable")
        remap = np.empty_like(order)
        remap[order] = np.arange(order.size)
        y = np.take(y, order, axis=axis or 0)
        first, counts, inverse = first[order], counts[order], remap[inverse.reshape(-1)]
    return [Constant(y), Constant(first.astype(np.int64)), Constant(inverse.reshape(-1).astype(np.int64)),
            Constant(counts.astype(np.int64))]
