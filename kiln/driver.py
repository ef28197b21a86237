"""`kiln.compile`: ONNX model → frontend → passes → kernels → one artifact file."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

import kiln
from kiln.codegen.artifact import write_artifact
from kiln.codegen.build import build
from kiln.codegen.cuda import is_cuda, write_ptx
from kiln.codegen.target import required_cpu_features, resolve_target, toolchain
from kiln.config import Options
from kiln.frontend import from_onnx
from kiln.passes import LEVELS, fusion_summary, run
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
    mod = mod.with_attrs(layout_block=vector_lanes(target, 32) if target.kind.name == "llvm" else 0)
    mod = run(mod, LEVELS[options.opt_level], verify=options.verify, dump_dir=options.dump_dir)
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
    return CompileReport(path, len(result.groups), fusion_summary(mod), plan.planned_bytes, plan.naive_bytes,
                         t1 - t0, t2 - t1, result.lower_s, result.compile_s, t3 - t0)
