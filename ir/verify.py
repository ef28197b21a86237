"""Verifier: the invariants every pass must keep. `run` calls it after each pass, naming the pass that broke it."""

from __future__ import annotations

from kiln.errors import KilnError

from .expr import Call, Function, Var
from .module import IRModule
from .op import OpDef
from .visitor import post_order


class VerifyError(KilnError):
    """The IR broke an invariant (a free var, a stale type): a bug in the pass named in the message."""


def verify_function(fn: Function, where: str = "") -> None:
    params = {id(p) for p in fn.params}
    names = [p.name for p in fn.params]
    if len(set(names)) != len(names):
        raise VerifyError(f"{where}duplicate parameter names {names}")
    for e in post_order(fn.body):
        if isinstance(e, Var) and id(e) not in params:
            raise VerifyError(f"{where}free variable %{e.name}: {e.type}")
        if isinstance(e, Call):
            if isinstance(e.op, Function):
                verify_function(e.op, where)
                continue
            # Types are computed at construction; re-running the rule catches a node whose inputs were
            # swapped behind its back (object.__setattr__ in a pass).
            ty = e.op.infer_type([a.type for a in e.args], e.attrs)
            if ty != e.type:
                raise VerifyError(f"{where}{e.span or e.op_name}: stored type {e.type} but rule gives {ty}")
            if not isinstance(e.op, OpDef):
                raise VerifyError(f"{where}call of {type(e.op).__name__}")


def verify_module(mod: IRModule, after: str | None = None) -> None:
    where = f"after pass {after}: " if after else ""
    for name, fn in mod.functions.items():
        verify_function(fn, f"{where}@{name}: ")

