"""Benchmark: how a tuning run's whole-model speed grew with its wall time (issue 14: "95% of the final speed
within 30 minutes").

    python bench/tuning_progress.py zoo:resnet50 tuning_logs/emeraldrapids/resnet50.jsonl --at 5 10 20 30

For each cut-off (minutes after the log's first record) the model is compiled with the best configs of the
records written by then, and all of them, the default and ONNX Runtime are timed in alternating blocks in one
process. Speed is 1 / median run time; "of final" compares with the log's last state (all records).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np

ROUNDS = 5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("log", type=Path)
    ap.add_argument("--at", nargs="*", type=float, default=[5, 10, 20, 30], help="minutes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import onnxruntime as ort
    from kiln.autotune.records import best_configs, read_records
    from kiln.codegen.target import resolve_target
    from kiln.runtime.timing import interleaved_ms

    import kiln
    from kiln.bench import _reference, cpu_name
    from kiln.config import Options

    target = resolve_target("native")
    records = read_records([args.log], target)
    stamp = [datetime.fromisoformat(r.at.replace("Z", "+00:00")).timestamp() for r in records]
    start = min(stamp)
    proto, feeds, sess, _ = _reference(args.model, ort, args.threads)
    cuts = [("default", None), *((f"{m:g} min", m) for m in args.at), ("final", float("inf"))]
    runs, trials = {}, {}
    with tempfile.TemporaryDirectory(prefix="kiln-progress-") as tmp:
        for name, minutes in cuts:
            upto = [r for r, t in zip(records, stamp) if minutes is not None and t - start <= minutes * 60]
            trials[name] = sum(1 for r in upto if not r.extra.get("replay"))
            report = kiln.compile(proto, Path(tmp) / f"{len(runs)}.so",
                                  Options(target="native", shipped_logs=False, configs=best_configs(upto)))
            m = kiln.load(report.path, num_threads=args.threads)
            runs[name] = lambda m=m: m.run(**feeds)
        runs["onnxruntime"] = lambda: sess.run(None, feeds)
        ms = interleaved_ms(runs, max(3, args.repeat // ROUNDS), ROUNDS)
    med = {k: float(np.median(v)) for k, v in ms.items()}
    print(f"{args.model} on {cpu_name()}, {args.threads} threads; log {args.log} ({len(records)} records, "
          f"{(max(stamp) - start) / 60:.1f} min)")
    print("| state | trials | ms | speed of final | / ONNX Runtime |")
    print("|---|---:|---:|---:|---:|")
    for name, _ in cuts:
        print(f"| {name} | {trials[name]} | {med[name]:.2f} | {med['final'] / med[name]:.3f} | "
              f"{med[name] / med['onnxruntime']:.3f} |")
    print(f"| ONNX Runtime | | {med['onnxruntime']:.2f} | | 1.000 |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
