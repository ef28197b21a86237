"""Kiln against ONNX Runtime on one model, in one process: the numbers `kiln bench` and bench/ print.

Both engines get the same thread count. They are timed in alternating blocks (Kiln, ONNX Runtime, Kiln, ...), so
a slow stretch of the machine hits both; a pause between blocks lets one engine's spinning thread pool go idle,
so it does not steal cycles from the other on a small machine. The ratio is of the medians over all blocks; the
per-round ratios give its spread.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kiln.runtime.timing import interleaved_ms, ratios_by_round, runs_per_block, time_ms

PAUSE_S = 0.5
ROUNDS = 5
TUNED_ROUNDS = 9  # compare_tuned: blocks of at least 0.25 s each (runs_per_block), ratios per round


def _summary(ms: list[float]) -> dict:
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "runs": len(ms)}


def _ort_session(ort, proto, threads: int):
    """ONNX Runtime on the CPU with `threads` intra-op threads, as Kiln gets."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _reference(model: str, ort, threads: int):
    """(model proto, seeded feeds, ONNX Runtime session, its outputs) for a model path or zoo name."""
    import onnx

    from kiln import zoo

    proto = zoo.resolve(model)
    proto = proto if isinstance(proto, onnx.ModelProto) else onnx.load(proto)
    feeds = zoo.feeds(proto, seed=0)
    sess = _ort_session(ort, proto, threads)
    return proto, feeds, sess, sess.run(None, feeds)


def compare(model: str, target: str = "native", repeat: int = 20, threads: int = 2,
            on_progress: Callable[[int, int], None] | None = None, tuning_logs: tuple = (),
            precision: str = "fp32", calibration: str | Path | None = None) -> dict:
    """`precision="int8"` quantizes with `calibration` (a `kiln calibrate` table, or sample inputs), else with
    ranges calibrated on 4 seeded random inputs: a speed measurement, whose accuracy says nothing of real data;
    the result then carries the int8 build's SQNR against ONNX Runtime's float32 outputs."""
    import os

    os.environ["TVM_NUM_THREADS"] = str(threads)  # before TVM's thread pool starts

    try:
        import onnxruntime as ort
    except ImportError:
        from kiln.errors import KilnError

        raise KilnError("kiln bench compares against ONNX Runtime: pip install 'kiln[bench]'") from None

    import kiln
    from kiln.config import Options

    proto, feeds, sess, want = _reference(model, ort, threads)
    options = Options(target=target, tuning_logs=tuple(tuning_logs))
    calibrated_on = None
    if precision == "int8":
        from kiln.calibrate import CalibrationTable, calibrate
        from kiln.zoo import feeds as seeded

        if calibration is not None and Path(calibration).suffix == ".json":
            table, calibrated_on = CalibrationTable.load(calibration), str(calibration)
        else:
            names = list(feeds)
            data = calibration if calibration is not None else [
                [seeded(proto, seed=s)[n] for n in names] for s in range(1, 5)]
            table = calibrate(proto, data, options).table
            calibrated_on = str(calibration) if calibration is not None else "4 seeded random inputs"
        options = options.with_(precision="int8", calibration=table)
    else:
        options = options.with_(precision=precision)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        report = kiln.compile(proto, Path(tmp) / "model.so", options, on_progress=on_progress)
        compiled = kiln.load(report.path, num_threads=threads)
        got = compiled.run(**feeds)
        per_block = max(3, -(-repeat // ROUNDS))
        kiln_ms: list[float] = []
        ort_ms: list[float] = []
        rounds = []
        for _ in range(ROUNDS):
            time.sleep(PAUSE_S)
            k = time_ms(lambda: compiled.run(**feeds), per_block, 2)
            time.sleep(PAUSE_S)
            o = time_ms(lambda: sess.run(None, feeds), per_block, 2)
            kiln_ms += list(k)
            ort_ms += list(o)
            rounds.append(float(np.median(k) / np.median(o)))
    kiln_t, ort_t = _summary(kiln_ms), _summary(ort_ms)
    err = max(float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))) for g, w in zip(got, want))
    match = all(np.allclose(g, w, rtol=1e-3, atol=1e-4) for g, w in zip(got, want))
    return {"model": model, "match": match, "compile_s": report.total_s, "kernels": report.kernels, "kiln": kiln_t,
            "onnxruntime": ort_t, "ratio": kiln_t["median_ms"] / ort_t["median_ms"], "max_abs_error": err,
            "ratio_range": [min(rounds), max(rounds)],
            "threads": threads, "precision": precision, "calibrated_on": calibrated_on,
            "sqnr_db": _sqnr(got, want)}


def _sqnr(got, want) -> float:
    """Of the first output: 10·log10(Σ want² / Σ (want − got)²)."""
    g, w = np.asarray(got[0], np.float64), np.asarray(want[0], np.float64)
    noise = float(np.sum((w - g) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(max(float(np.sum(w * w)), 1e-300) / noise))


def cpu_name() -> str:
    from kiln.autotune.records import cpu_name as name

    return name()


def compare_tuned(model: str, target: str = "native", repeat: int = 20, threads: int = 2,
                  tuning_logs: tuple = (), rounds: int = TUNED_ROUNDS) -> dict:
    """Kiln with default configs, Kiln tuned (the shipped logs for the target's CPU and `tuning_logs`) and ONNX
    Runtime on one model, timed in alternating blocks in one process."""
    import os

    os.environ["TVM_NUM_THREADS"] = str(threads)
    import onnxruntime as ort

    import kiln
    from kiln.config import Options

    proto, feeds, sess, want = _reference(model, ort, threads)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        plain = kiln.compile(proto, Path(tmp) / "default.so", Options(target=target, shipped_logs=False))
        tuned = kiln.compile(proto, Path(tmp) / "tuned.so", Options(target=target, tuning_logs=tuple(tuning_logs)))
        engines = {"default": kiln.load(plain.path, num_threads=threads),
                   "tuned": kiln.load(tuned.path, num_threads=threads)}
        runs = {name: (lambda m=m: m.run(**feeds)) for name, m in engines.items()}
        runs["onnxruntime"] = lambda: sess.run(None, feeds)
        got = {name: engines[name].run(**feeds) for name in engines}
        per_block = runs_per_block(runs["onnxruntime"], max(3, -(-repeat // rounds)))
        ms = interleaved_ms(runs, per_block, rounds, pause_s=PAUSE_S)
    med = {name: float(np.median(v)) for name, v in ms.items()}
    ratios = ratios_by_round(ms, rounds, "onnxruntime")
    match = all(np.allclose(g, w, rtol=1e-3, atol=1e-4) for name in got for g, w in zip(got[name], want))
    return {"model": model, "threads": threads, "match": match, "median_ms": med,
            "tuned_kernels": sum(1 for s in tuned.steps if s.get("config_source") == "given"),
            "kernels": tuned.kernels, "default_ratio": float(np.median(ratios["default"])),
            "tuned_ratio": float(np.median(ratios["tuned"])), "speedup": med["default"] / med["tuned"],
            "ratio_quartiles": {name: [float(np.percentile(r, 25)), float(np.percentile(r, 75))]
                                for name, r in ratios.items()},
            "runs_per_block": per_block, "rounds": rounds}
