"""Fused module → kernels → artifact: lower every group, compile them in one `tvm.compile`, and lay out the
values (inputs, outputs, storage blocks from the memory plan, constants in the weights blob) that the
runtime binds to kernel arguments."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kiln.errors import CodegenError
from kiln.ir import Call, Constant, Function, IRModule, TensorType, Tuple, Var
from kiln.ir.visitor import post_order
from kiln.runtime.artifact import EMBEDDED_FORMAT

from .lower import LoweredGroup, lower_group
from .pool import loop_gcd
from .weights import kernel_calls, layout


@dataclass
class BuildResult:
    executable: object
    meta: dict
    weights: bytes
    groups: list[LoweredGroup] = field(default_factory=list)
    lower_s: float = 0.0
    compile_s: float = 0.0


def _spec(name: str, ty) -> dict:
    if not isinstance(ty, TensorType):
        raise CodegenError(f"'{name}' has type {ty}; a kernel computes one tensor, and this group returns "
                           f"several (not supported yet)")
    if not ty.is_static:
        raise CodegenError(f"'{name}' has type {ty}; compiled models need static tensor shapes (--input-shape)")
    return {"name": name, "shape": [int(d) for d in ty.shape], "dtype": ty.dtype}


def _group_flops(fn: Function) -> int:
    from kiln.ir.op import OpDef

    return sum(e.op.count_flops([a.type for a in e.args], e.attrs) for e in post_order(fn.body)
               if isinstance(e, Call) and isinstance(e.op, OpDef))


def build(mod: IRModule, target, on_progress: Callable[[int, int], None] | None = None,
          configs: Mapping[str, dict] | None = None) -> BuildResult:
    """Every group lowered (with the config `configs` files under its workload key, else its template's
    default) and compiled in one `tvm.compile`."""
    import tvm

    plan = mod.attrs.get("memory_plan")
    if plan is None:
        raise CodegenError("the module has no memory plan; run the pass pipeline first")
    main = mod.main
    body = main.body
    out_exprs = list(body.fields) if isinstance(body, Tuple) else [body]
    values: list[dict] = []
    index_of: dict[int, int] = {}
    weights = layout(mod)  # the one walk that places constants; kiln.rebuild_weights repeats it without TVM

    def add(expr, v: dict) -> int:
        index_of[id(expr)] = len(values)
        values.append(v)
        return len(values) - 1

    for k, p in enumerate(main.params):
        add(p, {"kind": "input", "index": k, **_spec(p.name, p.type)})
    for k, (name, e) in enumerate(zip(mod.output_names, out_exprs)):
        if not isinstance(e, Call) or not isinstance(e.op, Function) or id(e) in index_of:
            raise CodegenError(f"output '{name}' is not computed by a kernel of its own (an input, a constant or "
                               f"a repeated output); not supported yet")
        add(e, {"kind": "output", "index": k, **_spec(name, e.type)})

    calls = kernel_calls(mod)
    planned = iter(plan.assignment)
    views = set(plan.views)
    steps, funcs, lowered = [], {}, []
    start = time.perf_counter()
    for i, c in enumerate(calls):
        if not isinstance(c.op, Function):
            raise CodegenError(f"{c.op_name} outside a fused group; run fuse_ops first")
        if id(c) not in index_of:
            _, block, offset = next(planned)
            add(c, {"kind": "block", "block": block, "offset": offset, **_spec(f"t{i}", c.type)})
        if i in views:  # a concat its inputs already wrote in place: no kernel
            continue
        args = []
        for a in c.args:
            if id(a) not in index_of:
                if isinstance(a, Constant):
                    add(a, {"kind": "const", "offset": weights.offsets[id(a)],
                            **_spec(a.name or f"c{len(values)}", a.type)})
                elif isinstance(a, Var):
                    raise CodegenError(f"free variable %{a.name}")
                else:
                    raise CodegenError(f"kernel input {type(a).__name__} is not supported yet")
            args.append(index_of[id(a)])
        symbol = f"kiln_k{i}"
        group = lower_group(c.op, symbol, target, configs)
        lowered.append(group)
        funcs[symbol] = group.prim_func
        steps.append({"kernel": symbol, "args": [*args, index_of[id(c)]], "ops": group.ops, "name": c.span or symbol,
                      "schedule": group.schedule, "flops": _group_flops(c.op), "template": group.template,
                      "workload": group.workload, "config": group.config or {},
                      "config_source": group.config_source, "loop_gcd": loop_gcd(group.prim_func)})
        if on_progress:
            on_progress(i + 1, len(calls) + 1)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    try:
        executable = tvm.compile(tvm.IRModule(funcs), target=target)
    except Exception as err:  # TVM's own errors: surface them as a user-facing build failure
        where = _triage(funcs, steps, target)
        if where is not None:
            raise CodegenError(f"tvm.compile failed for target {target.kind.name}: {str(err).splitlines()[0]}"
                               f"{where}") from err
        try:  # every kernel TVM refused has serial loops now
            executable = tvm.compile(tvm.IRModule(funcs), target=target)
        except Exception as err2:
            raise CodegenError(f"tvm.compile failed for target {target.kind.name}: "
                               f"{str(err2).splitlines()[0]}") from err2
    compile_s = time.perf_counter() - start
    if on_progress:
        on_progress(len(calls) + 1, len(calls) + 1)
    meta = {"magic": "kiln", "format": EMBEDDED_FORMAT, "inputs": [v for v in values if v["kind"] == "input"],
            "outputs": [v for v in values if v["kind"] == "output"], "blocks": [int(b) for b in plan.block_bytes],
            "values": values, "steps": steps, "weights_nbytes": len(weights.blob),
            "weights_crc32": weights.crc32}
    for key in ("inputs", "outputs"):
        meta[key] = [{"name": v["name"], "shape": v["shape"], "dtype": v["dtype"]} for v in meta[key]]
    return BuildResult(executable, meta, weights.blob, lowered, lower_s, compile_s)


LET_BOUND_TWICE = "Let cannot bind the same var to two different values"


def _triage(funcs: dict, steps: list[dict], target) -> str | None:
    """After the whole module failed, each kernel compiled alone. One that fails with TVM's "Let bound twice"
    gets its vector loops made serial: TVM 0.27's VectorizeLoop, when it cannot vectorize a loop (an index like
    (i // 7 + j) % 84 from an inlined reshape, a concat's select) and falls back to a scalar loop, visits the
    body's Lets a second time and fails; a serial loop is what that fallback would have produced (writing the
    Lets out instead took one fused group from 2 s to 74 s to compile). Any other failure is returned as the
    layer, ops and schedule to name in the error (None when every kernel builds now)."""
    import tvm

    for step in steps:
        symbol = step["kernel"]
        try:
            tvm.compile(tvm.IRModule({symbol: funcs[symbol]}), target=target)
            continue
        except Exception as err:  # only this one TVM bug has a way around it here
            if LET_BOUND_TWICE not in str(err):
                return (f"\n  in kernel {symbol} (layer '{step['name']}': {'+'.join(step['ops'])}, schedule "
                        f"{step['schedule'] or '-'}): {str(err).splitlines()[0]}")
        funcs[symbol] = tvm.tirx.transform.VectorizeLoop(False)(tvm.IRModule({symbol: funcs[symbol]}))[symbol]
        step["schedule"] = f"{step['schedule']}+serial(vectorizer bug)"
    return None
