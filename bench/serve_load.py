"""Load test of `kiln serve` on loopback: throughput and p50/p99 latency of a small CNN under N concurrent
tritonclient clients, with and without dynamic batching, then a run that hot-swaps versions under load and
counts failed, dropped and wrong answers. Bounded: every phase stops after --duration-s or --max-requests.

    python bench/serve_load.py                 # 32 clients, 10 s per phase, 10 swaps
    python bench/serve_load.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper
from serve_process import start_kiln_serve  # bench/, beside this script

HOST = "127.0.0.1"  # loopback only: this script never talks to another machine
SIZE, CLASSES, HIDDEN = 48, 10, 1024
OUT = "gemm1"


def small_cnn(seed: int):
    """Three 3x3 convs (16, 32, 64 channels; two stride-2) and a 9216→1024→10 classifier: 38 MB of dense
    weights, so batch 1 is memory-bound and batching pays, as with VGG-style heads."""
    from kiln.model_builders import GraphBuilder

    g = GraphBuilder("small_cnn", seed)
    x = "data"
    for cin, cout, stride in [(3, 16, 1), (16, 32, 2), (32, 64, 2)]:
        w = g.weight((cout, cin, 3, 3), cin * 9, "conv.w")
        x = g.op("Relu", [g.op("Conv", [x, w], kernel_shape=[3, 3], strides=[stride, stride], pads=[1] * 4)])
    x = g.op("Flatten", [x], axis=1)
    feat = 64 * (SIZE // 4) ** 2
    for cin, cout, act in [(feat, HIDDEN, True), (HIDDEN, CLASSES, False)]:
        y = g.op("Gemm", [x, g.weight((cout, cin), cin, "fc.w"), g.const(np.zeros(cout, np.float32), "fc.b")],
                 transB=1)
        x = g.op("Relu", [y]) if act else y
    return g.model([helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                   [(x, TensorProto.FLOAT, ["N", CLASSES])])


def build_repo(root: Path, max_batch: int) -> None:
    """cnn_batched and cnn_single share artifacts (copied); cnn_swap has versions 1 and 2 (other weights)."""
    import shutil

    from kiln.repo_builder import add_version

    for seed in (0, 1):
        add_version(small_cnn(seed), root, "cnn_swap", max_batch=max_batch)
    shutil.copytree(root / "cnn_swap" / "1", root / "cnn_batched" / "1")
    shutil.copytree(root / "cnn_swap" / "1", root / "cnn_single" / "1")
    configs = {
        "cnn_batched": {"max_batch_size": max_batch, "max_queue_delay_ms": 2, "max_queue_size": 256},
        "cnn_single": {"max_batch_size": max_batch, "dynamic_batching": False, "max_queue_size": 256},
        "cnn_swap": {"max_batch_size": max_batch, "max_queue_delay_ms": 2, "max_queue_size": 256,
                     "version_policy": {"specific": {"versions": [1]}}},
    }
    for name, cfg in configs.items():
        (root / name / "config.json").write_text(json.dumps(cfg))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(repo: Path, port: int, threads: int | None, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from kiln.cli import main; main()", "serve", str(repo), "--host", HOST,
           "--port", str(port), "--model-control", "explicit", "--log-level", "warning"]  # swaps use the load API
    if threads:
        cmd += ["--threads", str(threads)]
    return start_kiln_serve(cmd, f"{HOST}:{port}", log_path, lambda c: c.is_server_ready(), 120, "become ready")


def run_load(url: str, model: str, clients: int, duration_s: float, max_requests: int,
             expected: dict[str, np.ndarray] | None = None, during=None) -> dict:
    """`clients` threads, each with its own connection, send batch-1 requests back to back."""
    import tritonclient.http as triton

    x = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []
    wrong = [0]
    versions: dict[str, int] = {}
    budget = threading.Semaphore(max_requests)
    stop = threading.Event()
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        client = triton.InferenceServerClient(url, connection_timeout=30, network_timeout=30)
        inp = triton.InferInput("data", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        outputs = [triton.InferRequestedOutput(OUT, binary_data=True)]
        while not stop.is_set() and budget.acquire(blocking=False):
            t0 = time.perf_counter()
            try:
                result = client.infer(model, [inp], outputs=outputs)
            except Exception as err:  # noqa: BLE001  (every failure is counted and reported)
                with lock:
                    failures.append(f"{type(err).__name__}: {err}")
                continue
            latencies[i].append(time.perf_counter() - t0)
            version = result.get_response()["model_version"]
            with lock:
                versions[version] = versions.get(version, 0) + 1
            if expected is not None and not np.allclose(result.as_numpy(OUT), expected[version], rtol=1e-4,
                                                       atol=1e-5):
                with lock:
                    wrong[0] += 1

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    extra = during() if during else None
    while time.perf_counter() - t0 < duration_s and any(t.is_alive() for t in threads):
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(60)
    elapsed = time.perf_counter() - t0
    lat = np.array([v for per in latencies for v in per]) * 1e3
    sent = max_requests - budget._value
    return {"model": model, "clients": clients, "seconds": round(elapsed, 2), "ok": int(lat.size),
            "failed": len(failures), "dropped": sent - int(lat.size) - len(failures), "wrong": wrong[0],
            "throughput_rps": round(lat.size / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
            "versions": versions, "failure_examples": failures[:3], "during": extra}


def metric_sum(url: str, name: str, model: str) -> tuple[float, float]:
    """(sum, count) of a histogram from /metrics, for one model (all versions)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://{url}/metrics", timeout=10).read().decode()
    total = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for part in ("sum", "count"):
            if line.startswith(f"{name}_{part}{{") and f'model="{model}"' in line:
                total[part] += float(line.rsplit(" ", 1)[1])
    return total["sum"], total["count"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration-s", type=float, default=10.0, help="per phase")
    ap.add_argument("--max-requests", type=int, default=100_000, help="per phase")
    ap.add_argument("--swaps", type=int, default=10)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="TVM threads for the server (default: all cores)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()

    import tritonclient.http as triton
    from kiln.runtime.model import load

    with tempfile.TemporaryDirectory(prefix="kiln-serve-load-") as tmp:
        repo = Path(tmp) / "repo"
        t0 = time.perf_counter()
        build_repo(repo, args.max_batch)
        print(f"built repository in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        x = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
        expected = {str(v): load(repo / "cnn_swap" / str(v) / "model_b1.so").run(x)[0] for v in (1, 2)}
        port = free_port()
        url = f"{HOST}:{port}"
        proc = start_server(repo, port, args.threads, Path(tmp) / "server.log")
        results = {"machine": {"cores": os.cpu_count()}, "clients": args.clients, "duration_s": args.duration_s}
        try:
            for name in ("cnn_single", "cnn_batched"):
                run_load(url, name, args.clients, 1.0, args.max_requests)  # warm the connections and caches
                r = run_load(url, name, args.clients, args.duration_s, args.max_requests)
                rows, batches = metric_sum(url, "kiln_batch_size", name)
                r["mean_batch_rows"] = round(rows / batches, 2) if batches else None
                results[name] = r
                print(json.dumps({k: v for k, v in r.items() if k != "during"}), file=sys.stderr)

            admin = triton.InferenceServerClient(url, network_timeout=60)

            def swapper():
                done: list[dict] = []

                def loop() -> None:
                    gap = args.duration_s / (args.swaps + 1)
                    for i in range(args.swaps):
                        time.sleep(gap)
                        version = 2 if i % 2 == 0 else 1
                        s0 = time.perf_counter()
                        admin.load_model("cnn_swap", config=json.dumps(
                            {"version_policy": {"specific": {"versions": [version]}}}))
                        done.append({"to": version, "load_s": round(time.perf_counter() - s0, 3)})

                t = threading.Thread(target=loop, daemon=True)
                t.start()
                return {"swaps": done, "thread": t}

            r = run_load(url, "cnn_swap", args.clients, args.duration_s, args.max_requests, expected, swapper)
            r["during"]["thread"].join(60)
            r["swaps"] = r.pop("during")["swaps"]
            results["hot_swap"] = r
            print(json.dumps(r), file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(30)

    single, batched, swap = results["cnn_single"], results["cnn_batched"], results["hot_swap"]
    print("| run | clients | throughput (req/s) | p50 (ms) | p99 (ms) | mean batch | failed |")
    print("|---|---|---|---|---|---|---|")
    for label, r in (("without batching", single), ("with dynamic batching", batched)):
        print(f"| {label} | {r['clients']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['mean_batch_rows']} | {r['failed']} |")
    print(f"\nbatching: {batched['throughput_rps'] / single['throughput_rps']:.2f}x throughput, p99 "
          f"{batched['p99_ms']} ms vs {single['p99_ms']} ms")
    print(f"hot swap: {len(swap['swaps'])} swaps under load, {swap['ok']} ok, {swap['failed']} failed, "
          f"{swap['dropped']} dropped, {swap['wrong']} wrong answers; answers by version {swap['versions']}; "
          f"{swap['throughput_rps']} req/s, p99 {swap['p99_ms']} ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
