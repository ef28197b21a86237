"""A fused group (a primitive Function) → one TensorIR PrimFunc: TE placeholders for its params, each op's TE
compute in order, `te.create_prim_func`, then the group's schedule. TVM errors become CodegenErrors that name
the group, its ops and the target."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kiln.errors import CodegenError
from kiln.ir import Call, Constant, Function, TensorType, Tuple, TupleGetItem, Var
from kiln.ir.op import OpDef
from kiln.ir.visitor import post_order


@dataclass
class LoweredGroup:
    symbol: str
    ops: list[str]
    prim_func: object  # tvm.tirx.PrimFunc, scheduled
    schedule: str  # which schedule steps were applied, for --explain and profiles
    template: str = ""  # name@version of the template that scheduled it
    workload: str = ""  # its workload key: kernels with the same key share a config
    config: dict | None = None
    config_source: str = "default"  # "default", "given" (a tuning record or a caller's mapping), "fallback: ..."
    out_type: object = None  # the group's output TensorType


def group_ops(fn: Function) -> list[str]:
    return [e.op.name for e in post_order(fn.body) if isinstance(e, Call) and isinstance(e.op, OpDef)]


def to_te(fn: Function):
    """(placeholders, output tensor) of a primitive function."""
    from tvm import te, tirx as tir

    env: dict[int, object] = {}
    placeholders = []
    for i, p in enumerate(fn.params):
        if not isinstance(p.type, TensorType):
            raise CodegenError(f"group parameter %{p.name} is {p.type}; kernels take tensors")
        t = te.placeholder(tuple(int(d) for d in p.type.shape), p.type.dtype, name=f"p{i}")
        env[id(p)] = t
        placeholders.append(t)
    for e in post_order(fn.body):
        if id(e) in env:
            continue
        if isinstance(e, Constant):
            if e.value.ndim != 0:
                raise CodegenError("a non-scalar constant inside a group; fusion passes weights as params")
            env[id(e)] = _scalar_tensor(e, te, tir)
        elif isinstance(e, Call):
            op = e.op
            if not isinstance(op, OpDef) or op.compute is None:
                raise CodegenError(f"{e.op_name} has no compute yet (node '{e.span}')")
            args = [env[id(a)] for a in e.args]
            env[id(e)] = out = op.compute(args, e.attrs) if op.variadic else op.compute(*args, e.attrs)
            if isinstance(e.type, TensorType) and str(out.dtype) != e.type.dtype:
                # a kernel writing float32 into a planned float16 buffer would overrun it; TVM's argument check
                # only catches it at run time, for the group's output
                raise CodegenError(f"{e.op_name} (node '{e.span}'): its compute gives {out.dtype} where its type "
                                   f"says {e.type.dtype}")
        elif isinstance(e, (Tuple, TupleGetItem, Var)):
            raise CodegenError(f"{type(e).__name__} inside a fused group is not supported yet")
    return placeholders, env[id(fn.body)]


def _scalar_tensor(c: Constant, te, tir):
    value = c.value.item()
    return te.compute((), lambda: tir.const(value, c.type.dtype), name="scalar")


def lower_group(fn: Function, symbol: str, target, configs: Mapping[str, dict] | None = None) -> LoweredGroup:
    """The group as one scheduled PrimFunc named `symbol`; `configs` maps workload keys to tuned configs."""
    from tvm import te

    from kiln.schedules.dispatch import schedule_group

    ops = group_ops(fn)
    try:
        placeholders, out = to_te(fn)
        prim = te.create_prim_func([*placeholders, out]).with_attr("global_symbol", symbol)
        s = schedule_group(prim, fn, target, configs)
    except CodegenError:
        raise
    except Exception as err:  # TVM raises its own error types; name the group for the user
        raise CodegenError(f"group {symbol} ({' + '.join(ops)}) on {target.kind.name}: "
                           f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    return LoweredGroup(symbol, ops, s.prim_func, s.steps, s.template, s.workload.key, s.config, s.source,
                        fn.body.type)

