"""Give every model output a kernel of its own: an output that is a model input, a constant (an If on a constant
condition, a no-op ReduceSum) or the same value as an earlier output becomes `copy(x)`, since the artifact's
outputs are buffers that kernels write. Runs after constant folding, which would fold the copy back."""

from __future__ import annotations

from kiln.ir import Call, Expr, Function, IRModule, Tuple
from kiln.ir.ops.elementwise import OPS

COPY = OPS["copy"]


def materialize_outputs(mod: IRModule) -> IRModule:
    main = mod.main
    outputs = list(main.body.fields) if isinstance(main.body, Tuple) else [main.body]
    seen: set[int] = set()
    fixed: list[Expr] = []
    for e in outputs:
        needs_kernel = not isinstance(e, Call) or id(e) in seen
        seen.add(id(e))
        fixed.append(Call(COPY, (e,), COPY.make_attrs(), "output copy") if needs_kernel else e)
    if all(a is b for a, b in zip(fixed, outputs)):
        return mod
    body = Tuple(tuple(fixed)) if isinstance(main.body, Tuple) else fixed[0]
    return mod.with_main(Function(main.params, body, main.attrs))
