"""The op registry: each op declared once, with everything passes, the interpreter and codegen need.

An op file calls `register_op(OpDef(...))` and keeps the handle it returns; code compares handles
(`call.op is DENSE`), never name strings.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import TypeCheckError


class OpPattern(enum.IntEnum):
    """Fusion pattern kinds, ordered as in TVM's FuseOps: a lower kind fuses more freely."""

    ELEMWISE = 0  # out[i] = f(in[i]), same shapes
    BROADCAST = 1  # out[i] = f(in[g(i)]) with g a broadcast
    INJECTIVE = 2  # each output element reads a fixed set of inputs (reshape, transpose, gather)
    COMM_REDUCE = 3  # reductions; fuse injective inputs
    OUT_ELEMWISE_FUSABLE = 4  # conv2d, dense: absorb elementwise ops after them
    TUPLE = 7
    OPAQUE = 8  # never fused


@dataclass(frozen=True)
class NoAttrs:
    """The attrs of ops that take none."""


@dataclass(frozen=True, eq=False)
class OpDef:
    """One op. `type_rule(*arg_types, attrs) -> Type`; `reference(*arrays, attrs) -> array | tuple`.

    `variadic` ops (concat, sum) receive their args as one list: `type_rule(types, attrs)`.
    `compute(*te_tensors, attrs) -> te.Tensor` is filled in by codegen-facing op files; None means
    "not compilable yet". `flops(*arg_types, attrs) -> int` counts multiply-adds as two.
    """

    name: str
    attrs_type: type = NoAttrs
    type_rule: Callable[..., Any] | None = None
    reference: Callable[..., Any] | None = None
    pattern: OpPattern = OpPattern.OPAQUE
    compute: Callable[..., Any] | None = None
    flops: Callable[..., int] | None = None
    variadic: bool = False
    num_outputs: int = 1  # >1: the call's type is a TupleType
    doc: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # per-op hooks for later stages (layout rules, ...)

    def __repr__(self) -> str:
        return f"Op({self.name})"

    def __reduce__(self):
        # pickled by name, unpickled as the registered handle, so `call.op is DENSE` holds in a worker process
        return (get_op, (self.name,))

    def make_attrs(self, **kwargs: Any) -> Any:
        try:
            attrs = self.attrs_type(**kwargs)
        except TypeError as err:
            names = [f.name for f in dataclasses.fields(self.attrs_type)]
            raise TypeCheckError(f"{self.name}: bad attributes {sorted(kwargs)}; it takes {names}") from err
        return attrs

    def infer_type(self, arg_types: list, attrs: Any):
        if self.type_rule is None:
            raise TypeCheckError(f"{self.name} has no type rule")
        return self.type_rule(arg_types, attrs) if self.variadic else self.type_rule(*arg_types, attrs)

    def evaluate(self, args: list, attrs: Any):
        if self.reference is None:
            raise NotImplementedError(f"{self.name} has no NumPy reference")
        return self.reference(args, attrs) if self.variadic else self.reference(*args, attrs)

    def count_flops(self, arg_types: list, attrs: Any) -> int:
        if self.flops is None:
            return 0
        return int(self.flops(arg_types, attrs) if self.variadic else self.flops(*arg_types, attrs))


_REGISTRY: dict[str, OpDef] = {}


def register_op(op: OpDef) -> OpDef:
    if op.name in _REGISTRY:
        raise ValueError(f"op {op.name!r} registered twice")
    if not (dataclasses.is_dataclass(op.attrs_type) and op.attrs_type.__dataclass_params__.frozen):
        raise TypeError(f"{op.name}: attrs must be a frozen dataclass (hashable, for CSE)")
    _REGISTRY[op.name] = op
    return op


def define_compute(op: OpDef):
    """Attach the TE compute of an op, written in the op's own file right below its registration:

        @define_compute(CONV2D)
        def conv2d_compute(x, w, attrs): ...

    TVM is imported inside computes only, so the IR and frontend load without the compiler.
    """

    def attach(fn):
        if op.compute is not None:
            raise ValueError(f"{op.name} has two computes")
        object.__setattr__(op, "compute", fn)
        return fn

    return attach


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no op named {name!r}") from None


def all_ops() -> list[OpDef]:
    return sorted(_REGISTRY.values(), key=lambda op: op.name)
