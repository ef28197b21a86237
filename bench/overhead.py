"""Benchmark: what one call costs on a model whose kernel does almost nothing (a single Relu), Kiln's `run`
and `run_into` against ONNX Runtime's `InferenceSession.run`, timed in alternating blocks in one process.

    python bench/overhead.py [--size 64] [--calls 20000] [--blocks 5]
    python bench/overhead.py --model shufflenet [--runs 400]

With `--model`, what `run` adds to the native entry function on a real model, where every call follows a run
whose kernels have pushed the interpreter and NumPy out of the caches: the entry alone, `run` with the same
array, with another array, and with inputs by name, called in a shuffled order each round; each variant's
median difference to the entry call beside it. On a Relu model, called back to back, the same Python costs a
few µs; after a ShuffleNet run, before the run path was trimmed (Zen 5, 2026-12-02, two runs each): same array
32-54 µs, by name 71-88 µs; after, 3-19 and 8 µs (another array each call: 31-34 µs either way).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def relu_model(size: int):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def after_runs(model: str, runs: int) -> None:
    import random

    import kiln

    from kiln.zoo import zoo_model

    source = zoo_model(model.split(":", 1)[1]) if model.startswith("zoo:") else model
    with tempfile.TemporaryDirectory() as tmp:
        m = kiln.load(kiln.compile(source, Path(tmp) / "model.so").path)
        xs = [m.empty_inputs(), m.empty_inputs()]
        for feeds in xs:
            for x in feeds:
                x[...] = np.random.default_rng(0).standard_normal(x.shape)
        named = {t.name: x for t, x in zip(m.inputs, xs[0])}
        m.run(*xs[0])
        ctx = m._acquire()  # the entry alone, on a context of its own, bound to the same input
        m._execute(ctx, xs[0], None)
        entry, table = m._entry, ctx.table_tensor
        calls = {"entry alone": lambda: entry(table), "run, same array": lambda: m.run(*xs[0]),
                 "run, other array": lambda: m.run(*xs[1]), "run, by name": lambda: m.run(**named)}
        ms: dict[str, list[float]] = {k: [] for k in calls}
        order = list(calls)
        for _ in range(runs):
            random.shuffle(order)
            for name in order:
                t0 = time.perf_counter_ns()
                calls[name]()
                ms[name].append((time.perf_counter_ns() - t0) / 1e6)
        m._release(ctx)
    base = np.array(ms["entry alone"])
    print(f"{model}: {len(m.meta['steps'])} kernels, {runs} shuffled rounds")
    for name, v in ms.items():
        v = np.array(v)
        print(f"  {name:18s} {np.median(v):7.3f} ms   {np.median(v - base) * 1000:+7.1f} µs against the entry")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--model", default=None, help="zoo:<name> or an .onnx file: the cost after real runs")
    ap.add_argument("--runs", type=int, default=400)
    args = ap.parse_args(argv)
    if args.model:
        after_runs(args.model if ":" in args.model or args.model.endswith(".onnx") else f"zoo:{args.model}",
                   args.runs)
        return 0
    import onnxruntime as ort

    import kiln

    model = relu_model(args.size)
    x = np.random.default_rng(0).standard_normal((1, args.size)).astype(np.float32)
    y = np.empty_like(x)
    with tempfile.TemporaryDirectory() as tmp:
        m = kiln.load(kiln.compile(model, Path(tmp) / "relu.so").path)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        calls = {"kiln run": lambda: m.run(x), "kiln run_into": lambda: m.run_into([y], x),
                 "onnxruntime run": lambda: sess.run(None, {"x": x})}
        assert np.array_equal(m.run(x)[0], sess.run(None, {"x": x})[0])
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(args.blocks):
            for name, fn in calls.items():
                time.sleep(0.2)
                per_call_us(fn, args.calls // 10)  # warm
                times[name].append(per_call_us(fn, args.calls))
    ort_us = float(np.median(times["onnxruntime run"]))
    print(f"one Relu on float32[1, {args.size}], median of {args.blocks} blocks of {args.calls} calls:")
    for name, ts in times.items():
        med = float(np.median(ts))
        print(f"  {name:16s} {med:6.2f} µs per call  ({med / ort_us:4.2f}x ONNX Runtime; blocks "
              f"{min(ts):.2f}-{max(ts):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
