"""Common-subexpression elimination: calls with the same op, attrs and inputs become one node, and so do
constants with the same bytes. After this pass no two nodes in main compute the same value."""

from __future__ import annotations

from kiln.ir import Call, Constant, Expr, IRModule, Tuple, TupleGetItem
from kiln.ir.op import OpDef
from kiln.ir.structural import constant_digest
from kiln.ir.visitor import rewrite_function


def eliminate_common_subexpr(mod: IRModule) -> IRModule:
    seen: dict[tuple, Expr] = {}

    def key(e: Expr) -> tuple | None:
        if isinstance(e, Constant):
            return ("const", constant_digest(e))
        if isinstance(e, Call) and isinstance(e.op, OpDef):
            return ("call", e.op.name, e.attrs, tuple(id(a) for a in e.args))
        if isinstance(e, TupleGetItem):
            return ("item", id(e.tuple_value), e.index)
        if isinstance(e, Tuple):
            return ("tuple", tuple(id(f) for f in e.fields))
        return None

    def dedupe(e: Expr) -> Expr | None:
        k = key(e)
        if k is None:
            return None
        if k in seen:
            return seen[k]
        seen[k] = e
        return None

    main = rewrite_function(mod.main, dedupe)
    return mod if main is mod.main else mod.with_main(main)
