"""Dead-code elimination. A module's graph is what its functions reach, so an unused node cannot survive in
main; what can be dead are items of literal tuples (`(a, b).1` is just `b`) and functions nothing calls. After
this pass neither remains."""

from __future__ import annotations

from kiln.ir import Call, Expr, Function, IRModule, Tuple, TupleGetItem
from kiln.ir.visitor import post_order, rewrite_function


def eliminate_dead_code(mod: IRModule) -> IRModule:
    def drop(e: Expr) -> Expr | None:
        if isinstance(e, TupleGetItem) and isinstance(e.tuple_value, Tuple):
            return e.tuple_value.fields[e.index]
        return None

    main = rewrite_function(mod.main, drop)
    called = {id(e.op) for e in post_order(main.body) if isinstance(e, Call) and isinstance(e.op, Function)}
    functions = {name: f for name, f in mod.functions.items() if name == "main" or id(f) in called}
    functions["main"] = main
    if main is mod.main and len(functions) == len(mod.functions):
        return mod
    return IRModule(functions, mod.attrs)
