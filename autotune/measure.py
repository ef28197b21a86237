"""Local measurement: build one conv workload the way a model's kernel is built (alter_layout with the given
algorithm, fusion, the group's schedule) and time it on this machine. `kiln compile --measure` uses it to pick
each conv's algorithm; bench/conv_layers.py to print GFLOPS per algorithm."""

from __future__ import annotations

import os

import numpy as np
from kiln.codegen.lower import lower_group
from kiln.ir import Call, Function, IRModule, call, const, var
from kiln.ir.ops.conv import CONV2D
from kiln.ir.ops.elementwise import ADD, RELU
from kiln.ir.visitor import post_order
from kiln.passes import alter_layout, fuse_ops
from kiln.schedules.choose import ConvWorkload

COLD_FLUSH_BYTES = 64 << 20  # more than the L2 of every core and most L3s


def conv_module(wl: ConvWorkload, algorithm: str, layout_block: int, seed: int = 0) -> IRModule:
    """conv + bias + relu of the workload's shape, with random weights, laid out for `algorithm`."""
    rng = np.random.default_rng(seed)
    x = var("x", f"f32[{wl.n}, {wl.c}, {wl.h}, {wl.w}]")
    w = const((rng.standard_normal((wl.oc, wl.c // wl.groups, wl.kh, wl.kw)) * 0.1).astype(np.float32))
    y = Call(
        CONV2D,
        (x, w),
        CONV2D.make_attrs(strides=wl.strides, padding=wl.padding, dilation=wl.dilation, groups=wl.groups),
        span="conv",
    )
    y = call(RELU, call(ADD, y, const(rng.standard_normal((wl.oc, 1, 1)).astype(np.float32))))
    mod = IRModule(
        {"main": Function((x,), y)},
        attrs={"layout_block": layout_block, "conv_algorithms": {"conv": algorithm}},
    )
    return fuse_ops(alter_layout(mod))


def conv_group(mod: IRModule) -> Call:
    """The fused group holding the conv (the others are layout transforms)."""
    groups = [e for e in post_order(mod.main.body) if isinstance(e, Call) and isinstance(e.op, Function)]
    return max(
        groups,
        key=lambda g: sum(1 for e in post_order(g.op.body) if isinstance(e, Call) and "conv" in e.op_name),
    )


def _built_conv(wl: ConvWorkload, algorithm: str, target, layout_block: int, configs: dict | None):
    """(compiled module, its arguments on the CPU, the lowered group) of the conv's kernel alone."""
    # TVM sizes its pool at the first parallel kernel, to half the CPUs unless told; time with all of them, as
    # the runtime runs models (runtime/model.py)
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    import tvm

    group = conv_group(conv_module(wl, algorithm, layout_block))
    lowered = lower_group(group.op, "conv", target, configs)
    lib = tvm.compile(tvm.IRModule({"conv": lowered.prim_func}), target=target)
    dev = tvm.cpu()
    rng = np.random.default_rng(1)
    args = [
        tvm.runtime.tensor(rng.standard_normal(a.ttype.shape).astype(a.ttype.dtype), dev) for a in group.args
    ]
    args.append(tvm.runtime.empty(group.ttype.shape, group.ttype.dtype, dev))
    return lib, args, lowered


def time_conv(
    wl: ConvWorkload, algorithm: str, target, layout_block: int, min_ms: float = 60.0, cold: bool = False,
    configs: dict | None = None,
) -> tuple[float, str]:
    """Median milliseconds of the conv's kernel alone, and the schedule it got; `cold` flushes the caches
    before each call, as a model run sees them; `configs` (workload key -> config) as kiln.compile takes them."""
    lib, args, lowered = _built_conv(wl, algorithm, target, layout_block, configs)
    dev = args[0].device
    if cold:  # in a model, each conv's weights arrive cold: evict them before every timed call
        timer = lib.jit().time_evaluator("conv", dev, number=1, repeat=15, cache_flush_bytes=COLD_FLUSH_BYTES)
    else:
        timer = lib.jit().time_evaluator("conv", dev, number=1, repeat=5, min_repeat_ms=int(min_ms))
    return float(np.median(timer(*args).results)) * 1e3, lowered.schedule


def conv_kernel(wl: ConvWorkload, algorithm: str, target, layout_block: int, configs: dict | None = None):
    """(a callable running the conv's kernel once on fixed random inputs, the lowered group it runs): for timing
    it in blocks interleaved with another engine's (kiln.runtime.timing.interleaved_ms), which a shared
    machine's drift cannot bias."""
    lib, args, lowered = _built_conv(wl, algorithm, target, layout_block, configs)
    fn = lib.jit()["conv"]
    return (lambda: fn(*args)), lowered


def measure_candidates(
    wl: ConvWorkload, algorithms: list[str], target, layout_block: int
) -> dict[str, float]:
    return {a: time_conv(wl, a, target, layout_block, cold=True)[0] for a in algorithms}
