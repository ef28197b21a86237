"""Batch tuning for a device reached in short runs (issue 15): candidates built and packed here, measured by a
worker that has only TVM's runtime (here: a `tvm` that cannot be imported), results imported as records, and the
next batch proposes nothing already measured. A crash, a hang and a wrong kernel each cost one candidate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm_ffi
from kiln.autotune.batch import export_batch, import_results
from kiln.autotune.device_worker import read_results, runtime_dir
from kiln.autotune.records import config_id, read_records
from kiln.autotune.tune import TuneOptions
from onnx import helper

from kiln.config import Options
from kiln.driver import model_tasks
from kiln.model_builders import GraphBuilder

TARGET = "x86-avx2"  # runs on every x86 host CI has had

_BAD_LIB = r"""
#include <tvm/ffi/c_api.h>
#include <unistd.h>
int __tvm_ffi_main(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* ret) {
#if defined(HANG)
  for (;;) sleep(1);
#elif defined(CRASH)
  volatile int* p = 0; *p = 1;
#endif
  ret->type_index = 0;
  return 0;  /* WRONG: returns without writing its output */
}
"""


def conv_dense() -> onnx.ModelProto:
    g = GraphBuilder("conv_dense")
    rng = np.random.default_rng(0)
    w = g.const(rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2, "w")
    y = g.op("Relu", [g.op("Conv", ["x", w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    return g.model([helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 12, 12])],
                   [(y, onnx.TensorProto.FLOAT, [1, 16, 12, 12])])


@pytest.fixture(scope="module")
def tasks():
    return model_tasks(conv_dense(), Options(target=TARGET))


def _bad_lib(path: Path, kind: str) -> None:
    src = path.with_suffix(".c")
    src.write_text(_BAD_LIB)
    subprocess.run(["gcc", "-shared", "-fPIC", f"-D{kind}", "-I", tvm_ffi.libinfo.find_include_path(), str(src),
                    "-o", str(path)], check=True)


def _run_worker(folder: Path, tmp: Path, *extra: str) -> dict:
    """The worker as it runs on the device: its own copy, and a `tvm` package that refuses to import."""
    fake = tmp / "no_tvm" / "tvm"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("raise ImportError('no TVM compiler on the device')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp / "no_tvm"), TVM_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(folder / "device_worker.py"), str(folder), "--runtime-dir",
                           runtime_dir(), "--timeout-s", "20", "--budget-s", "120", *extra],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_batch_round_trip_records_every_candidate_and_survives_bad_kernels(tasks, tmp_path):
    log = tmp_path / "log.jsonl"
    folder = tmp_path / "b1"
    manifest = export_batch(tasks, log, folder, TuneOptions(tuner="random", batch=2), size=7)
    cands = manifest["candidates"]
    assert len(cands) + len(manifest["build_errors"]) == 7
    by_task: dict[str, list] = {}
    for c in cands:
        by_task.setdefault(c["task"], []).append(c)
        assert (folder / c["lib"]).exists() and (folder / c["data"]).exists()
    for t in tasks:  # each task's default is in the batch, first of its task
        if t.key in by_task:
            assert by_task[t.key][0]["config"] == dict(t.default())
    assert manifest["device"] == "cpu" and (folder / "device_worker.py").exists()

    victims = [c for c in cands if c["config"] != dict(next(t for t in tasks if t.key == c["task"]).default())][:3]
    assert len(victims) == 3
    for c, kind in zip(victims, ["CRASH", "HANG", "WRONG"]):
        _bad_lib(folder / c["lib"], kind)

    summary = _run_worker(folder, tmp_path, "--timeout-s", "5")
    assert summary["crashes"] == 1 and summary["timeouts"] == 1 and summary["left"] == 0
    rows = {r["id"]: r for r in read_results(str(folder))}
    assert set(rows) == {c["id"] for c in cands}  # every candidate has exactly its one result
    assert rows[victims[0]["id"]]["error"].startswith("crash: signal")
    assert rows[victims[1]["id"]]["error"] == "timeout after 5 s"
    assert rows[victims[2]["id"]]["error"].startswith("wrong result")
    good = [c for c in cands if c not in victims]
    assert good and all(rows[c["id"]]["error"] is None and len(rows[c["id"]]["costs_s"]) == 5 for c in good)
    assert all(rows[c["id"]]["checked"] for c in good)

    counts = import_results(folder, log)
    assert counts["imported"] == len(good) and counts["errors"] == 3 + len(manifest["build_errors"])
    assert import_results(folder, log)["imported"] == 0  # importing twice adds nothing
    records = read_records([log], tasks[0].target)
    assert len(records) == 7
    assert sum(r.extra.get("check") == "passed" for r in records) == len(good)
    assert sum(r.extra.get("check") == "failed" for r in records) == 1

    second = export_batch(tasks, log, tmp_path / "b2", TuneOptions(tuner="random", batch=2), size=6)
    measured = {(r.key, config_id(r.config)) for r in records}
    again = [(c["task"], config_id(c["config"])) for c in second["candidates"]]
    assert again and not measured & set(again)  # the next round proposes nothing already measured
    assert all(c["config"] != dict(t.default()) for c in second["candidates"] for t in tasks if t.key == c["task"])


def test_a_rerun_skips_what_was_measured_and_the_budget_stops_new_candidates(tasks, tmp_path):
    folder = tmp_path / "b"
    manifest = export_batch(tasks, tmp_path / "log.jsonl", folder, TuneOptions(tuner="random"), size=3)
    n = len(manifest["candidates"])
    assert _run_worker(folder, tmp_path, "--budget-s", "0")["left"] == n  # no time: nothing starts
    assert read_results(str(folder)) == []
    first = _run_worker(folder, tmp_path)
    assert first["measured"] == n and first["left"] == 0
    assert _run_worker(folder, tmp_path)["measured"] == 0  # a rerun finds everything done
    assert len(read_results(str(folder))) == n


def test_an_export_refuses_a_folder_that_holds_a_batch(tasks, tmp_path):
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "results.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="not empty"):
        export_batch(tasks, tmp_path / "log.jsonl", folder, size=2)


def test_synthesized_inputs_are_the_same_everywhere_and_round_like_ml_dtypes():
    import ml_dtypes
    from kiln.autotune.device_worker import synth

    a = synth([64, 33], "float32", 7)
    assert np.array_equal(a, synth([64, 33], "float32", 7)) and not np.array_equal(a, synth([64, 33], "float32", 8))
    assert abs(float(a.std()) - 1.0) < 0.05 and abs(float(a.mean())) < 0.05
    bits = synth([64, 33], "bfloat16", 7)
    assert np.array_equal(bits, a.astype(ml_dtypes.bfloat16).view(np.uint16))  # round to nearest even
    assert np.array_equal(synth([5], "float16", 3), synth([5], "float32", 3).astype(np.float16))


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="needs nvcc")
def test_cuda_candidates_carry_compiled_device_code_not_source(tmp_path):
    tasks = model_tasks(conv_dense(), Options(target="cuda-sm90"))
    manifest = export_batch(tasks, tmp_path / "log.jsonl", tmp_path / "b", TuneOptions(tuner="random"), size=3)
    assert manifest["device"] == "cuda" and manifest["arch"] == "sm_90" and manifest["candidates"]
    assert manifest["timing"]["number"] > 1  # GPU kernels timed warm, many calls per repeat
    for c in manifest["candidates"]:
        lib = (tmp_path / "b" / c["lib"]).read_bytes()
        assert b"fatbin" in lib and b".target sm_90" in lib  # the fatbin's PTX part names the arch
        assert b'extern "C" __global__' not in lib  # no CUDA source left for a compiler there
