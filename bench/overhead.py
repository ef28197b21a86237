"""Benchmark: what one call costs on a model whose kernel does almost nothing (a single Relu), Kiln's `run`
and `run_into` against ONNX Runtime's `InferenceSession.run`, timed in alternating blocks in one process.

    python bench/overhead.py [--size 64] [--calls 20000] [--blocks 5]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--blocks", type=int, default=5)
    args = ap.parse_args(argv)
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
