"""Fused groups built by hand for kernel tests: one op (or a few) as the primitive Function fuse_ops would make,
lowered through the template registry exactly as a model's group is (codegen/lower.py)."""

from __future__ import annotations

import numpy as np
from kiln.ir import Call, Function, TensorType, var


def tensor_type(a) -> TensorType:
    if isinstance(a, TensorType):
        return a
    if isinstance(a, np.ndarray):
        return TensorType(tuple(a.shape), str(a.dtype))
    shape, dtype = a
    return TensorType(tuple(shape), str(dtype))


def params(*args) -> list:
    """One group parameter per argument: a TensorType, an array (its type), or (shape, dtype)."""
    return [var(f"p{i}", tensor_type(a)) for i, a in enumerate(args)]


def group(ps: list, body) -> Function:
    return Function(tuple(ps), body, {"primitive": True, "name": "test_group"})


def op_group(op, args, attrs=None, variadic: bool = False) -> Function:
    """op(args...) alone as a fused group; a variadic op (concat) takes its args as one list."""
    ps = params(*args)
    attrs = attrs if attrs is not None else op.attrs_type()
    body = Call(op, tuple(ps), attrs)
    return group(ps, body)


def lower(fn: Function, target, configs=None):
    """The LoweredGroup (scheduled PrimFunc named main, steps, template, workload, config) of a group."""
    from kiln.codegen.lower import lower_group

    return lower_group(fn, "main", target, configs)


def schedule_op(op, args, attrs, target, variadic: bool = False):
    """(scheduled PrimFunc, steps) of one op as a group of one: what schedule_group(prim, target) used to give."""
    g = lower(op_group(op, args, attrs, variadic), target)
    return g.prim_func, g.schedule


def run_lowered(g, target, arrays, out_type=None):
    """Compile a LoweredGroup and run it on NumPy arrays; its output as an array."""
    import tvm

    ex = tvm.compile(tvm.IRModule({"main": g.prim_func}), target=target)
    out_type = out_type or g.out_type
    out = tvm.runtime.empty([int(d) for d in out_type.shape], str(out_type.dtype))
    ex["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays], out)
    return out.numpy()
