"""A gpu_check plug-in (bench/gpu_check.py): measure the bundle's tuning batches on the GPU with their own
runtime-only worker (autotune/device_worker.py, copied into each batch by autotune/batch.py), and copy the
results into $OUT so they come home:

    kiln tune zoo:resnet50 --target cuda-sm90 --batch-import gpu_bundle/tune/resnet50   # after copying
    #   $OUT/tune/resnet50/results.jsonl into that folder

The worker runs as a child process with a budget that leaves the rest of the check its time; a candidate that
crashes, hangs or computes a wrong result costs only itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

BUDGET_S = 120.0  # at most, per run of the check; less when the check's time is short


def tune_batches(run) -> dict:
    batches = run.manifest.get("tune") or []
    if not batches:
        return {"ok": None, "skipped": "no tuning batch in the bundle"}
    site = (run.results["checks"].get("install_ffi") or {}).get("site")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p))
    lib_dir = str(run.bundle / run.manifest.get("tvm_lib", "tvm_lib"))
    out = {}
    for b in batches:
        folder = run.bundle / b["folder"]
        worker = folder / "device_worker.py"
        if run.dry_run:  # here: the batch is whole and its worker parses
            manifest = json.loads((folder / "manifest.json").read_text())
            missing = [c["lib"] for c in manifest["candidates"] if not (folder / c["lib"]).is_file()]
            compile(worker.read_text(), str(worker), "exec")
            out[b["model"]] = {"ok": not missing, "candidates": len(manifest["candidates"]), "missing": missing[:5]}
            continue
        budget = max(10.0, min(BUDGET_S / len(batches), run.left_s() - 90))
        work = Path(run.out) / "tune" / b["model"]  # the bundle may be read-only: measure in a copy
        if not work.exists():
            shutil.copytree(folder, work, ignore=shutil.ignore_patterns("results.jsonl"))
        run.log(f"tune batch {b['model']}: {b['candidates']} candidates, budget {budget:.0f} s")
        proc = subprocess.run([sys.executable, str(work / "device_worker.py"), str(work), "--budget-s",
                               f"{budget:.0f}", "--timeout-s", "20", "--runtime-dir", lib_dir],
                              capture_output=True, text=True, env=env, timeout=budget + 120)
        summary = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
        rows = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()] \
            if (work / "results.jsonl").exists() else []
        for sub in ("libs", "data"):  # only the results travel back; the batch itself is in the bundle here
            shutil.rmtree(work / sub, ignore_errors=True)
        good = [r for r in rows if r.get("error") is None]
        out[b["model"]] = {"ok": proc.returncode == 0 and bool(good), "summary": summary, "results": len(rows),
                           "measured": len(good), "device": good[0]["device"] if good else None,
                           "stderr": proc.stderr[-1500:] if proc.returncode else "",
                           "first_errors": sorted({(r.get("error") or "")[:120] for r in rows if r.get("error")})[:5]}
    return {"ok": all(v["ok"] is not False for v in out.values()), "batches": out}


CHECKS = [("tune_batches", tune_batches)]
