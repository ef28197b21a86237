"""Per-layer benchmark: every distinct conv shape of ResNet-50 (or --model), each algorithm Kiln has for it,
against ONNX
Runtime running a model of that single Conv (+ bias + Relu, as fused in the network), and the machine's sgemm
peak (NumPy's BLAS, 2048^3), all measured in one run.

    python bench/conv_layers.py [--model resnet50] [--threads 2] [--only 3x3] [--cold] [--rounds 7]
                                [--tuning-log FILE ...] [--write docs/conv_layers.md]

With --tuning-log, a "tuned" column times each shape at its log's best config (the record of the same conv
dims: a conv fused with a residual add shares its shape's config), as `kiln compile --tuning-log` builds it.

GFLOPS count the direct conv's multiply-adds as two flops for every algorithm, so a Winograd kernel can exceed
the machine's peak. `--cold` flushes the caches before every Kiln call of the per-algorithm columns (as a model
run sees its weights).

The ratios (best/ORT: the fastest algorithm of the row; tuned/ORT) are not quotients of those columns: Kiln's
kernel and ONNX Runtime run in alternating blocks of at least 0.25 s, both warm, and each cell is the median of
the rounds' own ratios with their quartiles. On a shared VM single timings taken seconds apart drifted by 30-60%
(a tuned config read 1.64x ONNX Runtime that way on 2026-12-02), which the per-round ratio cancels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


def model_convs(name: str = "resnet50"):
    from kiln.frontend import from_onnx
    from kiln.ir import Call
    from kiln.ir.ops.conv import CONV2D
    from kiln.ir.visitor import post_order
    from kiln.passes import O2, alter_layout, run
    from kiln.schedules.choose import ConvWorkload

    from kiln import zoo

    passes = O2[: O2.index(alter_layout)]
    mod = run(from_onnx(zoo.zoo_model(name)), passes)
    seen: dict[ConvWorkload, int] = {}
    for e in post_order(mod.main.body):
        if isinstance(e, Call) and e.op is CONV2D:
            x, w, a = e.args[0].ttype.shape, e.args[1].ttype.shape, e.attrs
            wl = ConvWorkload(
                x[0],
                x[1],
                x[2],
                x[3],
                w[0],
                w[2],
                w[3],
                tuple(a.strides),
                tuple(a.padding),
                tuple(a.dilation),
                a.groups,
            )
            seen[wl] = seen.get(wl, 0) + 1
    return seen


def ort_conv_run(wl, threads: int):
    """A callable running ONNX Runtime on a model of the conv (+ bias + Relu) alone, warmed up."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((wl.oc, wl.c // wl.groups, wl.kh, wl.kw)) * 0.1).astype(np.float32)
    b = rng.standard_normal(wl.oc).astype(np.float32)
    p = wl.padding
    conv = helper.make_node(
        "Conv",
        ["x", "w", "b"],
        ["y"],
        kernel_shape=[wl.kh, wl.kw],
        strides=list(wl.strides),
        pads=[p[0], p[1], p[2], p[3]],
        dilations=list(wl.dilation),
        group=wl.groups,
    )
    relu = helper.make_node("Relu", ["y"], ["z"])
    graph = helper.make_graph(
        [conv, relu],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [wl.n, wl.c, wl.h, wl.w])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(
        onnx._serialize(model) if hasattr(onnx, "_serialize") else model.SerializeToString(),
        so,
        providers=["CPUExecutionProvider"],
    )
    x = rng.standard_normal((wl.n, wl.c, wl.h, wl.w)).astype(np.float32)
    for _ in range(5):
        sess.run(None, {"x": x})
    return lambda: sess.run(None, {"x": x})


def _tuned_by_dims(logs, target) -> dict:
    """Workload dims -> (key, best config), from the logs' best records."""
    from kiln.autotune.records import best_records, read_records

    return {r.workload.dims: (r.key, dict(r.config)) for r in best_records(read_records(logs, target)).values()}


def _tuned_config(wl, tuned: dict, target, lanes: int):
    """(workload key of this benchmark's conv group, the log's config for its dims) or (key, None)."""
    from kiln.autotune.measure import conv_group, conv_module
    from kiln.schedules.choose import choose
    from kiln.schedules.dispatch import task_of

    _, workload = task_of(conv_group(conv_module(wl, choose(wl, lanes).algorithm, lanes)).op, target)
    found = tuned.get(workload.dims)
    return workload.key, (found[1] if found else None)


