"""What a template sees of a fused group, and the workload it makes of it: the key that kernels sharing one
schedule share, that tuning records are filed under, and that configs passed to `kiln.compile` are looked up by.

A `Group` is a view of a primitive Function (its op calls in order, its anchor); templates match on its ops
and attrs. A `Workload` is hashable and JSON round-trippable: op kinds, shapes, dtypes, the named dimensions
the template's space and default read (`wl["out_w"]`), and the template's name@version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from kiln.ir import Call, Function, TensorType
from kiln.ir.op import OpDef, OpPattern
from kiln.ir.visitor import post_order

Shape = tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Group:
    """A fused group as templates match it: `calls` in evaluation order, `anchor` the last conv/dense-like call
    (the one producing the output when a depthwise conv is fused into the 1x1 after it)."""

    fn: Function

    @cached_property
    def calls(self) -> tuple[Call, ...]:
        return tuple(e for e in post_order(self.fn.body) if isinstance(e, Call) and isinstance(e.op, OpDef))

    @cached_property
    def ops(self) -> tuple[str, ...]:
        return tuple(c.op.name for c in self.calls)

    @property
    def anchor(self) -> Call | None:
        anchors = [c for c in self.calls if c.op.pattern == OpPattern.OUT_ELEMWISE_FUSABLE]
        return anchors[-1] if anchors else None

    def anchored_by(self, op: OpDef) -> bool:
        """The group is `op` with injective producers (inlined into its input) and elementwise epilogues of its
        output's shape (computed per tile): what the direct-conv style templates take."""
        a = self.anchor
        if a is None or a.op is not op or self.output[0] != tuple(int(d) for d in a.type.shape):
            return False
        at = self.calls.index(a)
        return (all(c.op.pattern <= OpPattern.INJECTIVE for c in self.calls[:at])
                and all(c.op.pattern <= OpPattern.BROADCAST for c in self.calls[at + 1:]))

    def find(self, *ops: OpDef) -> list[Call]:
        return [c for c in self.calls if c.op in ops]

    def has(self, *ops: OpDef) -> bool:
        return any(c.op in ops for c in self.calls)

    @property
    def inputs(self) -> tuple[tuple[Shape, str], ...]:
        return tuple(_tensor(p.type) for p in self.fn.params)

    @property
    def output(self) -> tuple[Shape, str]:
        return _tensor(self.fn.body.type)


@dataclass(frozen=True)
class Workload:
    """`template` is name@version; `dims` the named values (ints, bools, strings, tuples of them) the template's
    space, default and schedule read; `ops`, `inputs` and `output` what else makes two kernels the same."""

    template: str
    ops: tuple[str, ...]
    inputs: tuple[tuple[Shape, str], ...]
    output: tuple[Shape, str]
    dims: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, template: str, group: Group, ops: tuple[str, ...] | None = None,
           inputs: tuple[tuple[Shape, str], ...] | None = None, **dims: Any) -> Workload:
        """The usual workload of a group: its ops, its params' and output's shapes and dtypes, plus `dims`."""
        return cls(template, group.ops if ops is None else ops, group.inputs if inputs is None else inputs,
                   group.output, tuple(sorted((k, _frozen(v)) for k, v in dims.items())))

    def __getitem__(self, name: str) -> Any:
        for k, v in self.dims:
            if k == name:
                return v
        raise KeyError(f"workload of {self.template} has no dim {name!r} (has {[k for k, _ in self.dims]})")

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    @property
    def template_name(self) -> str:
        return self.template.rsplit("@", 1)[0]

    @property
    def template_version(self) -> int:
        return int(self.template.rsplit("@", 1)[1])

    def to_json(self) -> dict:
        return {"template": self.template, "ops": list(self.ops),
                "inputs": [[list(s), d] for s, d in self.inputs], "output": [list(self.output[0]), self.output[1]],
                "dims": {k: _thawed(v) for k, v in self.dims}}

    @classmethod
    def from_json(cls, d: Mapping) -> Workload:
        return cls(str(d["template"]), tuple(str(o) for o in d["ops"]),
                   tuple((tuple(int(x) for x in s), str(t)) for s, t in d["inputs"]),
                   (tuple(int(x) for x in d["output"][0]), str(d["output"][1])),
                   tuple(sorted((str(k), _frozen(v)) for k, v in d.get("dims", {}).items())))

    @cached_property
    def key(self) -> str:
        """name@version:hash, stable across processes and machines (sha1 of the canonical JSON)."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return f"{self.template}:{hashlib.sha1(text.encode()).hexdigest()[:16]}"

    def summary(self) -> str:
        """One line for people: the template and its dims."""
        dims = " ".join(f"{k}={_short(v)}" for k, v in self.dims)
        return f"{self.template} {dims}".strip()


def _tensor(t) -> tuple[Shape, str]:
    if not isinstance(t, TensorType):
        return ((), str(t))
    return tuple(int(d) for d in t.shape), str(t.dtype)


def _frozen(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, float):
        return v
    raise TypeError(f"workload dim {v!r} is not JSON (int, bool, str, float, or a list of them)")


def _thawed(v: Any) -> Any:
    return [_thawed(x) for x in v] if isinstance(v, tuple) else v


def _short(v: Any) -> str:
    return "x".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
