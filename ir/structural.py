"""Structural equality and hashing: two graphs are equal when they compute the same thing the same way.

Vars match by position (a bijection built as the walk meets them), constants by dtype, shape and bytes, calls
by op handle, attrs and inputs. CSE keys calls by these rules; tests compare a pass's output to a graph built
by hand.
"""

from __future__ import annotations

import hashlib

from .expr import Call, Constant, Expr, Function, Tuple, TupleGetItem, Var
from .visitor import children, post_order


def constant_digest(c: Constant) -> str:
    v = c.value
    return hashlib.blake2b(v.tobytes() + str((v.dtype.str, v.shape)).encode(), digest_size=12).hexdigest()


def _local_key(e: Expr):
    if isinstance(e, Var):
        return ("var", e.type)
    if isinstance(e, Constant):
        return ("const", constant_digest(e))
    if isinstance(e, Call):
        op = ("fn", structural_hash(e.op)) if isinstance(e.op, Function) else e.op.name
        return ("call", op, e.attrs)
    if isinstance(e, Tuple):
        return ("tuple", len(e.fields))
    if isinstance(e, TupleGetItem):
        return ("item", e.index)
    if isinstance(e, Function):
        return ("fn", tuple(p.type for p in e.params), e.attrs)
    raise TypeError(type(e).__name__)


def structural_hash(root: Expr) -> int:
    hashes: dict[int, int] = {}
    for e in post_order(root):
        kids = tuple(hashes[id(c)] for c in children(e))
        if isinstance(e, Function):
            kids = (structural_hash(e.body),)
        hashes[id(e)] = hash((_local_key(e), kids))
    return hashes[id(root)]


def structural_equal(a: Expr, b: Expr) -> bool:
    var_map: dict[int, int] = {}
    back: dict[int, int] = {}
    done: set[tuple[int, int]] = set()
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if (id(x), id(y)) in done or (x is y and not isinstance(x, (Var, Function))):
            continue
        done.add((id(x), id(y)))
        if type(x) is not type(y):
            return False
        if isinstance(x, Var):
            if x.type != y.type or var_map.setdefault(id(x), id(y)) != id(y) or back.setdefault(id(y), id(x)) != id(x):
                return False
            continue
        if isinstance(x, Function):
            if len(x.params) != len(y.params) or x.attrs != y.attrs:
                return False
            for p, q in zip(x.params, y.params):  # bind params first, so the body's vars meet a mapping
                if p.type != q.type or var_map.setdefault(id(p), id(q)) != id(q) \
                        or back.setdefault(id(q), id(p)) != id(p):
                    return False
            stack.append((x.body, y.body))
            continue
        if isinstance(x, Call):
            if isinstance(x.op, Function) != isinstance(y.op, Function):
                return False
            if isinstance(x.op, Function):
                if not structural_equal(x.op, y.op):
                    return False
            elif x.op is not y.op or x.attrs != y.attrs:
                return False
        if isinstance(x, Constant):
            if constant_digest(x) != constant_digest(y):
                return False
            continue
        if _local_key(x) != _local_key(y) and not isinstance(x, Call):
            return False
        kx, ky = children(x), children(y)
        if len(kx) != len(ky):
            return False
        stack.extend(zip(kx, ky))
    return True
