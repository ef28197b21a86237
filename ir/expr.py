"""IR nodes: Var, Constant, Call, Tuple, TupleGetItem, Function.

Nodes are immutable and typed at construction: building a Call runs its op's type rule, so every node in a
graph has a known type and a shape error surfaces where the node is made, naming it. Equality and hashing
are by identity (a DAG shares nodes); `ir.structural` compares graphs by structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.errors import KilnError, TypeCheckError

from .op import OpDef
from .types import TensorType, TupleType, Type, tensor_type_of


class Expr:
    """Base of all expressions. `type` is always set."""

    type: Type

    @property
    def ttype(self) -> TensorType:
        """The type, asserted to be a tensor (most code works on tensors only)."""
        if not isinstance(self.type, TensorType):
            raise TypeCheckError(f"expected a tensor, got {self.type}")
        return self.type


@dataclass(frozen=True, eq=False)
class Var(Expr):
    name: str
    type: Type

    def __repr__(self) -> str:
        return f"Var(%{self.name}: {self.type})"


@dataclass(frozen=True, eq=False)
class Constant(Expr):
    """A tensor known at compile time. `name` keeps the initializer's name, for dumps and weight files."""

    value: np.ndarray
    name: str | None = None
    type: Type = field(init=False)

    def __post_init__(self) -> None:
        value = np.array(self.value, copy=True) if not isinstance(self.value, np.ndarray) else self.value
        if value.flags.writeable:
            value = value.copy()
            value.flags.writeable = False
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "type", tensor_type_of(value))

    def __repr__(self) -> str:
        return f"Constant({self.name or ''}: {self.type})"


@dataclass(frozen=True, eq=False)
class Call(Expr):
    """op(args..., attrs). `op` is an OpDef, or a Function for a fused group. `span` names the source node."""

    op: OpDef | Function
    args: tuple[Expr, ...]
    attrs: Any = None
    span: str | None = None
    type: Type = field(init=False)

    def __post_init__(self) -> None:
        args = tuple(self.args)
        object.__setattr__(self, "args", args)
        for i, a in enumerate(args):
            if not isinstance(a, Expr):
                raise TypeError(f"{self._where()}: argument {i} is {type(a).__name__}, not an Expr")
        if isinstance(self.op, Function):
            object.__setattr__(self, "type", _call_function_type(self.op, args, self._where()))
            return
        if self.attrs is None:
            object.__setattr__(self, "attrs", self.op.make_attrs())
        elif not isinstance(self.attrs, self.op.attrs_type):
            raise TypeError(f"{self._where()}: attrs are {type(self.attrs).__name__}, "
                            f"expected {self.op.attrs_type.__name__}")
        try:
            ty = self.op.infer_type([a.type for a in args], self.attrs)
        except TypeCheckError as err:
            raise TypeCheckError(f"{self._where()}: {err}") from None
        except KilnError:
            raise
        except (ValueError, IndexError, TypeError, ZeroDivisionError) as err:
            # A type rule tripping over nonsense input is still the input's fault; name the node.
            types = ", ".join(str(a.type) for a in args)
            raise TypeCheckError(f"{self._where()}: inputs ({types}) rejected: {err}") from None
        object.__setattr__(self, "type", ty)

    def _where(self) -> str:
        op = self.op.name if isinstance(self.op, OpDef) else "fn"
        return f"node '{self.span}' ({op})" if self.span else op

    @property
    def op_name(self) -> str:
        return self.op.name if isinstance(self.op, OpDef) else "fn"

    def __repr__(self) -> str:
        return f"Call({self.op_name}, {len(self.args)} args: {self.type})"


@dataclass(frozen=True, eq=False)
class Tuple(Expr):
    fields: tuple[Expr, ...]
    type: Type = field(init=False)

    def __post_init__(self) -> None:
        fields = tuple(self.fields)
        object.__setattr__(self, "fields", fields)
        object.__setattr__(self, "type", TupleType(tuple(f.type for f in fields)))


@dataclass(frozen=True, eq=False)
class TupleGetItem(Expr):
    tuple_value: Expr
    index: int
    type: Type = field(init=False)

    def __post_init__(self) -> None:
        ty = self.tuple_value.type
        if not isinstance(ty, TupleType):
            raise TypeCheckError(f"TupleGetItem on {ty}, which is not a tuple")
        if not 0 <= self.index < len(ty.fields):
            raise TypeCheckError(f"TupleGetItem index {self.index} out of range for {ty}")
        object.__setattr__(self, "type", ty.fields[self.index])


@dataclass(frozen=True, eq=False)
class Function(Expr):
    """A function of `params`. `attrs` marks fused groups (`{"primitive": True}`) and carries metadata."""

    params: tuple[Var, ...]
    body: Expr
    attrs: tuple[tuple[str, Any], ...] = ()
    type: Type = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(self.params))
        if isinstance(self.attrs, dict):
            object.__setattr__(self, "attrs", tuple(sorted(self.attrs.items())))
        object.__setattr__(self, "type", self.body.type)  # the return type; enough for a first-order IR

    @property
    def ret_type(self) -> Type:
        return self.body.type

    def attr(self, key: str, default: Any = None) -> Any:
        return dict(self.attrs).get(key, default)


def _call_function_type(fn: Function, args: tuple[Expr, ...], where: str) -> Type:
    if len(args) != len(fn.params):
        raise TypeCheckError(f"{where}: function takes {len(fn.params)} args, got {len(args)}")
    for p, a in zip(fn.params, args):
        if p.type != a.type:
            raise TypeCheckError(f"{where}: parameter %{p.name} is {p.type}, argument is {a.type}")
    return fn.ret_type


def call(op: OpDef, *args: Expr, span: str | None = None, **attrs: Any) -> Call:
    """Build a Call, making attrs from keywords: `call(RELU, x)`, `call(CONV2D, x, w, strides=(2, 2))`."""
    return Call(op, args, op.make_attrs(**attrs), span=span)


def const(value: Any, dtype: str | None = None, name: str | None = None) -> Constant:
    return Constant(np.asarray(value, dtype=dtype), name=name)


def var(name: str, ty: Type | str) -> Var:
    """`var("x", "f32[1, 8]")` or `var("x", TensorType((1, 8)))`."""
    return Var(name, TensorType.parse(ty) if isinstance(ty, str) else ty)
