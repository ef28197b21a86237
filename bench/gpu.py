"""Issue 15's GPU table from one run of the prepared check: Kiln against torch eager and torch.compile
(`reduce-overhead`) per model, batch and precision, with correctness, compile times and the targets.

    python bench/gpu.py RESULTS/gpu_check.json [--markdown]

The figures come from `bench/gpu_check.py` run on the GPU machine (docs/gpu.md, "The prepared GPU check"):
Kiln's launches replayed from its CUDA graph and torch's calls, each the median of 5 blocks timed with CUDA
events. This script runs nothing; it reads that run's results, so the table in docs/gpu.md is the run's own
numbers, with its date and GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (model, batch, precision) -> the most Kiln's time may be of torch.compile reduce-overhead's (issue 15)
TARGETS = {("resnet50", 1, "fp16"): 1.5, ("resnet50", 32, "fp16"): 2.0, ("mobilenet_v2", 1, "fp16"): 1.5,
           ("bert_layer", 1, "fp16"): 1.5}
TORCH_NAMES = {"resnet50": "resnet50", "resnet18": "resnet18", "mobilenet_v2": "mobilenet_v2",
               "bert_layer": "bert_layer"}


def _ms(check: dict | None, *path: str) -> float | None:
    for key in path:
        if not isinstance(check, dict):
            return None
        check = check.get(key)
    return check if isinstance(check, (int, float)) else None


def rows(results: dict) -> list[dict]:
    """One row per model check that ran on the GPU (dry runs and skipped checks have no times)."""
    checks = results.get("checks", {})
    out = []
    for name, c in checks.items():
        if not name.startswith("model.") or "graph_launch" not in c:
            continue
        model, batch, precision = c["model"], c.get("batch", 1), c.get("precision", "fp32")
        torch_name = TORCH_NAMES.get(model)
        anchor = checks.get(f"torch.{torch_name}.{precision}" if batch == 1
                            else f"torch.{torch_name}.b{batch}.{precision}") if torch_name else None
        kiln = _ms(c, "graph_launch", "median_ms")
        eager = _ms(anchor, "eager", "median_ms")
        compiled = _ms(anchor, "compiled_reduce_overhead", "median_ms")
        outputs = c.get("outputs", {}).values()
        half = precision in ("fp16", "bf16")
        target = TARGETS.get((model, batch, precision))
        ratio = kiln / compiled if kiln and compiled else None
        out.append({
            "model": model, "batch": batch, "precision": precision, "correct": bool(c.get("match")),
            "agreement": (f"cosine {min(o['cosine'] for o in outputs):.5f}" if half and outputs
                          else f"max abs err {max(o['max_abs_err'] for o in outputs):.1e}" if outputs else ""),
            "kiln_ms": kiln, "kiln_no_graph_ms": _ms(c, "no_graph_launch", "median_ms"),
            "torch_eager_ms": eager, "torch_compile_ms": compiled, "kiln_over_compile": ratio,
            "faster_than_eager": (kiln < eager) if kiln and eager else None,
            "target": target, "met": (ratio <= target) if ratio is not None and target is not None else None,
            "kiln_compile_s": c.get("compile_s"), "torch_compile_s": _ms(anchor, "compile_s")})
    return out


def _fmt(v, spec: str = ".3f") -> str:
    return "" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def table(rs: list[dict], markdown: bool) -> str:
    head = ["model", "batch", "precision", "correct", "agreement", "Kiln ms", "Kiln no graph ms", "torch eager ms",
            "torch.compile ms", "Kiln / compile", "target", "met", "< eager", "Kiln compile s", "torch compile s"]
    body = [[r["model"], str(r["batch"]), r["precision"], "yes" if r["correct"] else "NO", r["agreement"],
             _fmt(r["kiln_ms"]), _fmt(r["kiln_no_graph_ms"]), _fmt(r["torch_eager_ms"]), _fmt(r["torch_compile_ms"]),
             _fmt(r["kiln_over_compile"], ".2f"), f"≤ {r['target']}" if r["target"] else "",
             {True: "yes", False: "no", None: ""}[r["met"]], {True: "yes", False: "no", None: ""}[r["faster_than_eager"]],
             _fmt(r["kiln_compile_s"], ".1f"), _fmt(r["torch_compile_s"], ".1f")] for r in rs]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [head, *body])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="gpu_check.json from a run on the GPU")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    results = json.loads(args.results.read_text())
    if results.get("dry_run"):
        print(f"{args.results}: a dry run: no GPU times in it", file=sys.stderr)
        return 1
    env = results.get("environment", {})
    print(f"{results.get('started', '?')}, {env.get('gpu') or env.get('nvidia_smi') or 'unknown GPU'}, "
          f"torch {env.get('torch')}")
    rs = rows(results)
    print(table(rs, args.markdown))
    gemm = results.get("checks", {}).get("gemm.tensorcore", {})
    if gemm.get("best"):
        b, cublas = gemm["best"], gemm.get("cublas", {}).get("float16", {})
        print(f"tensor-core GEMM 4096³: {b['tflops']:.0f} TFLOP/s, {b['ratio_to_cublas']:.0%} of cuBLAS "
              f"({_fmt(cublas.get('tflops'), '.0f')} TFLOP/s); target ≥ 380 TFLOP/s")
    return 0 if rs and all(r["correct"] for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
