"""The converter table and the view of one ONNX node that converters work with.

A converter is `fn(node: Node) -> Expr | list[Expr]`, registered for one or more ONNX op types with
`@converter("Relu")`. It reads attributes through `node.attr_*`, which check the attribute's type and name
the node when it is wrong, and builds calls through `node.make(...)`, which folds constant inputs at once
(so shape subgraphs such as Shape→Gather→Concat→Reshape become constants when shapes are static).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from kiln.errors import ModelError, NeedsConstantError, UnsupportedError
from kiln.ir import Call, Constant, Expr, OpDef, TensorType
from kiln.ir.interpreter import evaluate_expr
from kiln.ir.visitor import free_vars

Converter = Callable[["Node"], "Expr | list[Expr | None] | tuple"]
CONVERTERS: dict[tuple[str, str], Converter] = {}  # (domain, op_type) → converter

DEFAULT_DOMAIN = ""
_FOLD_LIMIT_ELEMENTS = 1 << 26  # larger constant results stay as calls rather than bloat the model


def converter(*op_types: str, domain: str = DEFAULT_DOMAIN) -> Callable[[Converter], Converter]:
    def register(fn: Converter) -> Converter:
        for t in op_types:
            key = (domain, t)
            if key in CONVERTERS:
                raise ValueError(f"ONNX op {t} has two converters")
            CONVERTERS[key] = fn
        return fn

    return register


_ATTR_KINDS = {
    "int": onnx.AttributeProto.INT,
    "ints": onnx.AttributeProto.INTS,
    "float": onnx.AttributeProto.FLOAT,
    "floats": onnx.AttributeProto.FLOATS,
    "string": onnx.AttributeProto.STRING,
    "strings": onnx.AttributeProto.STRINGS,
    "tensor": onnx.AttributeProto.TENSOR,
    "graph": onnx.AttributeProto.GRAPH,
}
_MISSING = object()


class Node:
    """One ONNX node during import: its proto, converted inputs (None where omitted) and the opset in force."""

    def __init__(self, proto: onnx.NodeProto, inputs: list[Expr | None], opset: int, index: int):
        self.proto = proto
        self.inputs = inputs
        self.opset = opset
        self.op_type = proto.op_type
        self.name = proto.name or f"{proto.op_type}_{index}"
        self._attrs = {a.name: a for a in proto.attribute}

    def __repr__(self) -> str:
        return f"node '{self.name}' ({self.op_type})"

    # --- errors -----------------------------------------------------------------------------------------
    def unsupported(self, what: str) -> UnsupportedError:
        return UnsupportedError(f"{self}: {what} (opset {self.opset})")

    def invalid(self, what: str) -> ModelError:
        return ModelError(f"{self}: {what}")

    # --- inputs -----------------------------------------------------------------------------------------
    def input(self, i: int, required: bool = True) -> Expr | None:
        x = self.inputs[i] if i < len(self.inputs) else None
        if x is None and required:
            raise self.invalid(f"input {i} is required but missing")
        return x

    def constant(self, i: int, what: str, required: bool = True) -> np.ndarray | None:
        """The value of input `i`, which Kiln must know at compile time (a shape, axes, pads...)."""
        x = self.input(i, required)
        if x is None:
            return None
        if isinstance(x, Constant):
            return x.value
        upstream = sorted({v.name for v in free_vars(x)})
        raise NeedsConstantError(
            f"{self}: {what} (input {i}, '{self.proto.input[i]}') must be known at compile time, but it is "
            f"computed from graph input(s) {upstream}; bind them to values or fix their shapes "
            f"(--input-shape)", upstream)

    # --- attributes -------------------------------------------------------------------------------------
    def has_attr(self, name: str) -> bool:
        return name in self._attrs

    def _attr(self, name: str, kind: str, default: Any) -> Any:
        a = self._attrs.get(name)
        if a is None:
            if default is _MISSING:
                raise self.invalid(f"attribute '{name}' is required")
            return default
        want = _ATTR_KINDS[kind]
        if a.type != want:
            got = onnx.AttributeProto.AttributeType.Name(a.type)
            raise self.invalid(f"attribute '{name}' must be {onnx.AttributeProto.AttributeType.Name(want)}, "
                               f"got {got}")
        return onnx.helper.get_attribute_value(a)

    def attr_int(self, name: str, default: Any = _MISSING) -> int:
        v = self._attr(name, "int", default)
        return v if v is None else int(v)

    def attr_ints(self, name: str, default: Any = _MISSING) -> tuple[int, ...] | None:
        v = self._attr(name, "ints", default)
        return v if v is None else tuple(int(i) for i in v)

    def attr_float(self, name: str, default: Any = _MISSING) -> float:
        v = self._attr(name, "float", default)
        return v if v is None else float(v)

    def attr_floats(self, name: str, default: Any = _MISSING) -> tuple[float, ...] | None:
        v = self._attr(name, "floats", default)
        return v if v is None else tuple(float(f) for f in v)

    def attr_string(self, name: str, default: Any = _MISSING) -> str:
        v = self._attr(name, "string", default)
        return v.decode() if isinstance(v, bytes) else v

    def attr_strings(self, name: str, default: Any = _MISSING) -> tuple[str, ...] | None:
        v = self._attr(name, "strings", default)
        return v if v is None else tuple(s.decode() if isinstance(s, bytes) else s for s in v)

    def attr_tensor(self, name: str, default: Any = _MISSING) -> np.ndarray | None:
        v = self._attr(name, "tensor", default)
        return v if v is None or isinstance(v, np.ndarray) else numpy_helper.to_array(v)

    # --- building ---------------------------------------------------------------------------------------
    def make(self, op: OpDef, *args: Expr, **attrs: Any) -> Expr:
        """A call of `op`, spanned with this node's name; folded to a Constant when every input is one."""
        c = Call(op, args, op.make_attrs(**attrs), span=self.name)
        return fold(c)


def fold(c: Call) -> Expr:
    if not all(isinstance(a, Constant) for a in c.args) or not isinstance(c.op, OpDef):
        return c
    if c.op.reference is None or c.op.extra.get("no_fold"):
        return c
    ty = c.type
    if not isinstance(ty, TensorType) or not ty.is_static or ty.size > _FOLD_LIMIT_ELEMENTS:
        return c
    value = evaluate_expr(c)
    return Constant(np.asarray(value), name=None)

