"""Kiln IR: a typed, immutable graph IR in the spirit of Relay, with an op registry and a NumPy interpreter."""

from . import ops  # noqa: F401  (registers every op)
from .expr import Call, Constant, Expr, Function, Tuple, TupleGetItem, Var, call, const, var
from .interpreter import evaluate, evaluate_expr, run_module
from .module import IRModule, module
from .op import NoAttrs, OpDef, OpPattern, all_ops, get_op, register_op
from .printer import print_ir
from .structural import structural_equal, structural_hash
from .types import Dim, TensorType, TupleType, Type, broadcast_shapes
from .verify import VerifyError, verify_module
from .visitor import calls, post_order, rewrite, rewrite_calls

__all__ = [
    "Call", "Constant", "Expr", "Function", "Tuple", "TupleGetItem", "Var", "call", "const", "var",
    "evaluate", "evaluate_expr", "run_module", "IRModule", "module", "NoAttrs", "OpDef", "OpPattern",
    "all_ops", "get_op", "register_op", "print_ir", "structural_equal", "structural_hash", "Dim",
    "TensorType", "TupleType", "Type", "broadcast_shapes", "VerifyError", "verify_module", "calls",
    "post_order", "rewrite", "rewrite_calls",
]
