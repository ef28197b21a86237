"""Text form of the IR, one binding per line:  %3 = nn.conv2d(%x, @w, strides=[2, 2]) : f32[1, 64, 112, 112]

Scalar constants print inline (`1.0:f32`), others by name (`@conv1.weight`); only attrs that differ from
their defaults print. Fused groups print as nested `fn` blocks.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from .expr import Call, Constant, Expr, Function, Tuple, TupleGetItem, Var
from .module import IRModule
from .types import short_dtype
from .visitor import post_order


def format_value(v) -> str:
    if isinstance(v, enum.Enum):
        return v.name.lower()
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, np.ndarray):
        return format_value(v.tolist())
    return str(v)


def format_attrs(attrs) -> list[str]:
    if attrs is None or not dataclasses.is_dataclass(attrs):
        return []
    out = []
    for f in dataclasses.fields(attrs):
        v = getattr(attrs, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if default is dataclasses.MISSING or not _same(v, default):
            out.append(f"{f.name}={format_value(v)}")
    return out


def _same(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except ValueError:  # arrays
        return False


class _Printer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.const_names: dict[int, str] = {}
        self.used_const_names: set[str] = set()

    def const_ref(self, c: Constant) -> str:
        if c.value.ndim == 0:
            return f"{format_value(c.value.item())}:{short_dtype(c.type.dtype)}"
        if id(c) not in self.const_names:
            base = c.name or f"c{len(self.const_names)}"
            name, k = base, 1
            while name in self.used_const_names:
                name, k = f"{base}_{k}", k + 1
            self.used_const_names.add(name)
            self.const_names[id(c)] = name
        return "@" + self.const_names[id(c)]

    def function(self, fn: Function, indent: str) -> str:
        """Emit the body's bindings at `indent`; return the header text for the function."""
        names: dict[int, str] = {id(p): f"%{p.name}" for p in fn.params}
        counter = 0
        for e in post_order(fn.body):
            if id(e) in names:
                continue
            if isinstance(e, Var):
                names[id(e)] = f"%{e.name}"  # a free var: a bug the verifier reports; still printable
                continue
            if isinstance(e, Constant):
                names[id(e)] = self.const_ref(e)
                continue
            ref = lambda x: names[id(x)]  # noqa: E731
            if isinstance(e, Call):
                if isinstance(e.op, Function):
                    header = self.nested(e.op, indent)
                    text = f"{header}({', '.join(ref(a) for a in e.args)})"
                else:
                    parts = [ref(a) for a in e.args] + format_attrs(e.attrs)
                    text = f"{e.op.name}({', '.join(parts)})"
            elif isinstance(e, Tuple):
                text = "(" + ", ".join(ref(f) for f in e.fields) + ("," if len(e.fields) == 1 else "") + ")"
            elif isinstance(e, TupleGetItem):
                text = f"{ref(e.tuple_value)}.{e.index}"
            else:
                raise TypeError(type(e).__name__)
            name = f"%{counter}"
            counter += 1
            names[id(e)] = name
            self.lines.append(f"{indent}{name} = {text} : {e.type}")
        self.lines.append(f"{indent}{names[id(fn.body)]}")
        params = ", ".join(f"%{p.name}: {p.type}" for p in fn.params)
        marks = "".join(f" {k}" if v is True else f" {k}={format_value(v)}" for k, v in fn.attrs)
        return f"fn ({params}){marks}"

    def nested(self, fn: Function, indent: str) -> str:
        start = len(self.lines)
        inner = self.function(fn, indent + "  ")
        body = self.lines[start:]
        del self.lines[start:]
        # A nested block is written as one multi-line expression.
        return inner + " {\n" + "\n".join(body) + f"\n{indent}}}"


def print_ir(x: IRModule | Function | Expr, *, show_constants: bool = False) -> str:
    p = _Printer()
    fns = x.functions.items() if isinstance(x, IRModule) else [("main", x)]
    chunks = []
    for name, fn in fns:
        if not isinstance(fn, Function):
            from .visitor import free_vars

            fn = Function(tuple(free_vars(fn)), fn)
        p.lines = []
        header = p.function(fn, "  ")
        prefix = "" if name == "main" else f"def @{name} = "
        chunks.append(prefix + header + " {\n" + "\n".join(p.lines) + "\n}")
    text = "\n".join(chunks)
    if show_constants and p.const_names:
        text += "\n" + "\n".join(f"// @{n}: {c}" for c, n in _consts(x, p.const_names))
    return text


def _consts(x, names: dict[int, str]):
    roots = [f.body for f in x.functions.values()] if isinstance(x, IRModule) else [x]
    seen = {}
    for r in roots:
        for e in post_order(r):
            if isinstance(e, Constant) and id(e) in names:
                seen[id(e)] = (e.type, names[id(e)])
    return list(seen.values())
