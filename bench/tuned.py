"""Benchmark: tuned against untuned against ONNX Runtime, in one process (issue 14's targets).

    python bench/tuned.py [--only resnet50 mobilenet_v2 bert_layer] [--tuning-log FILE ...] [--threads 2]
                          [--rounds 9]

Ratios are medians of per-round ratios (each block of Kiln against the ONNX Runtime block beside it, --rounds
rounds of at least 0.25 s a block), with their quartiles in parentheses. Tuned means the logs shipped in
tuning_logs/<cpu>/ for this machine's CPU (and any --tuning-log); untuned means every kernel at its template's
default config. Ratios are comparable only within one run: on the loaded Zen 5 VM of 2026-12-03 ResNet-50's
tuned ratio read 0.88, 0.92 and 0.99 in three runs within 30 minutes, 21 rounds no steadier than 9.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

MODELS = ["resnet50", "mobilenet_v2", "bert_layer", "squeezenet", "shufflenet"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--tuning-log", nargs="*", type=Path, default=[])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=9, help="alternating rounds behind each ratio")
    args = ap.parse_args(argv)
    from kiln.bench import compare_tuned, cpu_name

    print(f"{cpu_name()}, {args.threads} threads for every engine")
    ok = True
    for name in args.only or MODELS:
        r = compare_tuned(f"zoo:{name}", repeat=args.repeat, threads=args.threads,
                          tuning_logs=tuple(args.tuning_log), rounds=args.rounds)
        m, q = r["median_ms"], r["ratio_quartiles"]
        print(f"{name:14s} default {m['default']:8.2f} ms  tuned {m['tuned']:8.2f} ms  ort {m['onnxruntime']:8.2f} ms"
              f"  default/ort {r['default_ratio']:5.2f}x ({q['default'][0]:.2f}-{q['default'][1]:.2f})"
              f"  tuned/ort {r['tuned_ratio']:5.2f}x ({q['tuned'][0]:.2f}-{q['tuned'][1]:.2f})  "
              f"({r['tuned_kernels']}/{r['kernels']} kernels configured by a log)  match {r['match']}", flush=True)
        ok &= r["match"]
        time.sleep(1.0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
