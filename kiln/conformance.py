"""ONNX conformance: every node test case that ships with onnx, run through Kiln and checked against its
expected outputs. Each case is pass, fail (wrong numbers, or an error that is not a clean UnsupportedError), or
unsupported. Cases are grouped under the ONNX op they test; "_expanded" cases (an op's function body) count
under that op too, but need only the ops of their body.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx.backend.test.case.node import collect_testcases

from kiln.errors import CodegenError, UnsupportedError
from kiln.frontend.onnx import supported_op_types
from kiln.onnx_backend import KilnRep, as_array, interpret

PASS, FAIL, UNSUPPORTED = "pass", "fail", "unsupported"


@dataclass
class CaseResult:
    name: str
    op: str
    status: str
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    results: list[CaseResult] = field(default_factory=list)
    suite_ops: set[str] = field(default_factory=set)
    supported_ops: set[str] = field(default_factory=set)

    def by_op(self) -> dict[str, Counter]:
        rows: dict[str, Counter] = {}
        for r in self.results:
            rows.setdefault(r.op, Counter())[r.status] += 1
        return rows

    @property
    def counts(self) -> Counter:
        return Counter(r.status for r in self.results)

    @property
    def pass_rate(self) -> float:
        """Passing cases among those Kiln claims to support (passes and failures)."""
        c = self.counts
        return c[PASS] / max(c[PASS] + c[FAIL], 1)

    def summary(self) -> dict:
        c = self.counts
        covered = self.suite_ops & self.supported_ops
        return {"cases": len(self.results), "pass": c[PASS], "fail": c[FAIL], "unsupported": c[UNSUPPORTED],
                "pass_rate_of_supported": round(self.pass_rate, 4), "suite_ops": len(self.suite_ops),
                "ops_covered": len(covered)}


def _op_of(case, op_names: Iterable[str]) -> str:
    nodes = case.model.graph.node
    if len(nodes) == 1:
        return nodes[0].op_type
    stem = case.name.removeprefix("test_").replace("_", "").lower()
    best = max((o for o in op_names if stem.startswith(o.lower())), key=len, default=None)
    return best or nodes[-1].op_type


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def compare(got: list, want: list, rtol: float, atol: float) -> str | None:
    """None when outputs match; else what differs."""
    if len(got) != len(want):
        return f"{len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g), as_array(w)
        if g.shape != w.shape:
            return f"output {i}: shape {g.shape}, expected {w.shape}"
        if w.dtype.kind in "fc":
            if not np.allclose(g.astype(np.float64), w.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True):
                diff = np.nanmax(np.abs(g.astype(np.float64) - w.astype(np.float64)))
                return f"output {i}: max abs diff {diff:.3g} (rtol {rtol}, atol {atol})"
        elif not np.array_equal(g, w):
            return f"output {i}: values differ"
    return None


def run_case(case, op: str, executor=interpret, timeout_s: int = 60) -> CaseResult:
    start = time.perf_counter()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout_s)
    try:
        rep = KilnRep(case.model, executor)
        detail = None
        for inputs, outputs in case.data_sets:
            got = rep.run([as_array(x) for x in inputs])
            detail = compare(list(got), list(outputs), case.rtol or 1e-3, case.atol or 1e-7)
            if detail:
                break
        status = FAIL if detail else PASS
    except (UnsupportedError, CodegenError) as err:
        # a CodegenError here is an op with no compute or schedule yet: unsupported by the compiled path
        status, detail = UNSUPPORTED, str(err).splitlines()[0] if str(err) else "unsupported"
        if "unsupported op type" in detail:
            detail = "; ".join(line.strip() for line in str(err).splitlines()[1:3])
    except _Timeout:
        status, detail = FAIL, f"timed out after {timeout_s} s"
    except Exception as err:  # a conformance run records every crash as a failure and goes on
        first = str(err).splitlines()[0] if str(err) else ""
        status, detail = FAIL, f"{type(err).__name__}: {first[:200]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return CaseResult(case.name, op, status, detail or "", time.perf_counter() - start)


def run(ops: set[str] | None = None, executor=interpret,
        on_progress: Callable[[int, int], None] | None = None) -> Report:
    cases = collect_testcases()
    all_ops = {s.name for s in onnx.defs.get_all_schemas_with_history()}
    report = Report(supported_ops=supported_op_types())
    chosen = []
    for case in cases:
        op = _op_of(case, all_ops)
        report.suite_ops.add(op)
        if ops is None or op in ops:
            chosen.append((case, op))
    for i, (case, op) in enumerate(chosen):
        report.results.append(run_case(case, op, executor))
        if on_progress:
            on_progress(i + 1, len(chosen))
    return report


def to_markdown(report: Report, title: str = "ONNX node-test conformance (reference interpreter)") -> str:
    s = report.summary()
    lines = [
        f"# {title}",
        "",
        "Generated by `kiln conformance --write docs/conformance.md`; the ONNX node test cases shipped with "
        f"onnx {onnx.__version__}.",
        "",
        f"- ONNX ops in the suite: {s['suite_ops']}; with a Kiln converter: {s['ops_covered']}",
        f"- cases: {s['cases']}: {s['pass']} pass, {s['fail']} fail, {s['unsupported']} unsupported",
        f"- pass rate among cases of supported ops (pass / (pass + fail)): {100 * s['pass_rate_of_supported']:.1f}%",
        "",
        "| op | converter | pass | fail | unsupported | first problem |",
        "|---|---|---:|---:|---:|---|",
    ]
    firsts: dict[str, str] = {}
    for r in report.results:
        if r.status != PASS and r.op not in firsts:
            firsts[r.op] = f"{r.name}: {r.detail}".replace("|", "\\|")[:160]
    for op, c in sorted(report.by_op().items()):
        mark = "yes" if op in report.supported_ops else "no"
        lines.append(f"| {op} | {mark} | {c[PASS]} | {c[FAIL]} | {c[UNSUPPORTED]} | {firsts.get(op, '')} |")
    return "\n".join(lines) + "\n"
