"""Benchmark: Kiln's tuner against TVM MetaSchedule on one conv (ResNet-50's 3x3 64→64 at 56×56, + bias + relu),
at the same trial counts, with the wall time each search took, and ONNX Runtime on the same single-conv model,
all timed in one process.

    python bench/metaschedule_conv.py [--trials 64 256] [--ms-trials 64 256] [--threads 2]

MetaSchedule tunes the NCHW TE compute (topi conv2d_nchw + bias + relu) with its XGBoost cost model, as a TVM user
would (`tune_tir`), and its best kernel is timed alone, warm. Kiln tunes the conv task of a single-conv ONNX model
(candidates timed inside that model) and is timed as the whole compiled model, layout conversions included
(which only counts against Kiln). Trial counts are cumulative: Kiln's run at 256 resumes its run at 64.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

C, H, W, OC, K = 64, 56, 56, 64, 3


def conv_model():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((OC, C, K, K)) * 0.1).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[K, K], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y"], ["z"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, W])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, OC, H, W])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w, b


def metaschedule(trials: int, threads: int, work_dir: str):
    """(wall seconds of the search, the best kernel's runtime Module)."""
    import tvm
    from tvm import te, topi
    from tvm.s_tir import meta_schedule as ms

    x = te.placeholder((1, C, H, W), name="x")
    w = te.placeholder((OC, C, K, K), name="w")
    b = te.placeholder((OC,), name="b")
    y = topi.nn.conv2d_nchw(x, w, 1, 1, 1, out_dtype="float32")
    z = te.compute(y.shape, lambda n, c, i, j: te.max(y[n, c, i, j] + b[c], tvm.tirx.const(0, "float32")), name="z")
    mod = tvm.IRModule({"main": te.create_prim_func([x, w, b, z])})
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                                "num-cores": threads})
    start = time.perf_counter()
    db = ms.tune_tir(mod, target, work_dir, max_trials_global=trials, num_trials_per_iter=16, cost_model="xgb",
                     num_tuning_cores=threads, seed=0)
    sch = ms.tir_integration.compile_tir(db, mod, target)
    took = time.perf_counter() - start
    return took, tvm.compile(sch.mod, target=target)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", nargs="*", type=int, default=[64, 256])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ms-trials", nargs="*", type=int, default=None, help="MetaSchedule's (default: --trials)")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import onnxruntime as ort
    import tvm
    from kiln.autotune.records import best_configs, read_records
    from kiln.autotune.runner import LocalRunner
    from kiln.autotune.tune import TuneOptions, tune
    from kiln.runtime.timing import interleaved_ms

    import kiln
    from kiln.bench import _ort_session, cpu_name
    from kiln.config import Options
    from kiln.driver import model_tasks

    proto, wt, bias = conv_model()
    x = np.random.default_rng(1).standard_normal((1, C, H, W)).astype(np.float32)
    sess = _ort_session(ort, proto, args.threads)
    want = sess.run(None, {"x": x})[0]
    runs, walls, checks = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="kiln-ms-") as tmp:
        tmp = Path(tmp)
        options = Options(target="native", shipped_logs=False)
        default = kiln.compile(proto, tmp / "default.so", options).path
        m = kiln.load(default, num_threads=args.threads)
        runs["Kiln default"] = lambda m=m: m.run(x)
        tasks = [t for t in model_tasks(proto, options) if t.template.name == "x86.conv2d_nchwc"]
        log = tmp / "kiln.jsonl"
        spent = 0.0
        for n in args.trials:
            start = time.perf_counter()
            tune(tasks, log, TuneOptions(trials=n, tuner="xgb", verify_rounds=3), runner=LocalRunner(context=default))
            spent += time.perf_counter() - start
            path = kiln.compile(proto, tmp / f"kiln{n}.so",
                                Options(target="native", shipped_logs=False,
                                        configs=best_configs(read_records([log], tasks[0].target)))).path
            mk = kiln.load(path, num_threads=args.threads)
            runs[f"Kiln {n} trials"], walls[f"Kiln {n} trials"] = (lambda mk=mk: mk.run(x)), spent
            checks[f"Kiln {n} trials"] = float(np.max(np.abs(mk.run(x)[0] - want)))
        dev = tvm.cpu()
        args_tvm = [tvm.runtime.tensor(a, dev) for a in (x, wt, bias)]
        for n in args.trials if args.ms_trials is None else args.ms_trials:
            took, lib = metaschedule(n, args.threads, str(tmp / f"ms{n}"))
            out = tvm.runtime.tensor(np.zeros((1, OC, H, W), np.float32), dev)
            f = lib.jit()["main"] if hasattr(lib, "jit") else lib["main"]
            f(*args_tvm, out)
            checks[f"MetaSchedule {n} trials"] = float(np.max(np.abs(out.numpy() - want)))
            runs[f"MetaSchedule {n} trials"] = lambda f=f, out=out: f(*args_tvm, out)
            walls[f"MetaSchedule {n} trials"] = took
        runs["ONNX Runtime"] = lambda: sess.run(None, {"x": x})
        ms_ = interleaved_ms(runs, 20, warmup=3)
    med = {k: float(np.median(v)) for k, v in ms_.items()}
    print(f"conv {C}→{OC} {K}x{K} {H}x{W} + bias + relu on {cpu_name()}, {args.threads} threads")
    print("| engine | search wall time | run ms | / ONNX Runtime | max abs diff vs ORT |")
    print("|---|---:|---:|---:|---:|")
    for k in runs:
        wall = f"{walls[k]:.0f} s" if k in walls else ""
        diff = f"{checks[k]:.2g}" if k in checks else ""
        print(f"| {k} | {wall} | {med[k]:.3f} | {med[k] / med['ONNX Runtime']:.2f} | {diff} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
