"""Benchmark: a model run while another process keeps one of its cores busy, as on a server beside other work
or a shared CI host. Kiln with its own pool (codegen/pool.py), Kiln with TVM's pool (KILN_THREAD_POOL=tvm) and
ONNX Runtime, 2 threads each, timed in alternating blocks in one process, first on quiet cores, then with a
spinning process pinned to the core TVM pinned its worker to.

    python bench/busy_core.py [--models shufflenet mobilenet_v2 resnet50] [--runs 5] [--blocks 5]

Needs two usable cores. Ratios are comparable only within one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def tvm_worker_core() -> int | None:
    """The core TVM's pool pinned its one worker to (a thread of this process allowed on exactly one core)."""
    pinned = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/status") as f:
            line = next(ln for ln in f if ln.startswith("Cpus_allowed_list"))
        cpus = line.split()[1]
        if cpus.isdigit():
            pinned.add(int(cpus))
    return pinned.pop() if len(pinned) == 1 else None


def blocks_ms(engines: dict, runs: int, blocks: int) -> dict[str, float]:
    """Median ms per run of each engine over `blocks` alternating blocks, after one untimed round (the first
    block after a compile or a change of load ran up to 2x slow for every engine)."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for b in range(blocks + 1):
        for name, fn in engines.items():
            t = time.perf_counter()
            for _ in range(runs):
                fn()
            if b:
                times[name].append((time.perf_counter() - t) / runs * 1e3)
            time.sleep(0.3)  # two spinning pools distort each other: let one go quiet first
    return {name: float(np.median(v)) for name, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["shufflenet", "mobilenet_v2", "resnet50"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=5)
    args = ap.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("needs two usable cores")
        return 1
    os.sched_setaffinity(0, set(cpus[:2]))
    os.environ["TVM_NUM_THREADS"] = "2"
    import onnxruntime as ort

    import kiln
    from kiln.zoo import feeds, resolve

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            proto = resolve(f"zoo:{name}")
            x = feeds(proto, seed=0)
            path = kiln.compile(proto, Path(tmp) / f"{name}.so").path
            os.environ["KILN_THREAD_POOL"] = "tvm"
            tvms = kiln.load(path, num_threads=2)
            del os.environ["KILN_THREAD_POOL"]
            ours = kiln.load(path, num_threads=2)
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
            sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
            engines = {"kiln": lambda: ours.run(**x), "kiln (TVM's pool)": lambda: tvms.run(**x),
                       "onnxruntime": lambda: sess.run(None, x)}
            for fn in engines.values():
                fn()
            core = tvm_worker_core()
            quiet = blocks_ms(engines, args.runs, args.blocks)
            busy_at = core if core is not None else cpus[1]
            spin = subprocess.Popen([sys.executable, "-c",
                                     f"import os\nos.sched_setaffinity(0, {{{busy_at}}})\nwhile True: pass"])
            try:
                time.sleep(0.5)
                busy = blocks_ms(engines, args.runs, args.blocks)
            finally:
                spin.kill()
            print(f"{name}: core {busy_at} busy (TVM's worker pinned to {core})")
            for engine in engines:
                print(f"  {engine:18s} quiet {quiet[engine]:8.2f} ms ({quiet[engine] / quiet['onnxruntime']:.2f}x ORT)"
                      f"   busy core {busy[engine]:8.2f} ms ({busy[engine] / busy['onnxruntime']:.2f}x ORT)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
