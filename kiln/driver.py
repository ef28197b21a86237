"""`kiln.compile`: ONNX model → frontend → passes → kernels → one artifact file."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx

import kiln
import kiln.tuning_logs
from kiln.autotune.measure import measure_candidates
from kiln.autotune.tasks import Task, extract_tasks
from kiln.codegen.artifact import write_artifact
from kiln.codegen.build import build
from kiln.codegen.cuda import compile_device_code, is_cuda, write_ptx
from kiln.codegen.target import required_cpu_features, resolve_target, toolchain
from kiln.config import Options
from kiln.errors import KilnError
from kiln.frontend import from_onnx
from kiln.ir import Call, Function, IRModule
from kiln.ir.ops.conv import CONV2D
from kiln.ir.visitor import post_order
from kiln.passes import LEVELS, alter_layout, count_layout_transforms, fusion_summary, run
from kiln.schedules.choose import Choice, ConvWorkload, choose
from kiln.schedules.dispatch import task_of
from kiln.schedules.target_info import target_info, vector_lanes
from kiln.schedules.workload import Group

log = logging.getLogger(__name__)


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
    steps: list = field(default_factory=list)  # per kernel: name, ops, template, workload key, config, source


WEIGHTS_MODES = ("embedded", "external")


def compile(model: str | os.PathLike | onnx.ModelProto | IRModule, output: str | os.PathLike, options: Options | None = None,
            on_progress: Callable[[int, int], None] | None = None, *, weights: str = "embedded") -> CompileReport:
    """Compile an ONNX model into one shared library. `weights="external"` writes them beside it instead
    (`model.so` → `model.weights`), a file that `python -m kiln.rebuild_weights` can make again elsewhere.

    >>> report = kiln.compile("model.onnx", "model.so")  # doctest: +SKIP
    >>> kiln.load(report.path).run(x)  # doctest: +SKIP
    """
    options = options or Options()
    if weights not in WEIGHTS_MODES:
        raise KilnError(f"weights must be {' or '.join(WEIGHTS_MODES)}, got {weights!r}")
    t0 = time.perf_counter()
    mod = model if isinstance(model, IRModule) else from_onnx(model, input_shapes=options.input_shapes)
    t1 = time.perf_counter()
    target = resolve_target(options.target)
    mod = prepare(mod, target, options)
    configs = tuned_configs(options, target)
    mod, choices = optimize(mod, target, options, configs)
    t2 = time.perf_counter()
    cc, fcompile = toolchain(target)  # a cross gcc for another architecture (aarch64); checked before building
    result = build(mod, target, on_progress, configs)
    result.meta.update({"kiln": kiln.__version__, "target": json.loads(str(target)),
                        "cpu": str(target.attrs.get("mcpu", "generic")),
                        "cpu_features": required_cpu_features(target), "model": str(mod.attrs.get("name", "model")),
                        "precision": options.precision})
    device = None
    if is_cuda(target):  # kernels compiled by nvcc now, so a bad kernel fails here; the PTX also beside, to read
        device = compile_device_code(result.executable, target)
        write_ptx(Path(output), device.ptx)
    path = write_artifact(Path(output), result.executable, result.meta, result.weights, cc=cc, fcompile=fcompile,
                          weights_file=weights == "external", device=device)
    t3 = time.perf_counter()
    plan = mod.attrs["memory_plan"]
    fusion = fusion_summary(mod)
    if plan.views:
        fusion += f"\n  ({len(plan.views)} concatenate written in place by their inputs: no kernel)"
    return CompileReport(path, len(result.groups), fusion, plan.planned_bytes, plan.naive_bytes,
                         t1 - t0, t2 - t1, result.lower_s, result.compile_s, t3 - t0, choices,
                         count_layout_transforms(mod), [s["schedule"] for s in result.meta["steps"]],
                         [{k: v for k, v in s.items() if k != "args"} for s in result.meta["steps"]])


def prepare(mod: IRModule, target, options: Options) -> IRModule:
    """Target facts the passes need travel as module attrs, so passes stay functions of the IR alone."""
    cpu = target.kind.name == "llvm"
    from kiln.schedules.x86.conv2d_nchwc import channel_tile
    from kiln.schedules.x86.depthwise_pointwise import min_fused_rows
    from kiln.schedules.x86.qconv2d_nchwc import dot_kind

    int8_dot = dot_kind(target_info(target)) if cpu else None
    if options.precision == "int8" and not int8_dot:
        log.warning("precision int8: the target has no int8 kernels (x86 with AVX2 or AVX-512 VNNI), so the "
                    "quantized convs and matmuls compute in float32 on dequantized values: int8's rounding "
                    "without its speed")
    lanes = vector_lanes(target, 32) if cpu else 0
    return mod.with_attrs(layout_block=lanes, conv_channel_tile=channel_tile(lanes) if cpu else 1,
                          fuse_depthwise=cpu and options.fuse_depthwise, precision=options.precision,
                          fuse_depthwise_min_rows=min_fused_rows(lanes) if cpu else None,
                          int8_dot=int8_dot,
                          calibration=dict(options.calibration) if options.precision == "int8" else None)


def model_tasks(model, options: Options | None = None) -> list[Task]:
    """The distinct tuning tasks of an ONNX model (path or ModelProto) compiled with `options`, with the
    tuned configs its logs give applied to the graph (a conv moved to another algorithm)."""
    options = options or Options()
    target = resolve_target(options.target)
    mod = prepare(from_onnx(model, input_shapes=options.input_shapes), target, options)
    fused, _ = optimize(mod, target, options, tuned_configs(options, target))
    return extract_tasks(fused, target)


SHIPPED_LOGS = Path(kiln.tuning_logs.__path__[0])


def _cores(n) -> int | None:
    return None if n is None else int(n)


def tuned_configs(options: Options, target) -> dict[str, dict]:
    """Workload key -> config: the best record per workload from the logs that ship with Kiln for the target's
    CPU (tuning_logs/<LLVM cpu name>/), then from `options.tuning_logs`, then `options.configs`, later ones
    winning. Records for another target, template version or knob space are skipped with a warning; shipped
    logs of other CPUs, and shipped records measured at another core count, with one note."""
    from kiln.autotune.records import best_configs, read_records

    configs: dict[str, dict] = {}
    # shipped logs time CPU kernels; a CUDA target reads none (and so needs no TVM here: kiln.rebuild_weights)
    cpu = target_info(target).cpu if target.kind.name == "llvm" else None
    folders = sorted(p for p in SHIPPED_LOGS.iterdir() if p.is_dir() and any(p.glob("*.jsonl")))
    for folder in folders if options.shipped_logs and cpu is not None else []:
        if folder.name != cpu:
            log.info("shipped tuning logs for %s not applied: the target's CPU is %s", folder.name, cpu)
            continue
        records = read_records([folder], target)
        cores = _cores(target.attrs.get("num-cores"))
        fit = [r for r in records if _cores(r.target.get("num-cores")) == cores]
        if len(fit) < len(records):
            # a config's parallel split was measured at that core count: 4 tasks keep 2 cores busy, not 32
            others = sorted({str(r.target.get("num-cores")) for r in records} - {str(cores)})
            log.info("%d shipped tuning records for %s were measured on %s cores, this target has %s: not applied "
                     "(`kiln tune` measures this machine)", len(records) - len(fit), cpu, "/".join(others), cores)
        configs.update(best_configs(fit))
        log.info("%d tuned configs from the shipped logs for %s", len(configs), cpu)
    if options.tuning_logs:
        configs.update(best_configs(read_records(list(options.tuning_logs), target)))
    configs.update({k: dict(v) for k, v in options.configs.items()})
    return configs


def optimize(mod: IRModule, target, options: Options, configs: Mapping[str, Mapping] | None = None):
    """The pass pipeline of the opt level, with each conv's algorithm from the cost model (or measured), unless
    a config for its workload says otherwise; (fused module with memory plan, conv choices)."""
    passes = LEVELS[options.opt_level]
    split = passes.index(alter_layout) if alter_layout in passes else len(passes)
    mod = run(mod, passes[:split], verify=options.verify, dump_dir=options.dump_dir)
    choices = choose_conv_algorithms(mod, target, options.measure) if split < len(passes) else []
    algorithms = {span: c.algorithm for span, c in choices}
    fused = run(mod.with_attrs(conv_algorithms=algorithms), passes[split:], verify=options.verify,
                dump_dir=options.dump_dir, first=split + 1)
    wanted = graph_knobs_from_configs(fused, target, configs or {})
    if wanted:  # a tuned config moves a conv to another algorithm: lay the graph out again for it
        log.info("tuned configs change %d conv algorithm(s); laying the graph out again", len(wanted))
        algorithms.update(wanted)
        fused = run(mod.with_attrs(conv_algorithms=algorithms), passes[split:], verify=options.verify,
                    dump_dir=options.dump_dir, first=split + 1)
    return fused, choices


def graph_knobs_from_configs(fused: IRModule, target, configs: Mapping[str, Mapping]) -> dict[str, str]:
    """span -> conv algorithm, for each group whose config (by workload key) asks for another algorithm than
    the graph gave it."""
    if not configs:
        return {}
    wanted = {}
    for e in post_order(fused.main.body):
        if not (isinstance(e, Call) and isinstance(e.op, Function)):
            continue
        template, wl = task_of(e.op, target)
        cfg = configs.get(wl.key)
        group = Group(e.op)
        fixed = template.graph_knobs(group)
        if cfg and "algorithm" in fixed and cfg.get("algorithm") != fixed["algorithm"] and group.anchor.span:
            wanted[group.anchor.span] = cfg["algorithm"]
    return wanted


def choose_conv_algorithms(mod: IRModule, target, measure: bool = False) -> list[tuple[str, Choice]]:
    """(span, choice) for every 2-D conv of `mod`, in graph order: the cost model's pick, or with `measure` the
    fastest candidate timed here (once per distinct shape)."""
    if target.kind.name != "llvm":
        return []
    info = target_info(target)
    lanes, cores = info.lanes(32), info.cores
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
