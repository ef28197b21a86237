"""Graph traversal and rewriting. Iterative, since real models are deep enough to hit Python's recursion limit.

`rewrite` rebuilds a graph bottom-up, sharing every node whose inputs did not change, and never touches the
graph it was given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .expr import Call, Expr, Function, Tuple, TupleGetItem, Var
from .module import IRModule


def children(e: Expr) -> tuple[Expr, ...]:
    if isinstance(e, Call):
        return e.args
    if isinstance(e, Tuple):
        return e.fields
    if isinstance(e, TupleGetItem):
        return (e.tuple_value,)
    return ()  # Var, Constant; a Function is a scope of its own


def post_order(root: Expr) -> list[Expr]:
    """Every node reachable from `root`, each once, inputs before their users."""
    seen: set[int] = set()
    order: list[Expr] = []
    stack: list[tuple[Expr, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for c in reversed(children(node)):
            if id(c) not in seen:
                stack.append((c, False))
    return order


def calls(root: Expr) -> Iterator[Call]:
    return (e for e in post_order(root) if isinstance(e, Call))


def free_vars(root: Expr) -> list[Var]:
    return [e for e in post_order(root) if isinstance(e, Var)]


def with_children(e: Expr, new: tuple[Expr, ...]) -> Expr:
    """A copy of `e` over new inputs; `e` itself when they are the same nodes."""
    old = children(e)
    if len(old) == len(new) and all(a is b for a, b in zip(old, new)):
        return e
    if isinstance(e, Call):
        return Call(e.op, new, e.attrs, span=e.span)
    if isinstance(e, Tuple):
        return Tuple(new)
    if isinstance(e, TupleGetItem):
        return TupleGetItem(new[0], e.index)
    raise TypeError(f"{type(e).__name__} has no inputs to replace")


Rewriter = Callable[[Expr], "Expr | None"]


def rewrite(root: Expr, fn: Rewriter, memo: dict[int, Expr] | None = None) -> Expr:
    """Rebuild `root` bottom-up; `fn(node_with_new_inputs)` returns a replacement, or None to keep it."""
    memo = {} if memo is None else memo
    for node in post_order(root):
        if id(node) in memo:
            continue
        rebuilt = with_children(node, tuple(memo[id(c)] for c in children(node)))
        out = fn(rebuilt)
        memo[id(node)] = rebuilt if out is None else out
    return memo[id(root)]


def rewrite_function(f: Function, fn: Rewriter) -> Function:
    body = rewrite(f.body, fn)
    return f if body is f.body else Function(f.params, body, f.attrs)


def rewrite_calls(mod: IRModule, fn: Callable[[Call], "Expr | None"]) -> IRModule:
    """Apply `fn` to every Call of main (inputs first); the STYLE guide's building block for passes."""
    main = rewrite_function(mod.main, lambda e: fn(e) if isinstance(e, Call) else None)
    return mod if main is mod.main else mod.with_main(main)


def count_nodes(root: Expr) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in post_order(root):
        key = e.op_name if isinstance(e, Call) else type(e).__name__
        counts[key] = counts.get(key, 0) + 1
    return counts

