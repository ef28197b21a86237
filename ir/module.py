"""IRModule: named functions (one called "main") plus model-level metadata such as output names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .expr import Function


@dataclass(frozen=True, eq=False)
class IRModule:
    functions: Mapping[str, Function]
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "main" not in self.functions:
            raise ValueError("an IRModule needs a function called 'main'")
        object.__setattr__(self, "functions", MappingProxyType(dict(self.functions)))
        object.__setattr__(self, "attrs", MappingProxyType(dict(self.attrs)))

    @property
    def main(self) -> Function:
        return self.functions["main"]

    def with_main(self, fn: Function) -> IRModule:
        return IRModule({**self.functions, "main": fn}, self.attrs)

    def with_attrs(self, **attrs: Any) -> IRModule:
        return IRModule(self.functions, {**self.attrs, **attrs})

    @property
    def input_names(self) -> list[str]:
        return [p.name for p in self.main.params]

    @property
    def output_names(self) -> list[str]:
        """ONNX output names when the module came from ONNX, else output0, output1, ..."""
        names = self.attrs.get("output_names")
        if names:
            return list(names)
        from .types import TupleType

        body_ty = self.main.body.type
        n = len(body_ty.fields) if isinstance(body_ty, TupleType) else 1
        return [f"output{i}" for i in range(n)]


def module(body_or_fn, params=None, **attrs: Any) -> IRModule:
    """A one-function module: `module(fn)` or `module(body)` with the body's free vars as params."""
    from .visitor import free_vars

    fn = body_or_fn if isinstance(body_or_fn, Function) else Function(
        tuple(params) if params is not None else tuple(free_vars(body_or_fn)), body_or_fn)
    return IRModule({"main": fn}, attrs)
