"""Random graphs on the GPU (issue 15): kiln.random_models compiled for CUDA here, run there, against ONNX
Runtime's outputs computed here. A gpu_check plug-in.

Kiln's CUDA kernels are compiled on a machine without a GPU, so nothing but a run on the device says whether
their numbers are right. The 12 benchmark models cover the ops real networks use most; these graphs cover
what they do not (arg-max, gathers, pads, resizes, transposes and reductions meeting convs and matmuls, odd
shapes), each in at most 64 KB, so dozens travel in one run for a few seconds of device time.

    build(dest, target, seeds, budget_bytes)   # here, from bench/gpu_bundle.py
    CHECKS = [("fuzz", fuzz)]                  # there, from bench/gpu_check.py
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_models import compare  # noqa: E402  (the CPU fuzzer's comparison, one tolerance for both)

DEFAULT_SEEDS = range(400)
BUDGET_BYTES = 2 << 20
CASE_BYTES = 64 << 10  # larger cases (most of it inputs and outputs) are passed over: more graphs per MiB


def build(dest: Path, target: str, seeds=DEFAULT_SEEDS, budget_bytes: int = BUDGET_BYTES) -> dict:
    """dest/r<seed>.so and dest/r<seed>.npz (input x and every reference output) per seed that ONNX Runtime runs,
    Kiln compiles and that takes at most CASE_BYTES, until the budget is spent; dest/fuzz.json lists them and the
    seeds that did not build."""
    import onnxruntime as ort

    import kiln
    from kiln.config import Options
    from kiln.random_models import random_input, random_model

    dest.mkdir(parents=True, exist_ok=True)
    cases, not_built, used = [], [], 0
    for seed in seeds:
        model, ops = random_model(seed)
        x = random_input(model, seed)
        try:
            sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            want = sess.run(names, {"x": x})
        except Exception:  # noqa: BLE001  (a graph ONNX Runtime refuses says nothing about Kiln)
            continue
        art = dest / f"r{seed}.so"
        try:
            kiln.compile(model, art, Options(target=target, shipped_logs=False))
        except Exception as err:  # noqa: BLE001  (a finding in itself: recorded, the others still built)
            not_built.append({"seed": seed, "ops": ops, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            continue
        art.with_suffix(".ptx").unlink(missing_ok=True)  # the artifact carries its own PTX and cubin
        np.savez(dest / f"r{seed}.npz", x=x, **{f"out{k}": w for k, w in enumerate(want)})
        size = art.stat().st_size + (dest / f"r{seed}.npz").stat().st_size
        if size > CASE_BYTES or used + size > budget_bytes:
            art.unlink()
            (dest / f"r{seed}.npz").unlink()
            if size > CASE_BYTES:
                continue
            break
        used += size
        cases.append({"seed": seed, "ops": ops, "artifact": art.name, "data": f"r{seed}.npz", "outputs": len(want)})
    manifest = {"target": target, "cases": cases, "not_built": not_built, "bytes": used}
    (dest / "fuzz.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def fuzz(run) -> dict:
    """Every case of the bundle's fuzz folder: loaded, run once, compared. A dry run checks that the files are
    whole and that an artifact refuses to load for want of a driver (and nothing else)."""
    folder = run.bundle / "fuzz"
    if not (folder / "fuzz.json").is_file():
        return {"ok": None, "skipped": "no fuzz folder in this bundle"}
    manifest = json.loads((folder / "fuzz.json").read_text())
    cases = manifest["cases"]
    result: dict = {"cases": len(cases), "not_built_here": manifest["not_built"]}
    if run.dry_run:
        for c in cases:
            data = np.load(folder / c["data"])
            assert "x" in data and sum(k.startswith("out") for k in data) == c["outputs"], c
        if cases:
            try:
                run.kiln_runtime.load(folder / cases[0]["artifact"])
                result["load"] = "loaded on a machine without a GPU?"
            except Exception as err:  # noqa: BLE001
                result["load"] = str(err)[:300]
        result["ok"] = not cases or "no CUDA driver" in result["load"]
        return result
    failures, t0 = [], time.monotonic()
    for i, c in enumerate(cases):
        if run.left_s() < 20:
            result["stopped"] = f"out of time after {i} of {len(cases)} cases"
            cases = cases[:i]
            break
        data = np.load(folder / c["data"])
        want = [data[f"out{k}"] for k in range(c["outputs"])]
        try:
            m = run.kiln_runtime.load(folder / c["artifact"])
            got = m.run(data["x"])
            got = list(got) if isinstance(got, (list, tuple)) else [got]
            problem = compare(got, want)
        except Exception as err:  # noqa: BLE001  (one case's error is a finding; the others still run)
            problem = f"{type(err).__name__}: {str(err)[:300]} {traceback.format_exc()[-500:]}"
        if problem:
            failures.append({"seed": c["seed"], "ops": " ".join(c["ops"]), "problem": problem})
    result.update(failures=failures, passed=len(cases) - len(failures), seconds=round(time.monotonic() - t0, 1))
    result["ok"] = not failures and not manifest["not_built"]
    return result


CHECKS = [("fuzz", fuzz)]
