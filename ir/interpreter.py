"""The reference interpreter: runs any Kiln IR with the ops' NumPy references. It defines "correct".

Values are freed after their last use, so a model's peak memory stays near that of a real executor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from kiln.errors import InputError, KilnError

from .expr import Call, Constant, Expr, Function, Tuple, TupleGetItem, Var
from .module import IRModule
from .types import TensorType, TupleType
from .visitor import children, post_order


def evaluate(fn: Function, args: Sequence[object]) -> object:
    """Run `fn` on already-checked values; returns an array or a tuple of values."""
    env: dict[int, object] = {id(p): a for p, a in zip(fn.params, args)}
    order = post_order(fn.body)
    last_use: dict[int, int] = {}
    for i, e in enumerate(order):
        for c in children(e):
            last_use[id(c)] = i
    for i, e in enumerate(order):
        if id(e) in env:
            continue
        if isinstance(e, Constant):
            env[id(e)] = e.value
        elif isinstance(e, Var):
            raise KilnError(f"free variable %{e.name} in the function body")
        elif isinstance(e, Call):
            vals = [env[id(a)] for a in e.args]
            if isinstance(e.op, Function):
                out = evaluate(e.op, vals)
            else:
                out = e.op.evaluate(vals, e.attrs)
            env[id(e)] = _conform(out, e)
        elif isinstance(e, Tuple):
            env[id(e)] = tuple(env[id(f)] for f in e.fields)
        elif isinstance(e, TupleGetItem):
            env[id(e)] = env[id(e.tuple_value)][e.index]
        for c in children(e):
            if last_use.get(id(c)) == i and not isinstance(c, (Var, Constant)):
                env.pop(id(c), None)
    return env[id(fn.body)]


def _conform(out: object, e: Call) -> object:
    """A reference must return exactly the type the type rule promised; anything else is a bug, caught here."""
    ty = e.type
    if isinstance(ty, TupleType):
        if not isinstance(out, (tuple, list)) or len(out) != len(ty.fields):
            raise AssertionError(f"{e.op_name}: reference returned {type(out).__name__}, type rule says {ty}")
        return tuple(_conform_tensor(o, t, e) for o, t in zip(out, ty.fields))
    return _conform_tensor(out, ty, e)


def _conform_tensor(out: object, ty, e: Call) -> np.ndarray:
    arr = np.asarray(out)
    if isinstance(ty, TensorType):
        if ty.is_static and tuple(arr.shape) != ty.shape:
            raise AssertionError(f"{e.span or e.op_name}: reference gave shape {arr.shape}, type rule {ty}")
        want = "bool" if ty.dtype == "bool" else ty.dtype
        if arr.dtype.name != want:
            arr = arr.astype(want)
    return arr


def check_inputs(fn: Function, given: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Match inputs to params by name, check dtypes and shapes, and name the field that is wrong."""
    names = [p.name for p in fn.params]
    missing = [n for n in names if n not in given]
    extra = [n for n in given if n not in names]
    if missing or extra:
        raise InputError(f"inputs {sorted(given)} do not match the model's {names}"
                         + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
    out = []
    for p in fn.params:
        v = np.asarray(given[p.name])
        ty = p.ttype
        if v.dtype.name != ty.dtype and not (ty.dtype == "string" and v.dtype.kind in "OU"):
            raise InputError(f"input '{p.name}' expects {ty}, got {v.dtype.name}; pass x.astype(np.{ty.dtype})")
        if len(v.shape) != len(ty.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(ty.shape, v.shape)):
            raise InputError(f"input '{p.name}' expects {ty}, got shape {list(v.shape)}")
        out.append(v)
    return out


def run_module(mod: IRModule, *args: np.ndarray, **kwargs: np.ndarray) -> list[np.ndarray]:
    """Interpret `main` on inputs given positionally or by name; returns the list of outputs."""
    names = mod.input_names
    if len(args) > len(names):
        raise InputError(f"model takes {len(names)} inputs {names}, got {len(args)} positional")
    given = dict(zip(names, args))
    for k, v in kwargs.items():
        if k in given:
            raise InputError(f"input '{k}' given twice, positionally and by name")
        given[k] = v
    out = evaluate(mod.main, check_inputs(mod.main, given))
    return list(out) if isinstance(mod.main.body.type, TupleType) else [out]


def evaluate_expr(e: Expr) -> object:
    """Evaluate an expression with no free vars (constant folding uses this)."""
    return evaluate(Function((), e), [])
