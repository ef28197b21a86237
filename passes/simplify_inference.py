"""Remove what does nothing at inference time and collapse chains the frontend leaves: reshape of reshape,
transposes that cancel, reshapes and transposes to the same shape, items of literal tuples, and items of a
split, which become slices of its input (a kernel has one tensor output; a slice fuses into its consumers).
(Dropout and Identity never reach the IR: the frontend drops them.)"""

from __future__ import annotations

from kiln.ir import Call, Expr, IRModule, Tuple, TupleGetItem
from kiln.ir.ops.transform import RESHAPE, SPLIT, STRIDED_SLICE, TRANSPOSE
from kiln.ir.visitor import rewrite_function


def _simplify(e: Expr) -> Expr | None:
    if isinstance(e, TupleGetItem) and isinstance(e.tuple_value, Tuple):
        return e.tuple_value.fields[e.index]
    if isinstance(e, TupleGetItem) and isinstance(e.tuple_value, Call) and e.tuple_value.op is SPLIT:
        return _split_item(e.tuple_value, e.index)
    if isinstance(e, TupleGetItem) and isinstance(e.tuple_value, Call) and "item" in getattr(
            e.tuple_value.op, "extra", {}):  # a multi-output op's own rewrite of its items (topk)
        return e.tuple_value.op.extra["item"](e.tuple_value, e.index)
    if not isinstance(e, Call):
        return None
    x = e.args[0] if e.args else None
    if e.op is RESHAPE:
        if x.type == e.type:
            return x
        if isinstance(x, Call) and x.op is RESHAPE:
            return Call(RESHAPE, (x.args[0],), e.attrs, e.span)
    if e.op is TRANSPOSE:
        if e.attrs.axes == tuple(range(len(e.attrs.axes))):
            return x
        if isinstance(x, Call) and x.op is TRANSPOSE:
            combined = tuple(x.attrs.axes[i] for i in e.attrs.axes)
            if combined == tuple(range(len(combined))):
                return x.args[0]
            return Call(TRANSPOSE, (x.args[0],), TRANSPOSE.make_attrs(axes=combined), e.span)
    return None


def _split_item(split: Call, index: int) -> Expr:
    x, a = split.args[0], split.attrs
    axis = a.axis % x.ttype.ndim
    start = sum(a.sizes[:index])
    begin = tuple(start if i == axis else 0 for i in range(x.ttype.ndim))
    end = tuple(start + a.sizes[index] if i == axis else None for i in range(x.ttype.ndim))
    attrs = STRIDED_SLICE.make_attrs(begin=begin, end=end, strides=(1,) * x.ttype.ndim)
    return Call(STRIDED_SLICE, (x,), attrs, f"{split.span}:{index}" if split.span else None)


def simplify_inference(mod: IRModule) -> IRModule:
    main = rewrite_function(mod.main, _simplify)
    return mod if main is mod.main else mod.with_main(main)
