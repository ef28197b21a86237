"""Evaluate every call whose inputs are all constants, with the op's NumPy reference. After this pass no call
has only constant inputs, except those whose result would be too large to be worth storing."""

from __future__ import annotations

import numpy as np

from kiln.ir import Call, Constant, Expr, IRModule, TensorType, TupleGetItem
from kiln.ir.interpreter import evaluate_expr
from kiln.ir.op import OpDef
from kiln.ir.visitor import rewrite_function

MAX_FOLD_ELEMENTS = 1 << 26


def fold_constants(mod: IRModule) -> IRModule:
    def fold(e: Expr) -> Expr | None:
        if isinstance(e, TupleGetItem) and isinstance(e.tuple_value, Call):
            return None
        if not isinstance(e, Call) or not isinstance(e.op, OpDef) or e.op.reference is None:
            return None
        if not e.args or not all(isinstance(a, Constant) for a in e.args):
            return None
        if not isinstance(e.type, TensorType) or not e.type.is_static or e.type.size > MAX_FOLD_ELEMENTS:
            return None
        return Constant(np.asarray(evaluate_expr(e)))

    main = rewrite_function(mod.main, fold)
    return mod if main is mod.main else mod.with_main(main)
