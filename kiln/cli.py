"""The `kiln` command. Results go to stdout, diagnostics and progress to stderr; a KilnError prints as one
line without a traceback and exits 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kiln.errors import KilnError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Kiln: ONNX models in, fast shared libraries out.")
out = Console() if sys.stdout.isatty() else Console(width=160)  # piped tables stay one line a row
err = Console(stderr=True)

DEFAULT_MODEL = "zoo:resnet50"


def _load_ir(model: str, input_shape: list[str] | None):
    from kiln import zoo
    from kiln.config import parse_input_shapes
    from kiln.frontend import from_onnx

    return from_onnx(zoo.resolve(model), input_shapes=parse_input_shapes(input_shape))


def progress_bar(description: str):
    """A rich progress bar on stderr, hidden when stderr is not a terminal; yields on_progress(done, total)."""
    progress = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, disable=not err.is_terminal, transient=True)
    task = progress.add_task(description, total=None)

    def on_progress(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, on_progress


@app.command()
def inspect(
    model: str = typer.Argument(DEFAULT_MODEL, help="an .onnx file, or zoo:<name> (see `kiln zoo`)"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
    input_shape: Optional[list[str]] = typer.Option(None, "--input-shape", help="name=d0,d1,... (repeatable)"),
) -> None:
    """Per-layer table of a model: op, output shape, parameters, MACs, activation bytes; and totals."""
    from kiln.inspect import human, summarize

    summary = summarize(_load_ir(model, input_shape))
    if json_out:
        out.print_json(json.dumps(summary.to_json()))
        return
    table = Table(title=f"{summary.name} ({model})", show_lines=False)
    for col, just in [("layer", "left"), ("ops", "left"), ("output", "left"), ("params", "right"),
                      ("MACs", "right"), ("activation", "right")]:
        table.add_column(col, justify=just)
    for layer in summary.layers:
        shape = f"{layer.dtype}{layer.output_shape}"
        table.add_row(layer.name, "+".join(layer.ops), shape, human(layer.params), human(layer.macs),
                      human(layer.activation_bytes, "B"))
    out.print(table)
    t = summary.totals
    out.print(f"inputs: {summary.inputs}\noutputs: {summary.outputs}", soft_wrap=True)
    out.print(f"layers: {t['layers']}   params: {human(t['params'])} ({human(t['param_bytes'], 'B')})   "
              f"MACs: {human(t['macs'])}   activations: {human(t['activation_bytes'], 'B')} "
              f"(largest {human(t['largest_activation_bytes'], 'B')})", soft_wrap=True)


@app.command()
def conformance(
    op: Optional[list[str]] = typer.Option(None, "--op", help="only cases of this ONNX op (repeatable)"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
    write: Optional[Path] = typer.Option(None, "--write", help="write the markdown table here"),
    show_failures: bool = typer.Option(False, "--failures", help="list every failing case"),
    compiled: bool = typer.Option(False, "--compiled", help="compile each case to an artifact and run that"),
    models: bool = typer.Option(False, "--models", help="ONNX's model tests (pytorch-converted, pytorch-operator, "
                                "simple) instead: interpreted, compiled too with --compiled, and ONNX Runtime"),
) -> None:
    """Run ONNX's node test cases through Kiln: pass / fail / unsupported per op, and a summary."""
    from kiln import conformance as conf
    from kiln.onnx_backend import compiled as compiled_executor
    from kiln.onnx_backend import interpret

    if models:
        _conformance_models(compiled, json_out, write, show_failures)
        return
    progress, on_progress = progress_bar("conformance")
    with progress:
        report = conf.run(set(op) if op else None, executor=compiled_executor if compiled else interpret,
                          on_progress=on_progress)
    if write:
        write.parent.mkdir(parents=True, exist_ok=True)
        title = "ONNX node-test conformance (compiled artifacts)" if compiled else None
        write.write_text(conf.to_markdown(report, title) if title else conf.to_markdown(report))
    if json_out:
        out.print_json(json.dumps({"summary": report.summary(),
                                   "ops": {k: dict(v) for k, v in sorted(report.by_op().items())},
                                   "failures": [r.__dict__ for r in report.results if r.status == conf.FAIL]}))
        return
    table = Table(title="ONNX node tests")
    for col in ("op", "pass", "fail", "unsupported"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for name, c in sorted(report.by_op().items()):
        table.add_row(name, str(c[conf.PASS]), str(c[conf.FAIL]), str(c[conf.UNSUPPORTED]))
    out.print(table)
    if show_failures:
        for r in report.results:
            if r.status == conf.FAIL:
                out.print(f"FAIL {r.name} ({r.op}): {r.detail}")
    s = report.summary()
    out.print(f"ops covered: {s['ops_covered']} of {s['suite_ops']}   cases: {s['cases']}   pass: {s['pass']}   "
              f"fail: {s['fail']}   unsupported: {s['unsupported']}   "
              f"pass rate (supported): {100 * s['pass_rate_of_supported']:.1f}%", soft_wrap=True)


def _conformance_models(compiled: bool, json_out: bool, write: Optional[Path], show_failures: bool) -> None:
    """`kiln conformance --models`: ONNX's model tests through the interpreter (and compiled artifacts), beside
    ONNX Runtime when it is installed."""
    from kiln import conformance as conf
    from kiln.onnx_backend import compiled as compiled_executor
    from kiln.onnx_backend import interpret

    executors = {"interpreted": interpret} | ({"compiled": compiled_executor} if compiled else {})
    progress, on_progress = progress_bar("model tests")
    with progress:
        report = conf.run_models(executors, on_progress=on_progress)
    if write:
        write.parent.mkdir(parents=True, exist_ok=True)
        write.write_text(conf.models_to_markdown(report))
    reps = dict(report.columns) | ({"ORT": report.ort} if report.ort is not None else {})
    failures = [{"column": name, **r.__dict__} for name, rep in reps.items() for r in rep.results
                if r.status != conf.PASS]
    if json_out:
        out.print_json(json.dumps({"summary": report.summary(), "cases": {
            name: {r.name: r.status for r in rep.results} for name, rep in reps.items()}, "failures": failures}))
        return
    table = Table(title="ONNX model tests")
    table.add_column("kind")
    for name in ("cases", *reps):
        table.add_column(name if name == "cases" else f"{name} pass", justify="right")
    first = next(iter(report.columns.values()))
    for kind, c in first.by_op().items():
        table.add_row(kind, str(sum(c.values())), *(str(rep.by_op()[kind][conf.PASS]) for rep in reps.values()))
    out.print(table)
    if show_failures:
        for f in failures:
            out.print(f"{f['column']}: {f['status'].upper()} {f['name']} ({f['op']}): {f['detail']}", soft_wrap=True)
    out.print("   ".join(f"{name}: {rep.counts[conf.PASS]} of {len(rep.results)} pass"
                         for name, rep in reps.items()), soft_wrap=True)


def _refuse_overwrite(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise KilnError(f"{path} exists; pass --force to overwrite it")


@app.command()
def compile(
    model: str = typer.Argument(DEFAULT_MODEL, help="an .onnx file, or zoo:<name>"),
    output: Path = typer.Option(Path("model.so"), "-o", "--output", help="the artifact to write"),
    target: str = typer.Option("native", "--target",
                               help="native, x86, x86-avx512, x86-avx512-vnni, x86-avx2, aarch64, "
                               "aarch64-dotprod (cross gcc), or a TVM target dict"),
    opt_level: int = typer.Option(2, "--opt-level", help="0-3"),
    dump_ir: Optional[Path] = typer.Option(None, "--dump-ir", help="write the IR after every pass here"),
    input_shape: Optional[list[str]] = typer.Option(None, "--input-shape", help="name=d0,d1,... (repeatable)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output file"),
    explain: bool = typer.Option(False, "--explain", help="print each conv's algorithm choice and each kernel's "
                                 "template, workload and config"),
    measure: bool = typer.Option(False, "--measure", help="time each conv's candidate algorithms here and keep "
                                 "the fastest, instead of trusting the cost model"),
    tuning_log: Optional[list[Path]] = typer.Option(None, "--tuning-log", help="tuning records (.jsonl file or "
                                                    "folder; repeatable): each workload's best config is used"),
    weights: str = typer.Option("embedded", "--weights", help="embedded (in the .so), or external: a file beside "
                                "it (model.weights) that `python -m kiln.rebuild_weights` can make again elsewhere"),
    precision: str = typer.Option("fp32", "--precision", help="fp32, tf32 (CUDA matmuls on TF32 tensor cores; "
                                  "fp32 elsewhere), fp16 or bf16 (half weights and compute; inputs and outputs "
                                  "stay float32), int8 (convs and matmuls on int8, calibrated: --calibration)"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="--precision int8: a table from `kiln "
                                               "calibrate` (.json), or sample inputs to calibrate on now (.npy, "
                                               ".npz or a folder of them; see kiln calibrate)"),
    calibration_method: str = typer.Option("percentile", "--calibration-method",
                                           help="percentile, entropy or minmax (with --calibration SAMPLES)"),
) -> None:
    """Compile a model into one shared library."""
    import kiln
    from kiln import zoo as z
    from kiln.config import Options, parse_input_shapes

    _refuse_overwrite(output, force)
    options = Options.from_env(target=target, opt_level=opt_level, dump_dir=dump_ir,
                               input_shapes=parse_input_shapes(input_shape), measure=measure,
                               tuning_logs=tuple(tuning_log or ()))
    source = z.resolve(model)
    options, cal = _with_precision(options, source, precision, calibration, calibration_method)
    progress, on_progress = progress_bar("compiling kernels")
    with progress:
        report = kiln.compile(source, output, options, on_progress=on_progress, weights=weights)
    out.print(report.fusion, soft_wrap=True)
    out.print(f"wrote {report.path} ({report.path.stat().st_size / 1e6:.1f} MB): {report.kernels} kernels; "
              f"activation memory {report.planned_bytes / 1e6:.1f} MB planned vs {report.naive_bytes / 1e6:.1f} MB "
              f"naive; compile {report.total_s:.1f} s (import {report.import_s:.1f}, passes {report.passes_s:.1f}, "
              f"lowering {report.lower_s:.1f}, tvm.compile {report.build_s:.1f})", soft_wrap=True)
    if weights == "external":
        wpath = report.path.with_suffix(".weights")
        out.print(f"weights in {wpath} ({wpath.stat().st_size / 1e6:.1f} MB)", soft_wrap=True)
    if report.conv_choices:
        picks: dict[str, int] = {}
        for _, c in report.conv_choices:
            picks[c.algorithm] = picks.get(c.algorithm, 0) + 1
        out.print(f"convs: {', '.join(f'{n} {a}' for a, n in sorted(picks.items()))}; "
                  f"{report.layout_transforms} layout transforms (--explain for each conv's choice)", soft_wrap=True)
    int8 = {op: sum(op in s.get("ops", ()) for s in report.steps) for op in ("qnn.conv2d_nchwc", "qnn.dense_packed")}
    if any(int8.values()):  # passes/realize_qdq.py: a quantized model's convs and matmuls on integers
        how = "AVX2, 7-bit weights" if any("madd" in str(s) for s in report.schedules) else "VNNI"
        out.print(f"int8 kernels ({how}): {int8['qnn.conv2d_nchwc']} convs, {int8['qnn.dense_packed']} matmuls",
                  soft_wrap=True)
    elif options.precision == "int8":
        err.print("warning: no conv or matmul took an int8 kernel (none had a range in the calibration, or the "
                  "target has no int8 kernels): the model computes in float32", soft_wrap=True)
    if cal is not None:  # the int8 build against the float32 one, on the samples it was calibrated on
        from kiln.calibrate import agreement

        m = kiln.load(report.path)
        for a in agreement([t.name for t in m.outputs], cal.outputs, [m.run(*s) for s in cal.samples]):
            out.print(f"int8 against float32 on the {len(cal.samples)} calibration samples: {a}", soft_wrap=True)
    tuned = sum(1 for s in report.steps if s.get("config_source") == "given")
    if tuned:
        out.print(f"{tuned} of {report.kernels} kernels use tuned configs", soft_wrap=True)
    if explain or measure:
        if report.conv_choices:
            out.print(explain_table(report))
        out.print(kernels_table(report.steps))


def _with_precision(options, source, precision: str, calibration: Optional[Path], method: str):
    """(options at `precision`, the Calibration when samples were calibrated on here, else None)."""
    if calibration is not None and precision != "int8":
        raise KilnError("--calibration is for --precision int8")
    if precision != "int8":
        return options.with_(precision=precision), None
    if calibration is None:
        raise KilnError("--precision int8 needs --calibration: sample inputs (.npy, .npz or a folder) or a table "
                        "that `kiln calibrate` wrote")
    if calibration.suffix == ".json":
        from kiln.calibrate import CalibrationTable

        return options.with_(precision="int8", calibration=CalibrationTable.load(calibration)), None
    cal = _calibrate(source, calibration, options, method)
    return options.with_(precision="int8", calibration=cal.table), cal


def _calibrate(source, data: Path, options, method: str):
    from kiln.calibrate import calibrate

    with err.status(f"calibrating on {data} ({method})"):
        cal = calibrate(source, data, options, method=method)
    err.print(f"calibrated {len(cal.table)} tensors on {cal.table.samples} samples ({method}) in {cal.seconds:.1f} s")
    return cal


@app.command()
def calibrate(
    model: str = typer.Argument(..., help="an .onnx file, or zoo:<name>"),
    data: Path = typer.Option(..., "--data", help="sample inputs: x.npy (samples stacked on a new first axis or "
                              "along a batch-1 model's batch axis), x.npz (an array per input name), or a folder "
                              "of them"),
    output: Path = typer.Option(..., "-o", "--output", help="the calibration table to write (.json)"),
    method: str = typer.Option("percentile", "--method", help="percentile (99.99th of |x|), entropy (TensorRT's "
                               "KL divergence) or minmax (ONNX Runtime's default)"),
    target: str = typer.Option("native", "--target", help="as kiln compile: the graph it calibrates is that "
                               "target's"),
    input_shape: Optional[list[str]] = typer.Option(None, "--input-shape", help="name=d0,d1,... (repeatable)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing table"),
) -> None:
    """Measure the activation ranges that `kiln compile --precision int8 --calibration TABLE` quantizes with."""
    from kiln import zoo as z
    from kiln.config import Options, parse_input_shapes

    _refuse_overwrite(output, force)
    options = Options.from_env(target=target, input_shapes=parse_input_shapes(input_shape))
    cal = _calibrate(z.resolve(model), data, options, method)
    cal.table.save(output)
    table = Table(title=f"{len(cal.table)} activation ranges ({method})")
    for col in ("tensor (read by)", "seen min", "seen max", "quantized over"):
        table.add_column(col)
    for k, (lo, hi) in cal.table.ranges.items():
        seen = cal.table.observed.get(k, (lo, hi))
        table.add_row(k, f"{seen[0]:.4g}", f"{seen[1]:.4g}", f"[{lo:.4g}, {hi:.4g}]")
    out.print(table)
    shapes = "".join(f" --input-shape {s}" for s in input_shape or ())
    out.print(f"wrote {output}: `kiln compile {model} --precision int8 --calibration {output}{shapes}`",
              soft_wrap=True)


def kernels_table(steps: list[dict]) -> Table:
    """One row per kernel: the template that scheduled it, its workload key, its config and where that came from."""
    table = Table(title="kernels: template, workload, config")
    for col in ("kernel", "layer", "ops", "template", "workload", "config", "from"):
        table.add_column(col, overflow="fold")
    for s in steps:
        cfg = ", ".join(f"{k}={v}" for k, v in (s.get("config") or {}).items()) or "-"
        table.add_row(s["kernel"], s.get("name", ""), "+".join(s.get("ops", [])), s.get("template", ""),
                      s.get("workload", "").split(":")[-1], cfg, s.get("config_source", ""))
    return table


def explain_table(report) -> Table:
    """One row per conv: its shape, each candidate's estimated (and, with --measure, measured) time, the pick."""
    algos = ["direct", "im2col", "winograd2", "winograd4", "nchw"]
    used = [a for a in algos if any(a in c.estimates_ms for _, c in report.conv_choices)]
    table = Table(title=f"conv algorithms ({len(report.conv_choices)} convs; {report.layout_transforms} layout "
                        f"transforms); estimated ms [measured ms]")
    for col in ("layer", "shape", *used, "chosen", "by"):
        table.add_column(col, justify="right" if col in used else "left")
    for span, c in report.conv_choices:
        wl = c.workload
        cells = []
        for a in used:
            if a not in c.estimates_ms:
                cells.append("")
                continue
            cell = f"{c.estimates_ms[a]:.3f}"
            if a in c.measured_ms:
                cell += f" [{c.measured_ms[a]:.3f}]"
            cells.append(f"[bold]{cell}[/bold]" if a == c.algorithm else cell)
        shape = f"{wl.c}x{wl.h}x{wl.w}→{wl.oc} {wl.kh}x{wl.kw}/{wl.strides[0]}" + (f" g{wl.groups}" if wl.groups > 1 else "")
        table.add_row(span, shape, *cells, c.algorithm, "measured" if c.measured_ms else "model")
    return table


@app.command()
def run(
    artifact: Path = typer.Argument(..., help="a compiled model (.so)"),
    inputs: list[str] = typer.Option(..., "--input", "-i", help="x.npy, or name=x.npy (repeatable)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="write outputs here (.npy; .npz if several)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output file"),
    qemu: bool = typer.Option(False, "--qemu", help="run an aarch64 artifact under qemu-user (serial; slow)"),
) -> None:
    """Run a compiled model on .npy inputs."""
    import numpy as np

    import kiln
    from kiln.runtime.qemu import QemuModel

    model = QemuModel(artifact) if qemu else kiln.load(artifact)
    positional, named = [], {}
    for spec in inputs:
        name, sep, file = spec.rpartition("=")
        try:
            value = np.load(file if sep else spec)
        except (OSError, ValueError) as e:
            raise KilnError(f"cannot read input {file if sep else spec!r}: {e}") from None
        if sep:
            named[name] = value
        else:
            positional.append(value)
    results = model.run(*positional, **named)
    if output is not None:
        _refuse_overwrite(output, force)
        if len(results) == 1:
            np.save(output, results[0])
        else:
            np.savez(output, **{t.name: r for t, r in zip(model.outputs, results)})
    for t, r in zip(model.outputs, results):
        out.print(f"{t.name}: {r.dtype}{list(r.shape)} min {r.min():.4g} max {r.max():.4g} mean {r.mean():.4g}",
                  soft_wrap=True)


@app.command()
def bench(
    model: str = typer.Argument(DEFAULT_MODEL, help="an .onnx file, or zoo:<name>"),
    target: str = typer.Option("native", "--target"),
    repeat: int = typer.Option(20, "--repeat", help="timed runs per engine"),
    threads: int = typer.Option(2, "--threads", help="threads for both engines"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
    tuning_log: Optional[list[Path]] = typer.Option(None, "--tuning-log", help="tuning records to apply (repeatable)"),
    precision: str = typer.Option("fp32", "--precision", help="fp32, tf32, fp16, bf16 or int8 (see kiln compile)"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="--precision int8: a table or sample "
                                               "inputs (see kiln compile); default: 4 seeded random inputs"),
) -> None:
    """Compile a model, then time Kiln and ONNX Runtime on it side by side (median, p90, ratio, max abs error)."""
    from kiln.bench import compare

    progress, on_progress = progress_bar("compiling kernels")
    with progress:
        result = compare(model, target=target, repeat=repeat, threads=threads, on_progress=on_progress,
                         tuning_logs=tuple(tuning_log or ()), precision=precision, calibration=calibration)
    if json_out:
        out.print_json(json.dumps(result))
        return
    out.print(f"{result['model']}: compile {result['compile_s']:.1f} s, {result['kernels']} kernels", soft_wrap=True)
    for engine in ("kiln", "onnxruntime"):
        r = result[engine]
        out.print(f"  {engine:12s} median {r['median_ms']:8.2f} ms   p90 {r['p90_ms']:8.2f} ms", soft_wrap=True)
    lo, hi = result["ratio_range"]
    out.print(f"  kiln / onnxruntime = {result['ratio']:.2f}x (rounds {lo:.2f}-{hi:.2f})   "
              f"max abs error {result['max_abs_error']:.2e}", soft_wrap=True)
    if result["calibrated_on"]:  # int8 against ONNX Runtime's float32 model
        out.print(f"  int8 calibrated on {result['calibrated_on']}: SQNR {result['sqnr_db']:.1f} dB against "
                  "ONNX Runtime's float32 outputs", soft_wrap=True)


@app.command()
def profile(
    artifact: Path = typer.Argument(..., help="a compiled model (.so)"),
    repeat: int = typer.Option(20, "--repeat"),
    trace: Optional[Path] = typer.Option(None, "--trace", help="write a Chrome trace (chrome://tracing) here"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Time every fused kernel of a compiled model: ops inside, time, share of the total, GFLOPS."""
    import kiln

    result = kiln.load(artifact).profile(repeat)
    if trace is not None:
        events, ts = [], 0.0
        for k in result["kernels"]:  # one run's timeline: each kernel's time inside runs when the entry stamps it
            dur = k.get("in_sequence_ms", k["ms"]) * 1e3
            events.append({"name": k["name"], "cat": "+".join(k["ops"]), "ph": "X", "ts": ts, "dur": dur,
                           "pid": 0, "tid": 0, "args": {"gflops": round(k["gflops"], 2), "kernel": k["kernel"],
                                                        "alone_ms": round(k["ms"], 4)}})
            ts += dur
        trace.write_text(json.dumps({"traceEvents": events}))
    if json_out:
        out.print_json(json.dumps(result))
        return
    table = Table(title=f"{artifact} (median of {repeat})")
    in_seq = all("in_sequence_ms" in k for k in result["kernels"])
    cols = ["kernel", "layer", "ops", "template", "config", "ms"] + (["in run"] if in_seq else []) + ["share", "GFLOPS"]
    for col in cols:
        table.add_column(col, justify="right" if col in ("ms", "in run", "share", "GFLOPS") else "left")
    key = "in_sequence_ms" if in_seq else "ms"
    total = sum(k[key] for k in result["kernels"]) or 1.0
    for k in sorted(result["kernels"], key=lambda k: -k[key]):
        cfg = ", ".join(f"{n}={v}" for n, v in (k.get("config") or {}).items()) or "-"
        row = [k["kernel"], k["name"], "+".join(k["ops"]), k.get("template", ""), cfg, f"{k['ms']:.3f}"]
        row += [f"{k['in_sequence_ms']:.3f}"] if in_seq else []
        table.add_row(*row, f"{100 * k[key] / total:.1f}%", f"{k['gflops']:.1f}")
    out.print(table)
    overhead = result.get("overhead_ms", result["run_ms"] - result["kernels_ms"])
    out.print(f"run {result['run_ms']:.3f} ms; kernels {result['kernels_ms']:.3f} ms; executor overhead "
              f"{overhead:.3f} ms ({100 * overhead / result['run_ms']:.1f}%)", soft_wrap=True)
    if in_seq:
        out.print(f"kernels alone (ms column, each repeated on warm caches) sum to "
                  f"{result['sum_of_isolated_kernels_ms']:.3f} ms; inside runs (in run column, share) to "
                  f"{sum(k['in_sequence_ms'] for k in result['kernels']):.3f} ms", soft_wrap=True)


@app.command()
def tasks(
    model: str = typer.Argument(DEFAULT_MODEL, help="an .onnx file, or zoo:<name>"),
    target: str = typer.Option("native", "--target"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
    input_shape: Optional[list[str]] = typer.Option(None, "--input-shape", help="name=d0,d1,... (repeatable)"),
) -> None:
    """List a model's distinct tuning tasks: template, workload key, kernels sharing it, FLOPs, weights, the
    default config and its knob space."""
    from kiln import zoo as z
    from kiln.config import Options, parse_input_shapes
    from kiln.driver import model_tasks

    options = Options.from_env(target=target, input_shapes=parse_input_shapes(input_shape))
    found = model_tasks(z.resolve(model), options)
    rows = []
    for t in found:
        space = t.space()
        rows.append({"template": t.workload.template, "key": t.key, "kernels": t.count, "flops": t.flops,
                     "weight_bytes": t.weight_bytes, "default": t.default(), "space_size": len(space),
                     "knobs": space.tunable(), "workload": t.workload.to_json(), "layers": t.names})
    if json_out:
        out.print_json(json.dumps(rows))
        return
    table = Table(title=f"{len(rows)} tasks, {sum(r['kernels'] for r in rows)} kernels")
    for col in ("#", "template", "workload", "kernels", "GFLOP", "weights MB", "default config", "space"):
        table.add_column(col, justify="right" if col in ("#", "kernels", "GFLOP", "weights MB", "space") else "left",
                         overflow="fold")
    for i, r in enumerate(rows):
        cfg = ", ".join(f"{k}={v}" for k, v in r["default"].items()) or "-"
        table.add_row(str(i), r["template"], r["key"].split(":")[-1], str(r["kernels"]), f"{r['flops'] / 1e9:.3f}",
                      f"{r['weight_bytes'] / 1e6:.2f}", cfg, str(r["space_size"]))
    out.print(table)


def _duration_s(text: str | None) -> float | None:
    """"90s", "30m", "1.5h" or plain seconds."""
    if not text:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except ValueError:
        raise KilnError(f"--time-budget {text!r}: expected seconds or a number with s, m or h (30m)") from None


@app.command()
def tune(
    model: str = typer.Argument(DEFAULT_MODEL, help="an .onnx file, or zoo:<name>"),
    target: str = typer.Option("native", "--target"),
    trials: int = typer.Option(1000, "--trials", help="measurements in all, over every task"),
    log_file: Optional[Path] = typer.Option(None, "--log", help="records file (appended; a rerun resumes it); "
                                            "default tuning_logs/<cpu>/<model>.jsonl"),
    tuner: str = typer.Option("xgb", "--tuner", help="xgb, ga, random or grid"),
    rpc_tracker: Optional[str] = typer.Option(None, "--rpc-tracker", help="HOST:PORT of a TVM RPC tracker: "
                                              "measure on the device registered there under --rpc-key"),
    rpc_key: Optional[str] = typer.Option(None, "--rpc-key"),
    time_budget: Optional[str] = typer.Option(None, "--time-budget", help="stop after this long (30m, 1h, 600)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write PNG tuning curves (per task, model) here"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="also write the faster of the tuned and "
                                          "the default artifact here"),
    batch: int = typer.Option(8, "--batch", help="candidates measured per round"),
    early_stop: int = typer.Option(96, "--early-stop", help="a task is done after this many trials without a "
                                   "better config"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output file"),
    input_shape: Optional[list[str]] = typer.Option(None, "--input-shape", help="name=d0,d1,... (repeatable)"),
    transfer: Optional[list[Path]] = typer.Option(None, "--transfer", help="records of other models (file or "
                                                  "folder, repeatable): warm-start the xgb tuner's cost model"),
    timing: str = typer.Option("model", "--timing", help="model: time each candidate inside the model compiled "
                               "with the defaults, as a run sees it; alone: each kernel by itself, caches "
                               "flushed (remote devices always time alone)"),
    batch_export: Optional[Path] = typer.Option(None, "--batch-export", help="build --trials candidates (those "
                                                "the log does not hold yet) into this folder with a runtime-only "
                                                "worker, to measure on a device reached in short runs"),
    batch_import: Optional[Path] = typer.Option(None, "--batch-import", help="append a measured batch folder's "
                                                "results to the log as records"),
    task: Optional[list[str]] = typer.Option(None, "--task", help="tune only the tasks whose workload key "
                                             "contains this (repeatable); the others keep the log's configs"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or int8 (with --calibration): the kernels "
                                  "of that build are tuned"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="--precision int8: a table or sample "
                                               "inputs (see kiln compile)"),
    ab_rounds: int = typer.Option(7, "--ab-rounds", help="alternating rounds of the end-to-end A/B; the tuned "
                                  "model must win 5 in 7 of them (more rounds tell a smaller gain from noise)"),
) -> None:
    """Autotune a model's kernels: search each task's knob space, measure here or on a device over TVM RPC, log
    every measurement; `kiln compile --tuning-log` applies the log."""
    from rich.live import Live

    from kiln import zoo as z
    from kiln.autotune.records import cpu_name
    from kiln.autotune.tune import TuneOptions
    from kiln.config import Options, parse_input_shapes
    from kiln.schedules.target_info import target_info
    from kiln.tuning import tune_model
    from kiln.codegen.target import resolve_target

    if output is not None:
        _refuse_overwrite(output, force)
    if (rpc_tracker is None) != (rpc_key is None):
        raise KilnError("--rpc-tracker and --rpc-key go together")
    options = Options.from_env(target=target, input_shapes=parse_input_shapes(input_shape))
    options = _with_precision(options, z.resolve(model), precision, calibration, "percentile")[0]
    name = model.split(":", 1)[1] if model.startswith("zoo:") else Path(model).stem
    resolved = resolve_target(options.target)
    kind = target_info(resolved).cpu if resolved.kind.name == "llvm" else str(resolved.attrs.get("arch", "gpu"))
    log_path = log_file or Path("tuning_logs") / kind / f"{name}.jsonl"
    if batch_export is not None or batch_import is not None:
        _tune_batch(model, options, log_path, batch_export, batch_import, trials, tuner, batch)
        return
    runner = None
    if rpc_tracker is not None:
        from kiln.autotune.rpc import RPCRunner

        runner = RPCRunner(rpc_tracker, rpc_key)
    opts = TuneOptions(trials=trials, tuner=tuner, batch=batch, early_stop=early_stop,
                       time_budget_s=_duration_s(time_budget), transfer=tuple(transfer or ()))
    err.print(f"tuning {model} for {options.target} on {cpu_name()}; log {log_path}", soft_wrap=True)
    with Live(Table(), console=err, refresh_per_second=2, transient=False) as live:
        result = tune_model(z.resolve(model), log_path, opts, options, runner=runner, output=output, plot_dir=plot,
                            on_round=lambda e: live.update(_tune_table(e)), timing=timing, only=tuple(task or ()),
                            ab_rounds=ab_rounds)
    out.print(_tune_summary(result))
    if result.kept:
        before = "default" if result.baseline == "default" else "before (the log's configs)"
        out.print(f"whole model: {before} {result.default_ms:.3f} ms, tuned {result.tuned_ms:.3f} ms "
                  f"({result.default_ms / result.tuned_ms:.2f}x, faster in {result.rounds_won[0]} of "
                  f"{result.rounds_won[1]} rounds); kept {'tuned' if result.kept == 'tuned' else before}"
                  + (f" → {output}" if output else ""), soft_wrap=True)
    for p in result.curves:
        out.print(f"curve: {p}", soft_wrap=True)
    out.print(f"log: {log_path} (kiln compile {model} --tuning-log {log_path})", soft_wrap=True)


def _tune_batch(model: str, options, log_path: Path, export: Optional[Path], imported: Optional[Path], trials: int,
                tuner: str, batch: int) -> None:
    """`kiln tune --batch-export/--batch-import`: one round of tuning on a device reached in short runs."""
    from kiln import zoo as z
    from kiln.autotune.batch import export_batch, import_results
    from kiln.autotune.tune import TuneOptions
    from kiln.driver import model_tasks

    if imported is not None:
        counts = import_results(imported, log_path)
        out.print(f"{imported}: {counts['imported']} measured, {counts['errors']} failed, {counts['skipped']} "
                  f"already in {log_path}", soft_wrap=True)
    if export is not None:
        tasks = model_tasks(z.resolve(model), options)
        manifest = export_batch(tasks, log_path, export, TuneOptions(tuner=tuner, batch=batch), size=trials)
        out.print(f"{export}: {len(manifest['candidates'])} candidates of {len(manifest['tasks'])} tasks "
                  f"({len(manifest['build_errors'])} failed to build); measure them there with\n"
                  f"  python3 {export}/device_worker.py {export} --budget-s 480\n"
                  f"then bring the folder back and run: kiln tune {model} --target {options.target} "
                  f"--log {log_path} --batch-import {export}", soft_wrap=True)


def _tune_table(e) -> Table:
    """The live display: where the search is and what each task has reached."""
    from kiln.autotune.tune import estimate_s

    rate = e.trials_done / e.elapsed_s if e.elapsed_s > 0 else 0.0
    eta = (e.trials_total - e.trials_done) / rate if rate > 0 else 0.0
    table = Table(title=f"task {e.task_index + 1}/{len(e.states)}  trials {e.trials_done}/{e.trials_total}  model "
                        f"estimate {estimate_s(e.states) * 1e3:.3f} ms  elapsed {e.elapsed_s:.0f} s  ETA {eta:.0f} s")
    for col in ("#", "template", "kernels", "trials", "default ms", "best ms", "GFLOPS", ""):
        table.add_column(col, justify="left" if col in ("template", "") else "right")
    for i, s in enumerate(e.states):
        gflops = s.task.flops / s.best_cost_s / 1e9 if s.best_cost_s < float("inf") and s.task.flops else 0.0
        table.add_row(str(i), s.task.workload.template, str(s.task.count), str(s.trials),
                      f"{s.default_cost_s * 1e3:.4f}", f"{s.best_cost_s * 1e3:.4f}", f"{gflops:.1f}",
                      "done" if s.done else ("◀" if i == e.task_index else ""))
    return table


def _tune_summary(result) -> Table:
    r = result.tune
    table = Table(title=f"tuned {r.trials} trials in {r.elapsed_s:.0f} s")
    for col in ("#", "template", "kernels", "trials", "default ms", "best ms", "speedup", "best config"):
        table.add_column(col, justify="left" if col in ("template", "best config") else "right", overflow="fold")
    for i, s in enumerate(r.states):
        speedup = s.default_cost_s / s.best_cost_s if s.best_cost_s > 0 and s.best_cost_s < float("inf") else 0.0
        cfg = ", ".join(f"{k}={v}" for k, v in (s.best_config or {}).items()) or "-"
        table.add_row(str(i), s.task.workload.template, str(s.task.count), str(s.trials),
                      f"{s.default_cost_s * 1e3:.4f}", f"{s.best_cost_s * 1e3:.4f}", f"{speedup:.2f}x", cfg)
    return table


@app.command()
def zoo() -> None:
    """List the models `zoo:<name>` can name (shipped in the onnx wheel, or built in code)."""
    from kiln import zoo as z

    for name in z.names():
        out.print(f"zoo:{name}")


# --- serving (issue 6): `kiln serve` and `kiln repo add` ------------------------------------------------------
repo_app = typer.Typer(no_args_is_help=True, help="Build model repositories for `kiln serve`.")
app.add_typer(repo_app, name="repo")


@app.command()
def serve(
    repository: Path = typer.Argument(..., help="REPO/<model>/<version>/model_b<N>.so (see `kiln repo add`)"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    model_control: str = typer.Option("poll", "--model-control", help="who changes what is served: poll (watch "
                                      "the repository directory), explicit (the repository API's load and "
                                      "unload), none (nothing until a restart)"),
    control_token_file: Optional[Path] = typer.Option(None, "--control-token-file", help="a file holding the "
                                                      "bearer token the repository API requires (else "
                                                      "$KILN_CONTROL_TOKEN; neither: no token)"),
    poll_s: float = typer.Option(2.0, "--poll-s", help="with --model-control poll, watch every N seconds"),
    threads: Optional[int] = typer.Option(None, "--threads", help="TVM worker threads per model version"),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="larger request bodies answer 413"),
    body_timeout_s: float = typer.Option(30.0, "--body-timeout-s", help="a request body not received within N "
                                         "seconds answers 408"),
    shutdown_timeout_s: float = typer.Option(30.0, "--shutdown-timeout-s", help="after SIGTERM/SIGINT, exit "
                                             "within N seconds whatever is still running (a second signal: at "
                                             "once)"),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Serve a model repository over the KServe v2 HTTP API, with dynamic batching and /metrics."""
    import logging
    import os

    from kiln.serve import logs
    from kiln.serve.app import read_control_token
    from kiln.serve.app import serve as run_server

    logs.configure(log_level)
    run_server(repository, host=host, port=port, poll_s=poll_s, num_threads=threads,
               max_body_bytes=int(max_body_mb * (1 << 20)), body_timeout_s=body_timeout_s,
               model_control=model_control, control_token=read_control_token(control_token_file, os.environ),
               shutdown_timeout_s=shutdown_timeout_s)
    # Stopped, repository closed, logs written: end here. Interpreter teardown frees every loaded library and
    # took over 10 s on a busy 2-core machine, past --shutdown-timeout-s, where no watchdog thread can run.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


@repo_app.command("add")
def repo_add(
    model: str = typer.Argument(..., help="an .onnx file (batch dim symbolic), or zoo:<name>"),
    repository: Path = typer.Argument(..., help="the repository folder (created if missing)"),
    name: str = typer.Option(..., "--name", help="the model's name in the repository"),
    version: Optional[int] = typer.Option(None, "--version", help="default: the highest existing + 1"),
    max_batch: int = typer.Option(8, "--max-batch", help="largest batch bucket; 1 also takes a model whose "
                                  "dim 0 is fixed (static batch, or no batch dim), compiled as exported"),
    bucket: Optional[list[int]] = typer.Option(None, "--bucket", help="batch sizes to compile (repeatable); "
                                               "default: powers of two up to --max-batch"),
    target: str = typer.Option("native", "--target"),
    opt_level: int = typer.Option(2, "--opt-level"),
    precision: str = typer.Option("fp32", "--precision", help="as kiln compile; int8 takes a table from `kiln "
                                  "calibrate` (its ranges do not depend on the batch, so every bucket shares it)"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="--precision int8: the table (.json)"),
) -> None:
    """Compile a model into a new repository version: one artifact per batch bucket, plus config.json."""
    from kiln import zoo as z
    from kiln.config import Options
    from kiln.repo_builder import add_version

    if precision == "int8" and calibration is not None and calibration.suffix != ".json":
        raise KilnError("kiln repo add --precision int8 takes a calibration table: kiln calibrate MODEL --data "
                        "SAMPLES --input-shape NAME=1,... -o table.json")
    options = Options.from_env(target=target, opt_level=opt_level)
    options = _with_precision(options, z.resolve(model), precision, calibration, "percentile")[0]
    progress, on_progress = progress_bar("compiling buckets")
    with progress:
        added = add_version(z.resolve(model), repository, name, version=version, max_batch=max_batch,
                            buckets=bucket, options=options, on_progress=on_progress)
    out.print(f"wrote {added.path}: buckets {list(added.buckets)}; compile {added.compile_s:.1f} s", soft_wrap=True)


def main() -> None:
    try:
        app(standalone_mode=False)
    except KilnError as e:
        err.print(f"[red]error:[/red] {type(e).__name__}: {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except Exception as e:  # click's usage errors arrive here when standalone_mode is off
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
