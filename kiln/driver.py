"""`kiln.compile`: ONNX model → frontend → passes → kernels → one artifact file."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

import kiln
from kiln.codegen.artifact import write_artifact
from kiln.codegen.build import build
from kiln.codegen.cuda import is_cuda, write_ptx
from kiln.codegen.target import required_cpu_features, resolve_target, toolchain
from kiln.config import Options
from kiln.frontend import from_onnx
from kiln.autotune.measure import measure_candidates
from kiln.ir import Call, IRModule
from kiln.ir.ops.conv import CONV2D
from kiln.ir.visitor import post_order
from kiln.passes import LEVELS, alter_layout, count_layout_transforms, fusion_summary, run
from kiln.schedules.choose import Choice, ConvWorkload, choose
from kiln.schedules.target_info import vector_lanes


@dataclass
class CompileReport:
    path: Path
    kernels: int
    fusion: str
    planned_bytes: int
    naive_bytes: int
    import_s: float
    passes_s: float
    lower_s: float
    build_s: float
    total_s: float
    conv_choices: list = field(default_factory=list)  # (span, schedules.choose.Choice) per conv
    layout_transforms: int = 0
    schedules: list = field(default_factory=list)  # the schedule each kernel got


def compile(model: str | os.PathLike | onnx.ModelProto, output: str | os.PathLike, options: Options | None = None,
            on_progress: Callable[[int, int], None] | None = None) -> CompileReport:
    """Compile an ONNX model into one shared library.

    >>> report = kiln.compile("model.onnx", "model.so")  # doctest: +SKIP
    >>> kiln.load(report.path).run(x)  # doctest: +SKIP
    """
    options = options or Options()
    t0 = time.perf_counter()
    mod = from_onnx(model, input_shapes=options.input_shapes)
    t1 = time.perf_counter()
    target = resolve_target(options.target)
    # target facts the passes need travel as module attrs, so passes stay functions of the IR alone
    cpu = target.kind.name == "llvm"
    mod = mod.with_attrs(layout_block=vector_lanes(target, 32) if cpu else 0,
                         fuse_depthwise=cpu and options.fuse_depthwise)
    passes = LEVELS[options.opt_level]
    split = passes.index(alter_layout) if alter_layout in passes else len(passes)
    mod = run(mod, passes[:split], verify=options.verify, dump_dir=options.dump_dir)
    choices = choose_conv_algorithms(mod, target, options.measure) if split < len(passes) else []
    mod = mod.with_attrs(conv_algorithms={span: c.algorithm for span, c in choices})
    mod = run(mod, passes[split:], verify=options.verify, dump_dir=options.dump_dir, first=split + 1)
    t2 = time.perf_counter()
    cc, fcompile = toolchain(target)  # a cross gcc for another architecture (aarch64); checked before building
    result = build(mod, target, on_progress)
    result.meta.update({"kiln": kiln.__version__, "target": json.loads(str(target)),
                        "cpu": str(target.attrs.get("mcpu", "generic")),
                        "cpu_features": required_cpu_features(target), "model": str(mod.attrs.get("name", "model"))})
    if is_cuda(target):  # kernels compiled to PTX by nvcc now, so a bad kernel fails here; written beside
        write_ptx(Path(output), result.executable, target)
    path = write_artifact(Path(output), result.executable, result.meta, result.weights, cc=cc, fcompile=fcompile)
    t3 = time.perf_counter()
    plan = mod.attrs["memory_plan"]
    fusion = fusion_summary(mod)
    if plan.views:
        fusion += f"\n  ({len(plan.views)} concatenate written in place by their inputs: no kernel)"
    return CompileReport(path, len(result.groups), fusion, plan.planned_bytes, plan.naive_bytes,
                         t1 - t0, t2 - t1, result.lower_s, result.compile_s, t3 - t0, choices,
                         count_layout_transforms(mod), [s["schedule"] for s in result.meta["steps"]])


def choose_conv_algorithms(mod: IRModule, target, measure: bool = False) -> list[tuple[str, Choice]]:
    """(span, choice) for every 2-D conv of `mod`, in graph order: the cost model's pick, or with `measure` the
    fastest candidate timed here (once per distinct shape)."""
    if target.kind.name != "llvm":
        return []
    lanes = vector_lanes(target, 32)
    cores = len(os.sched_getaffinity(0))
    timed: dict[ConvWorkload, dict[str, float]] = {}
    out = []
    for e in post_order(mod.main.body):
        if not (isinstance(e, Call) and e.op is CONV2D and e.span and e.args[0].ttype.is_static):
            continue
        x, w, a = e.args[0].ttype.shape, e.args[1].ttype.shape, e.attrs
        wl = ConvWorkload(x[0], x[1], x[2], x[3], w[0], w[2], w[3], tuple(a.strides), tuple(a.padding),
                          tuple(a.dilation), a.groups)
        choice = choose(wl, lanes, cores)
        if measure and len(choice.estimates_ms) > 1:
            if wl not in timed:
                timed[wl] = measure_candidates(wl, list(choice.estimates_ms), target, lanes)
            choice = Choice(wl, min(timed[wl], key=timed[wl].get), choice.estimates_ms, timed[wl])
        out.append((e.span, choice))
    return out
