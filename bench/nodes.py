"""Node by node against ONNX Runtime: each of Kiln's kernels in a whole run beside the ONNX Runtime nodes it
replaces, both profiled in sequence (cold weights, as a model run meets them), in alternating rounds.

    python bench/nodes.py [--model resnet50] [--tuning-log FILE ...] [--rounds 7] [--threads 2] [--top 25]

Kiln's side: the entry function stamps the clock between kernels (`Model.stamped_runs`). ONNX Runtime's side:
its profiler's per-node kernel times, split into runs by its `model_run` events. Each kernel is matched, in
execution order, to the first unmatched ONNX Runtime node of the same kind (conv, pool, matmul, or the op's
name) with an output of as many elements and, for convs, the same kernel window; ONNX Runtime's nodes left
over (its reorders, and the concats Kiln writes in place) are listed per op type.

Each ratio is the median over rounds of that round's Kiln median over ONNX Runtime's: a whole model's run
drifts by 30-60% within minutes on a shared VM, which the per-round ratio cancels. ONNX Runtime's profiler
slows it (ResNet-50 on 2 cores: nodes summing to 26.1 ms in runs that take 22.8 ms unprofiled), so each
round's node times are scaled by that round's unprofiled run over the profiled nodes' sum, which assumes the
profiler's cost is proportional to a node's time; the totals line prints both.

The totals line's per-round ratio is not the whole-model benchmark: on the Zen 5 VM of 2026-12-03 it read
0.72-0.85 where `bench/tuned.py`, timing `run` against a single ONNX Runtime session, read 0.81-0.94 in the
same hour (docs/tuning.md). Quote bench/tuned.py for whole-model ratios; this script is for the columns.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PAUSE_S = 0.5


def _kind(op: str) -> str:
    op = op.lower()
    for kind, marks in (("conv", ("conv",)), ("pool", ("pool",)), ("matmul", ("matmul", "gemm", "dense"))):
        if any(m in op for m in marks):
            return kind
    return op.rsplit(".", 1)[-1]


def kiln_key(step: dict, values: list[dict]) -> tuple:
    """(kind, output elements, conv window) of a kernel: the anchor op's kind, its last argument's size (the
    output), and 9 for a Winograd conv or kh * kw of a blocked conv's weights."""
    ops = step.get("ops", [])
    anchor = next((o for o in ops if _kind(o) in ("conv", "pool", "matmul")), ops[0] if ops else "")
    kind = _kind(anchor)
    args = [values[i] for i in step["args"]]
    window = 0
    if kind == "conv":
        if "winograd" in anchor:
            window = 9
        else:
            w = next((a["shape"] for a in args if a["kind"] == "const" and len(a["shape"]) == 6), None)
            window = w[2] * w[3] if w else 0
    return kind, int(np.prod(args[-1]["shape"])), window


def ort_key(op: str, args: dict) -> tuple:
    kind = _kind(op)
    out = args.get("output_type_shape") or [{}]
    numel = int(np.prod(next(iter(out[0].values()), [0])))
    window = 0
    if kind == "conv":
        ins = args.get("input_type_shape") or []
        w = next(iter(ins[1].values()), []) if len(ins) > 1 else []
        window = int(np.prod(w[2:])) if len(w) == 4 else 0
    return kind, numel, window


def _same_size(a: int, b: int) -> bool:
    """Equal up to channel padding: Kiln and ONNX Runtime both pad 1000 classes to 1008 in blocked layouts, but
    not always at the same node, and Kiln pads a 1x1 conv's channels to whole AVX2 tiles (at most 1/32 more:
    1000 → 1024, passes/alter_layout.py)."""
    return a == b or (min(a, b) > 0 and abs(a - b) / max(a, b) < 0.035)


def match(kiln_keys: list[tuple], ort_nodes: list[tuple[str, tuple]]) -> dict[str, int]:
    """ORT node name → index of the Kiln kernel it is matched to (see the module's docstring)."""
    owner: dict[str, int] = {}
    for k, key in enumerate(kiln_keys):
        for name, okey in ort_nodes:
            if name not in owner and okey[0] == key[0] and _same_size(okey[1], key[1]) \
                    and (not key[2] or not okey[2] or okey[2] == key[2]):
                owner[name] = k
                break
    return owner


