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
out = Console()
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
) -> None:
    """Run ONNX's node test cases through Kiln: pass / fail / unsupported per op, and a summary."""
    from kiln import conformance as conf

    progress, on_progress = progress_bar("conformance")
    with progress:
        report = conf.run(set(op) if op else None, on_progress=on_progress)
    if write:
        write.parent.mkdir(parents=True, exist_ok=True)
        write.write_text(conf.to_markdown(report))
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


@app.command()
def zoo() -> None:
    """List the models `zoo:<name>` can name (shipped in the onnx wheel, or built in code)."""
    from kiln import zoo as z

    for name in z.names():
        out.print(f"zoo:{name}")


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