def _ratio_cell(r) -> str:
    """A per-round median ratio with its quartiles."""
    return f"{r[0]:.2f} ({r[1]:.2f}–{r[2]:.2f})"


def sgemm_peak(n: int = 2048) -> float:
    a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50", help="a zoo model name (kiln zoo lists them)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="only kernels of this size, e.g. 3x3")
    ap.add_argument("--cold", action="store_true", help="flush caches before every Kiln call")
    ap.add_argument("--write", type=Path, default=None, help="also write the table as Markdown here")
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds behind each ratio")
    ap.add_argument("--tuning-log", nargs="*", type=Path, default=[], help="records: add a tuned column")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM's pool starts
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)

    from kiln.autotune.measure import conv_kernel, time_conv
    from kiln.codegen.target import resolve_target
    from kiln.runtime.timing import interleaved_ms, ratios_by_round, runs_per_block
    from kiln.schedules.choose import candidates, choose
    from kiln.schedules.target_info import vector_lanes

    from kiln.bench import cpu_name

    target = resolve_target("native")
    lanes = vector_lanes(target, 32)
    peak = sgemm_peak()
    algos = ["direct", "im2col", "winograd2", "winograd4"]
    tuned = _tuned_by_dims(args.tuning_log, target) if args.tuning_log else None
    header = ["layer", "count", "GFLOP", *algos, "ORT", "best/ORT", "model picks"]
    header += ["tuned", "tuned/ORT", "tuned config"] if tuned is not None else []
    rows = []
    print(
        f"# {cpu_name()}, {args.threads} threads; sgemm peak (NumPy BLAS) {peak:.0f} GFLOPS; values in GFLOPS"
        f"{' (Kiln cold)' if args.cold else ''}",
        flush=True,
    )
    for wl, count in model_convs(args.model).items():
        if args.only and f"{wl.kh}x{wl.kw}" != args.only:
            continue
        gflop = wl.flops / 1e9
        kiln_ms = {
            a: time_conv(wl, a, target, lanes, cold=args.cold)[0] for a in candidates(wl) if a in algos
        }
        best_algo = min(kiln_ms, key=kiln_ms.get)
        runs = {"ort": ort_conv_run(wl, args.threads), "best": conv_kernel(wl, best_algo, target, lanes)[0]}
        cfg = None
        if tuned is not None:
            key, cfg = _tuned_config(wl, tuned, target, lanes)
            if cfg is not None:
                runs["tuned"] = conv_kernel(wl, cfg.get("algorithm", choose(wl, lanes).algorithm), target, lanes,
                                            configs={key: cfg})[0]
        # the ratios: Kiln's blocks alternating with ONNX Runtime's (warm, both), each round's own ratio
        per_block = runs_per_block(runs["ort"], 5)
        ms = interleaved_ms(runs, per_block, args.rounds)
        ratio = {name: (np.median(r), *np.percentile(r, [25, 75]))
                 for name, r in ratios_by_round(ms, args.rounds, "ort").items()}
        ort_ms = float(np.median(ms["ort"]))
        extra = []
        if tuned is not None:
            if cfg is None:
                extra = ["", "", "no record"]
            else:
                extra = [f"{gflop / (np.median(ms['tuned']) / 1e3):.0f}", _ratio_cell(ratio["tuned"]),
                         ", ".join(f"{k}={v}" for k, v in cfg.items())]
        row = [
            f"{wl.c}x{wl.h}x{wl.w} → {wl.oc}, {wl.kh}x{wl.kw}/{wl.strides[0]}",
            str(count),
            f"{gflop:.3f}",
            *[f"{gflop / (kiln_ms[a] / 1e3):.0f}" if a in kiln_ms else "" for a in algos],
            f"{gflop / (ort_ms / 1e3):.0f}",
            _ratio_cell(ratio["best"]),
            choose(wl, lanes).algorithm,
            *extra,
        ]
        rows.append(row)
        print("  ".join(row), flush=True)
    if args.write:
        lines = [
            f"Per-layer conv benchmark of {args.model}: {cpu_name()}, {args.threads} threads; "
            f"sgemm peak {peak:.0f} GFLOPS "
            f"(NumPy BLAS, 2048³). GFLOPS of each Kiln algorithm"
            f"{' (caches flushed before each call)' if args.cold else ''}, of ONNX Runtime on a single "
            "Conv+Relu model of the same shape; best/ORT and tuned/ORT are time ratios (lower is better), "
            f"medians of {args.rounds} alternating rounds' own ratios (quartiles in parentheses).",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        args.write.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
