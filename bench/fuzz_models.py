"""Differential fuzzing: random graphs (kiln.random_models) compiled by Kiln and checked against ONNX Runtime.

    python bench/fuzz_models.py --seeds 0:200 [--minutes 30] [--target native|x86-avx2|both] [--keep DIR]
                                [--precision fp32|fp16|bf16|int8] [--qdq]
    python bench/fuzz_models.py --seeds 17                  # one seed again, in this process, with the traceback

Each case compiles and runs in a worker process, so a segfault or a hang costs that case (reported as a crash or
a hang) and not the run. Outcomes: ok; mismatch (a silent wrong answer: the worst kind); crash; error (a Kiln exception that is
not a clear refusal); unsupported (a KilnError naming what is not supported: acceptable); invalid (ONNX
Runtime itself refuses the graph: the generator's fault, not Kiln's). Failing models are written to --keep.
`--qdq` quantizes each seed's graph as ONNX Runtime's QDQ format does (QuantizeLinear/DequantizeLinear pairs,
int8 conv weights); those outputs are compared by cosine, since a rounding error apart can cross a step.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
import traceback
from pathlib import Path

TARGETS = ("native", "x86-avx2")


RTOL, ATOL = 1e-3, 1e-4  # float32 builds; atol scaled by the output's largest magnitude


def compare(got: list, want: list) -> str | None:
    """None when every float32 output matches ONNX Runtime's; otherwise what differs first (also for the GPU
    runs, bench/gpu_fuzz.py)."""
    import numpy as np

    if len(got) != len(want):
        return f"{len(got)} outputs, expected {len(want)}"
    for k, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            return f"output {k}: shape {g.shape}, expected {w.shape}"
        scale = max(1.0, float(np.abs(w).max()) if w.size else 1.0)
        bad = ~np.isclose(g, w, rtol=RTOL, atol=ATOL * scale) & ~(np.isnan(g) & np.isnan(w))
        if bad.any():
            i = tuple(int(j) for j in np.unravel_index(int(np.argmax(bad)), bad.shape))
            return f"output {k}: {int(bad.sum())}/{bad.size} differ, first at {i}: {g[i]} vs {w[i]}"
    return None


def check(seed: int, target: str, precision: str = "fp32", qdq: bool = False) -> tuple[str, str]:
    """(outcome, detail) for one seed on one target. At half precision, and for QDQ graphs, the float outputs
    must agree in cosine; a graph with an arg-max or arg-min is only built and run there (rounding may move the
    index it picks)."""
    import onnxruntime as ort

    import kiln
    from kiln.config import Options
    from kiln.errors import KilnError, UnsupportedError
    from kiln.random_models import QDQ_COSINE, half_precision_mismatch, random_input, random_model

    model, ops = random_model(seed, qdq=qdq)
    x = random_input(model, seed)
    try:
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    except Exception as err:  # noqa: BLE001
        return "invalid", f"onnxruntime: {str(err).splitlines()[0][:200]}"
    options = Options(target=target, shipped_logs=False, precision="fp32" if precision == "int8" else precision)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if precision == "int8":  # calibrated on other inputs; the oracle is the QDQ graph it computes
                from kiln.calibrate import calibrate, quantized_reference
                from kiln.ir import run_module

                cal = calibrate(model, [[random_input(model, seed + 1 + k)] for k in range(3)], options)
                options = options.with_(precision="int8", calibration=cal.table)
                want = run_module(quantized_reference(model, cal.table, options), x)
            report = kiln.compile(model, Path(tmp) / "m.so", options)
            got = kiln.load(report.path).run(x)
            fell = [s for s in report.steps if str(s.get("config_source", "")).startswith("fallback")]
            if fell:  # a template raised and the group got the generic schedule: a template bug, though it runs
                return "fallback", f"{'+'.join(fell[0]['ops'])}: {fell[0]['config_source'][:200]}"
        except UnsupportedError as err:
            return "unsupported", str(err).splitlines()[0][:200]
        except KilnError as err:
            return "error", f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    got = got if isinstance(got, (list, tuple)) else [got]
    if qdq or precision == "int8":
        problem = half_precision_mismatch(got, want, ops, QDQ_COSINE if precision in ("fp32", "int8") else 0.98)
        return ("mismatch", f"{problem} ({' '.join(ops)})") if problem else ("ok", " ".join(ops))
    if precision == "fp32":
        problem = compare(got, want)
        return ("mismatch", f"{problem} ({' '.join(ops)})") if problem else ("ok", " ".join(ops))
    problem = half_precision_mismatch(got, want, ops)
    if problem:
        return "mismatch", f"{problem} ({' '.join(ops)})"
    return "ok", " ".join(ops)


def _run_case(args: tuple[int, str, str, bool]) -> tuple[int, str, str, str]:
    seed, target, precision, qdq = args
    try:
        outcome, detail = check(seed, target, precision, qdq)
    except Exception as err:  # noqa: BLE001  (anything not a KilnError is a Kiln bug: report, go on)
        outcome, detail = "error", f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    return seed, target, outcome, detail


def _worker(conn) -> None:
    while True:
        case = conn.recv()
        if case is None:
            return
        conn.send(_run_case(case))


class Worker:
    """One case at a time in a child process; a case that kills it or outlives `timeout_s` costs only itself."""

    def __init__(self):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()

    def run(self, case: tuple[int, str, str, bool], timeout_s: float) -> tuple[int, str, str, str] | None:
        self.conn.send(case)
        try:
            if self.conn.poll(timeout_s):
                return self.conn.recv()
        except EOFError:
            pass
        return None

    def kill(self) -> str:
        alive = self.proc.is_alive()
        self.proc.kill()
        self.proc.join()
        return "hang" if alive else f"crash (exit {self.proc.exitcode})"

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(5)


def _seeds(spec: str) -> list[int]:
    if ":" in spec:
        a, b = spec.split(":")
        return list(range(int(a), int(b)))
    return [int(s) for s in spec.split(",")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0:100", help="A:B (a range) or a comma-separated list")
    ap.add_argument("--target", default="both", choices=[*TARGETS, "both"])
    ap.add_argument("--minutes", type=float, default=None, help="stop starting new cases after this long")
    ap.add_argument("--keep", type=Path, default=Path("fuzz_failures"), help="write failing models here")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8"],
                    help="compile at this precision; half precision is compared by cosine; int8 calibrates on "
                         "three other inputs and compares with its QDQ graph run by the NumPy interpreter")
    ap.add_argument("--qdq", action="store_true", help="quantize each graph with QDQ pairs (ONNX Runtime's format)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a case may take before it counts as a hang")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line for every case, not only failures")
    args = ap.parse_args(argv)
    seeds = _seeds(args.seeds)
    targets = TARGETS if args.target == "both" else (args.target,)
    cases = [(s, t, args.precision, args.qdq) for s in seeds for t in targets]
    if len(cases) == 1:  # one case: in this process, so a failure shows its whole traceback
        try:
            print(*check(*cases[0]))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        return 0
    deadline = time.monotonic() + args.minutes * 60 if args.minutes else None
    counts: collections.Counter = collections.Counter()
    failures = []
    worker = Worker()
    for case in cases:
        if deadline is not None and time.monotonic() > deadline:
            break
        t0 = time.monotonic()
        result = worker.run(case, args.timeout)
        if result is None:  # the worker died, or the case hung: a new worker for the next case
            result = (*case[:2], worker.kill(), "")
            worker = Worker()
        seed, target, outcome, detail = result
        outcome_kind = outcome.split()[0]
        counts[outcome_kind] += 1
        if outcome_kind not in ("ok", "unsupported", "invalid"):
            failures.append((seed, target, outcome, detail))
        if args.verbose or outcome_kind not in ("ok", "unsupported", "invalid"):
            print(f"seed {seed} {target}: {outcome} ({time.monotonic() - t0:.1f} s): {detail}", flush=True)
        elif sum(counts.values()) % 100 == 0:
            print(f"{sum(counts.values())} cases, last seed {seed}: " +
                  ", ".join(f"{k} {v}" for k, v in counts.most_common()), flush=True)
    worker.close()
    if failures:
        from kiln.random_models import random_model
        args.keep.mkdir(parents=True, exist_ok=True)
        for seed, *_ in failures:
            (args.keep / f"seed{seed}.onnx").write_bytes(random_model(seed, qdq=args.qdq)[0].SerializeToString())
    print(f"{sum(counts.values())} cases: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