def ort_runs(events: list[dict], skip: int) -> list[dict[str, tuple[str, float, tuple]]]:
    """One dict per profiled run after the first `skip`, in execution order: node name → (op type,
    milliseconds, `ort_key`)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[skip:]
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    out: list[dict[str, tuple[str, float, tuple]]] = []
    i = 0
    for r in runs:
        start, end = r["ts"], r["ts"] + r["dur"]
        row: dict[str, tuple[str, float, tuple]] = {}
        while i < len(nodes) and nodes[i]["ts"] < start:
            i += 1
        while i < len(nodes) and nodes[i]["ts"] <= end:
            e = nodes[i]
            name = e["name"][: -len("_kernel_time")]
            op, ms = e["args"].get("op_name", "?"), e["dur"] / 1e3
            row[name] = (op, row.get(name, (op, 0.0))[1] + ms, ort_key(op, e["args"]))
            i += 1
        out.append(row)
    return out


def compare(steps: list[dict], values: list[dict], kiln_rounds: list[np.ndarray],
            ort_all: list[dict[str, tuple[str, float, tuple]]], plain_ms: list[float]) -> dict:
    """Per kernel: Kiln's and its matched nodes' medians over rounds and the median of the per-round ratios.
    `kiln_rounds[i]` is round i's runs × kernels (`Model.stamped_runs`); `ort_all` holds the rounds' profiled
    runs in order, as many a round as Kiln's; `plain_ms[i]` is round i's unprofiled run."""
    rounds = len(kiln_rounds)
    runs = len(ort_all) // rounds
    names = list(dict.fromkeys(n for row in ort_all for n in row))  # execution order
    first = {n: next(row[n] for row in ort_all if n in row) for n in names}
    owner = match([kiln_key(s, values) for s in steps], [(n, first[n][2]) for n in names])
    k_med = np.array([np.median(r, axis=0) for r in kiln_rounds])  # rounds × kernels
    o_raw = np.array([[np.median([row[n][1] if n in row else 0.0 for row in ort_all[i * runs:(i + 1) * runs]])
                       for n in names] for i in range(rounds)])  # rounds × nodes
    o_med = o_raw * (np.array(plain_ms) / o_raw.sum(axis=1))[:, None]  # the profiler's cost taken out
    rows = []
    for k, step in enumerate(steps):
        cols = [j for j, n in enumerate(names) if owner.get(n) == k]
        kiln_ms, ort_ms = k_med[:, k], o_med[:, cols].sum(axis=1)
        rows.append({"kernel": step["kernel"], "ops": "+".join(step.get("ops", [])),
                     "algorithm": step.get("config", {}).get("algorithm", ""),
                     "kiln_ms": float(np.median(kiln_ms)), "ort_ms": float(np.median(ort_ms)),
                     "ort_ops": ",".join(sorted({first[names[j]][0] for j in cols})),
                     "ratio": float(np.median(kiln_ms / ort_ms)) if cols and ort_ms.min() > 0 else float("nan")})
    unmatched: dict[str, float] = collections.defaultdict(float)
    for j, n in enumerate(names):
        if n not in owner:
            unmatched[first[n][0]] += float(np.median(o_med[:, j]))
    return {"rows": rows, "unmatched": dict(unmatched), "nodes": len(names), "kiln_total": k_med.sum(axis=1),
            "ort_total": o_med.sum(axis=1), "ort_raw": o_raw.sum(axis=1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50", help="a zoo name (kiln zoo lists them) or an .onnx path")
    ap.add_argument("--tuning-log", nargs="*", type=Path, default=[])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=0, help="runs per block (default: blocks of about 0.25 s)")
    ap.add_argument("--top", type=int, default=25, help="rows to print, largest Kiln-minus-ORT first")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import onnx
    import onnxruntime as ort

    import kiln
    from kiln import zoo
    from kiln.bench import cpu_name
    from kiln.config import Options
    from kiln.runtime.timing import runs_per_block

    source = args.model if args.model.endswith(".onnx") else f"zoo:{args.model}"
    proto = zoo.resolve(source)
    proto = proto if isinstance(proto, onnx.ModelProto) else onnx.load(proto)
    feeds = zoo.feeds(proto, seed=0)
    with tempfile.TemporaryDirectory(prefix="kiln-nodes-") as tmp:
        report = kiln.compile(proto, Path(tmp) / "model.so", Options(target="native",
                                                                     tuning_logs=tuple(args.tuning_log)))
        model = kiln.load(report.path, num_threads=args.threads)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        plain = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        profiled = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        x = [feeds[t.name] for t in model.inputs]
        runs = args.runs or runs_per_block(lambda: plain.run(None, feeds), 5)
        warm = 3
        for _ in range(warm):
            profiled.run(None, feeds)
        kiln_rounds, plain_ms = [], []
        for _ in range(args.rounds):
            time.sleep(PAUSE_S)
            kiln_rounds.append(model.stamped_runs(runs + 2, x)[2:])
            time.sleep(PAUSE_S)
            for _ in range(runs):
                profiled.run(None, feeds)
            time.sleep(PAUSE_S)
            t = []
            for _ in range(runs):
                t0 = time.perf_counter()
                plain.run(None, feeds)
                t.append((time.perf_counter() - t0) * 1e3)
            plain_ms.append(float(np.median(t)))
        events = json.loads(Path(profiled.end_profiling()).read_text())
    ort_all = ort_runs(events, warm)
    if len(ort_all) != args.rounds * runs:
        print(f"ONNX Runtime's profile holds {len(ort_all)} runs, expected {args.rounds * runs}", file=sys.stderr)
        return 1
    t = compare(model.meta["steps"], model.meta["values"], kiln_rounds, ort_all, plain_ms)
    rows, unmatched, k_tot, o_tot, o_raw = t["rows"], t["unmatched"], t["kiln_total"], t["ort_total"], t["ort_raw"]
    kiln_total, ort_total = float(np.median(k_tot)), float(np.median(o_tot))
    total_ratio = float(np.median(k_tot / o_tot))
    print(f"# {args.model}: {cpu_name()}, {args.threads} threads, {args.rounds} rounds of {runs} runs; "
          f"{len(rows)} Kiln kernels, {t['nodes']} ONNX Runtime nodes")
    print(f"kernels in sequence: Kiln {kiln_total:.2f} ms, ONNX Runtime's unprofiled runs {ort_total:.2f} ms "
          f"(per-round ratio {total_ratio:.2f}); its profiled nodes summed to {np.median(o_raw):.2f} ms, "
          f"scaled by {np.median(o_tot / o_raw):.2f} below")
    print()
    print("| kernel | ops | algorithm | Kiln ms | ORT ms (scaled) | ORT ops | Kiln/ORT |")
    print("|---|---|---|---:|---:|---|---:|")
    for r in sorted(rows, key=lambda r: -(r["kiln_ms"] - r["ort_ms"]))[: args.top]:
        print(f"| {r['kernel']} | {r['ops']} | {r['algorithm']} | {r['kiln_ms']:.3f} | {r['ort_ms']:.3f} | "
              f"{r['ort_ops']} | {r['ratio']:.2f} |")
    diff = sum(r["kiln_ms"] - r["ort_ms"] for r in rows if r["ort_ops"])
    print(f"\nmatched kernels: Kiln − ORT = {diff:+.2f} ms; ORT nodes without a Kiln kernel: "
          + (", ".join(f"{op} {ms:.3f} ms" for op, ms in sorted(unmatched.items(), key=lambda kv: -kv[1]))
             or "none"))
    alone = [r for r in rows if not r["ort_ops"]]
    if alone:
        print(f"Kiln kernels without an ORT node: {len(alone)}, {sum(r['kiln_ms'] for r in alone):.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
