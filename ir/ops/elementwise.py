"""Elementwise and broadcasting ops, one table row each: unary math, binary arithmetic, comparisons, logic.

A row gives the op name, its NumPy reference and which dtypes it accepts; the type rules are shared.
After import every row is a registered op reachable as a module attribute (`elementwise.RELU`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kiln.errors import TypeCheckError

from ..op import OpDef, OpPattern, register_op
from ..types import TensorType, broadcast_shapes, is_float, is_int

Accepts = str  # "float", "number" (float or int), "int", "bool", "any"


def _check_dtype(op: str, t: TensorType, accepts: Accepts) -> None:
    ok = {
        "float": is_float(t.dtype),
        "number": is_float(t.dtype) or is_int(t.dtype),
        "int": is_int(t.dtype),
        "bool": t.dtype == "bool",
        "any": True,
    }[accepts]
    if not ok:
        raise TypeCheckError(f"{op} takes {accepts} tensors, got {t}")


def _size(t: TensorType) -> int:
    return t.size if t.is_static else 0


@dataclass(frozen=True)
class Unary:
    name: str
    reference: Callable[[np.ndarray], np.ndarray]
    accepts: Accepts = "float"
    flops_per_element: int = 1


@dataclass(frozen=True)
class Binary:
    name: str
    reference: Callable[[np.ndarray, np.ndarray], np.ndarray]
    accepts: Accepts = "number"
    returns_bool: bool = False


def _register_unary(row: Unary) -> OpDef:
    def type_rule(x: TensorType, attrs) -> TensorType:
        _check_dtype(row.name, x, row.accepts)
        return x

    def reference(x: np.ndarray, attrs) -> np.ndarray:
        return np.asarray(row.reference(x)).astype(x.dtype, copy=False)

    return register_op(OpDef(row.name, type_rule=type_rule, reference=reference, pattern=OpPattern.ELEMWISE,
                             flops=lambda x, a: _size(x) * row.flops_per_element))


def _register_binary(row: Binary) -> OpDef:
    def type_rule(a: TensorType, b: TensorType, attrs) -> TensorType:
        _check_dtype(row.name, a, row.accepts)
        if a.dtype != b.dtype:
            raise TypeCheckError(f"{row.name}: operand dtypes differ ({a} vs {b}); insert a cast")
        shape = broadcast_shapes(a.shape, b.shape, what=row.name)
        return TensorType(shape, "bool" if row.returns_bool else a.dtype)

    def reference(a: np.ndarray, b: np.ndarray, attrs) -> np.ndarray:
        out = np.asarray(row.reference(a, b))
        return out.astype(bool if row.returns_bool else a.dtype, copy=False)

    return register_op(OpDef(row.name, type_rule=type_rule, reference=reference, pattern=OpPattern.BROADCAST,
                             flops=lambda a, b, at: _size(type_rule(a, b, at))))


UNARY = [
    Unary("nn.relu", lambda x: np.maximum(x, 0), "number"),
    Unary("negative", np.negative, "number"),
    Unary("abs", np.abs, "number"),
    Unary("exp", np.exp),
    Unary("log", np.log),
    Unary("sqrt", np.sqrt),
    Unary("sigmoid", lambda x: 1 / (1 + np.exp(-x)), flops_per_element=4),
    Unary("tanh", np.tanh, flops_per_element=4),
]

BINARY = [
    Binary("add", np.add),
    Binary("subtract", np.subtract),
    Binary("multiply", np.multiply),
    Binary("divide", lambda a, b: np.divide(a, b) if is_float(a.dtype.name) else _int_div(a, b)),
    Binary("maximum", np.maximum),
    Binary("minimum", np.minimum),
    Binary("power", np.power),
    Binary("equal", np.equal, "any", returns_bool=True),
    Binary("less", np.less, returns_bool=True),
    Binary("greater", np.greater, returns_bool=True),
]


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer division truncating toward zero, as C and ONNX do (NumPy floors)."""
    if np.any(b == 0):
        raise ZeroDivisionError("integer division by zero")
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) ^ (b < 0), -q, q)


OPS: dict[str, OpDef] = {}
for _row in UNARY:
    OPS[_row.name] = _register_unary(_row)
for _row in BINARY:
    OPS[_row.name] = _register_binary(_row)

# Handles for code that refers to these ops.
RELU, NEGATIVE, ABS, EXP, LOG, SQRT, SIGMOID, TANH = (OPS[r.name] for r in UNARY[:8])
ADD, SUBTRACT, MULTIPLY, DIVIDE, MAXIMUM, MINIMUM, POWER = (OPS[r.name] for r in BINARY[:7])
EQUAL, LESS, GREATER = (OPS[r.name] for r in BINARY[7:10])
