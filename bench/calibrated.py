"""Kiln's own int8 quantization (`kiln calibrate` + `--precision int8`) against ONNX Runtime's, from float models.

For each model: calibration samples and held-out samples (seeded random inputs: the zoo models carry random
weights, so there is no dataset to draw from); ONNX Runtime's `quantize_static` (QDQ, uint8 activations,
per-channel int8 weights, MinMax, the same calibration samples) or, for transformers, `quantize_dynamic`;
Kiln calibrated on the same samples. Accuracy is each int8 model's outputs against ONNX Runtime's float32 ones
on the held-out samples (SQNR in dB, and how many samples keep their top-1 class); speed is the median time
of each engine, float32 and int8, in alternating rounds in this process, with ratios to ONNX Runtime's float32.

    python bench/calibrated.py [--only resnet50 ...] [--method percentile|entropy|minmax] [--samples 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantized import DYNAMIC, int8_kernels, ort_sessions, quantize, time_rounds  # noqa: E402

MODELS = ["mobilenet_v2", "resnet50", "squeezenet", "resnet18", "bert_layer"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--method", default="percentile")
    ap.add_argument("--samples", type=int, default=8, help="calibration samples (ONNX Runtime's too)")
    ap.add_argument("--held-out", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    import onnx

    import kiln
    from kiln import zoo
    from kiln.bench import cpu_name
    from kiln.calibrate import agreement, calibrate
    from kiln.config import Options

    print(f"{cpu_name()}, {args.threads} threads; int8 kernels {int8_kernels()}; "
          f"Kiln calibration: {args.method}, {args.samples} samples; accuracy on {args.held_out} held-out samples "
          f"against ONNX Runtime float32; {args.rounds} rounds")
    print(f"{'model':13s} {'ORT int8 SQNR':>13s} {'top-1':>6s} {'Kiln int8 SQNR':>14s} {'top-1':>6s} "
          f"{'ORT fp32':>9s} {'ORT int8':>9s} {'Kiln fp32':>9s} {'Kiln int8':>9s} {'Kiln int8/ORT fp32':>18s} "
          f"{'/ORT int8':>9s} {'calibrate':>9s}")
    work = Path(tempfile.mkdtemp(prefix="kiln-calibrated-"))
    for name in args.only or MODELS:
        fp32, q = quantize(name, work, per_channel=True, samples=args.samples)
        proto = onnx.load(fp32)
        names = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
        cal = [[zoo.feeds(proto, seed=s)[n] for n in names] for s in range(args.samples)]
        held = [zoo.feeds(proto, seed=1000 + s) for s in range(args.held_out)]
        sess = ort_sessions({"q": q, "f": fp32}, args.threads)
        t0 = time.perf_counter()
        c = calibrate(str(fp32), cal, method=args.method)
        kiln.compile(str(fp32), work / f"{name}.int8.so", Options(precision="int8", calibration=c.table))
        seconds = time.perf_counter() - t0
        kiln.compile(str(fp32), work / f"{name}.fp32.so")
        mods = {k: kiln.load(work / f"{name}.{k}.so", num_threads=args.threads) for k in ("int8", "fp32")}
        outs = [o.name for o in sess["f"].get_outputs()]
        ref = [sess["f"].run(None, h) for h in held]
        acc = {k: agreement(outs, ref, [fn(h) for h in held])[0] for k, fn in
               (("ort", lambda h: sess["q"].run(None, h)), ("kiln", lambda h: mods["int8"].run(**h)))}
        feeds = held[0]
        t = time_rounds({"ort_f": lambda: sess["f"].run(None, feeds), "ort_q": lambda: sess["q"].run(None, feeds),
                         "kiln_f": lambda: mods["fp32"].run(**feeds), "kiln_q": lambda: mods["int8"].run(**feeds)},
                        args.rounds)
        med = {k: float(np.median(v)) for k, v in t.items()}
        r_f = float(np.median(np.array(t["kiln_q"]) / np.array(t["ort_f"])))
        r_q = float(np.median(np.array(t["kiln_q"]) / np.array(t["ort_q"])))

        def top(a):
            return f"{a.top1[0]}/{a.top1[1]}" if a.top1 else "-"

        print(f"{name + ('*' if name in DYNAMIC else ''):13s} {acc['ort'].sqnr_db:10.1f} dB {top(acc['ort']):>6s} "
              f"{acc['kiln'].sqnr_db:11.1f} dB {top(acc['kiln']):>6s} {med['ort_f']:7.2f}ms {med['ort_q']:7.2f}ms "
              f"{med['kiln_f']:7.2f}ms {med['kiln_q']:7.2f}ms {r_f:18.2f} {r_q:9.2f} {seconds:8.0f}s", flush=True)
    print("* ONNX Runtime's int8 model is quantize_dynamic's (activations quantized at run time, as its docs advise "
          "for transformers); Kiln's is calibrated (static)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
