"""Benchmark: one Model shared by several threads. Throughput (runs/s) with 1 caller and with N callers, in
alternating blocks, for Kiln and for one ONNX Runtime session shared the same way; every answer is checked.

    python bench/concurrency.py [--model small_cnn|zoo:NAME] [--callers 2 4 8] [--seconds 1.5] [--blocks 3]

The issue-13 target: 0 wrong answers, and N callers on one Model ≥ 1.5× one caller's throughput on 2 cores
for a small CNN. Ratios are comparable only within one run.
"""

from __future__ import annotations

import argparse
import queue
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def small_cnn():
    """A 32x32 three-conv CNN: small enough that per-run overhead and thread hand-offs show."""
    from onnx import TensorProto, helper

    from kiln.model_builders import GraphBuilder

    g = GraphBuilder("small_cnn", 0)
    x = "data"
    for cin, cout in ((3, 16), (16, 32), (32, 32)):
        x = g.op("Relu", [g.op("Conv", [x, g.weight((cout, cin, 3, 3), cin * 9, "conv.w")], kernel_shape=[3, 3],
                               pads=[1] * 4)])
        x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    y = g.classifier(x, 32, 10)
    return g.model([helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 32, 32])],
                   [(y, TensorProto.FLOAT, [1, 10])])


class Callers:
    """`size` long-lived caller threads, as a server's worker pool: `rate(run, n, ...)` lets the first n of them
    call `run` in a loop for `seconds` and returns runs per second and how many answers differed from `refs`.
    (A new thread per measurement would measure thread start-up and TVM building a worker pool per thread.)"""

    def __init__(self, size: int):
        self._jobs = [queue.SimpleQueue() for _ in range(size)]
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        for q in self._jobs:
            threading.Thread(target=self._work, args=(q,), daemon=True).start()

    def _work(self, jobs: queue.SimpleQueue) -> None:
        while True:
            run, x, ref, stop_at = jobs.get()
            answers = []
            while time.perf_counter() < stop_at:
                answers.append(run(x))
            # every answer is checked, after the clock stops (checking inside the loop would time NumPy)
            wrong = sum(not np.allclose(y, ref, rtol=1e-4, atol=1e-5, equal_nan=True) for y in answers)
            self._done.put((len(answers), wrong))

    def rate(self, run, n: int, feeds: list[np.ndarray], refs: list[np.ndarray], seconds: float) -> tuple[float, int]:
        stop_at = time.perf_counter() + seconds
        for i in range(n):
            self._jobs[i].put((run, feeds[i % len(feeds)], refs[i % len(feeds)], stop_at))
        results = [self._done.get() for _ in range(n)]
        return sum(c for c, _ in results) / seconds, sum(w for _, w in results)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--callers", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--blocks", type=int, default=3)
    args = ap.parse_args(argv)
    import onnx
    import onnxruntime as ort

    import kiln
    from kiln import zoo
    from kiln.model_builders import random_feeds

    model = small_cnn() if args.model == "small_cnn" else zoo.resolve(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.so"
        kiln.compile(model, path)
        m = kiln.load(path)
        proto = onnx.load(model) if isinstance(model, str) else model
        feeds = [random_feeds(proto, seed=s) for s in range(8)]
        name = m.inputs[0].name
        xs = [f[name] for f in feeds]
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        engines = {"kiln": lambda x: m.run(x)[0], "onnxruntime": lambda x: sess.run(None, {name: x})[0]}
        refs = [engines["onnxruntime"](x) for x in xs]
        print(f"{args.model}: {m}; max_concurrency {m.max_concurrency}")
        results: dict[tuple[str, int], list[float]] = {}
        wrong = {k: 0 for k in engines}
        callers = Callers(max(args.callers))
        for _ in range(args.blocks):  # alternate engines and caller counts, so drift hits all of them
            for engine, run in engines.items():
                for n in [1, *args.callers]:
                    time.sleep(0.3)
                    rate, bad = callers.rate(run, n, xs, refs, args.seconds)
                    results.setdefault((engine, n), []).append(rate)
                    wrong[engine] += bad
        for engine in engines:
            one = float(np.median(results[(engine, 1)]))
            cells = "  ".join(f"{n} callers {np.median(results[(engine, n)]):8.0f}/s "
                              f"({np.median(results[(engine, n)]) / one:4.2f}x)" for n in args.callers)
            print(f"{engine:12s} 1 caller {one:8.0f}/s  {cells}  wrong answers {wrong[engine]}")
    return 0 if not any(wrong.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
