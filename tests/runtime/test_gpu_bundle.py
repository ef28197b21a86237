"""bench/gpu_bundle.py builds what one GPU run needs, and bench/gpu_check.py --dry-run checks it here: every file
as the manifest says, the bundle's own Kiln sources and TVM runtime libraries, a CUDA artifact that refuses to
load for want of a driver (not for any other reason), and weights rebuilt without TVM byte for byte."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
from tests.bench_scripts import load_bench

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA artifacts need nvcc to build")


def _bench(name: str):
    return load_bench(name)


def _build(out: Path, models: list[str], budget: int, wheel_dir: Path, tune: tuple[str, ...] = (),
           fuzz: int = 0) -> dict:
    wheel = wheel_dir / "apache_tvm_ffi-0.1.14.post1-cp312-cp312-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:  # a stand-in: the test never downloads
        z.writestr("tvm_ffi/__init__.py", "")
    gpu_bundle = _bench("gpu_bundle")
    manifest = gpu_bundle.build(out, "cuda-sm90", models, wheel_dir, budget, tune, fuzz_seeds=fuzz)
    assert [m["name"] for m in manifest["models"]] == [gpu_bundle.folder_name(m) for m in models], manifest["skipped"]
    return manifest


def _dry_run(bundle: Path, out: Path) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--bundle", str(bundle), "--out",
                           str(out), "--dry-run"], check=False, capture_output=True, text=True, timeout=300)
    return done.returncode, json.loads((out / "gpu_check.json").read_text())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "gpu_bundle"
    _build(out, ["tiny_cnn"], 60 << 20, tmp_path_factory.mktemp("wheels"), ("squeezenet:6",), fuzz=6)
    return out


def test_bundle_carries_a_tuning_batch_its_worker_can_measure_there(bundle, tmp_path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    (tune,) = manifest["tune"]
    assert tune["model"] == "squeezenet" and tune["candidates"] == 6 and tune["log"].startswith("tuning_logs/sm_90/")
    folder = bundle / tune["folder"]
    batch = json.loads((folder / "manifest.json").read_text())
    assert batch["device"] == "cuda" and batch["arch"] == "sm_90" and len(batch["candidates"]) == 6
    assert f"{tune['folder']}/device_worker.py" in manifest["files"]
    rc, results = _dry_run(bundle, tmp_path / "out")
    assert results["checks"]["tune_batches"]["ok"] is True


def test_bundle_holds_what_a_runtime_only_machine_needs(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = manifest["files"]
    for lib in ("libtvm_runtime.so", "libtvm_runtime_extra.so", "libtvm_runtime_cuda.so"):
        assert f"tvm_lib/{lib}" in files
    for src in ("src/kiln/__init__.py", "src/kiln/errors.py", "src/kiln/runtime/cuda.py", "src/kiln/runtime/model.py",
                "src/kiln/rebuild_weights.py", "src/kiln/codegen/weights.py", "src/kiln/ir/__init__.py"):
        assert src in files, src
    assert not any(f.startswith("src/kiln/tests/") for f in files)
    (tiny,) = manifest["models"]
    assert tiny["weights"] == "embedded" and "models/tiny_cnn/tiny_cnn.so" in files
    assert manifest["total_bytes"] == sum(p.stat().st_size for p in bundle.rglob("*")
                                          if p.is_file() and p.name != "manifest.json")
    assert manifest["total_bytes"] <= 12 << 20


def test_dry_run_checks_the_bundle_here(bundle, tmp_path):
    rc, results = _dry_run(bundle, tmp_path)
    checks = results["checks"]
    assert rc == 0, results["failed"]
    assert checks["manifest"]["ok"] and not checks["manifest"]["problems"]
    assert checks["install_ffi"]["wheel_has_tvm_ffi"]
    assert checks["runtime"]["from_bundle"] and "libcuda" in checks["runtime"]["cuda_runtime"]
    assert "no CUDA driver" in checks["model.tiny_cnn"]["load"]  # refused for the driver, not anything else
    assert checks["model.tiny_cnn"]["inputs"] == {"data": [1, 3, 16, 16]}
    assert (tmp_path / "gpu_check.log").read_text().count("--- ") >= 5
    assert checks["fuzz"]["ok"] and checks["fuzz"]["cases"] >= 2 and "no CUDA driver" in checks["fuzz"]["load"]


def test_dry_run_reports_a_damaged_bundle(bundle, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    ref = damaged / "models" / "tiny_cnn" / "reference.npz"
    ref.write_bytes(ref.read_bytes()[:-10])
    rc, results = _dry_run(damaged, tmp_path / "out")
    assert rc == 1 and "manifest" in results["failed"]
    assert any("reference.npz" in p for p in results["checks"]["manifest"]["problems"])


@pytest.mark.slow
def test_weights_that_do_not_fit_are_rebuilt_without_tvm(tmp_path):
    """squeezenet's 5 MB of weights do not fit a 12 MiB budget beside TVM's libraries: they stay behind, and the
    dry run makes them again with the bundle's sources while `import tvm` fails, CRC-32 checked."""
    bundle = tmp_path / "gpu_bundle"
    manifest = _build(bundle, ["squeezenet"], 12 << 20, tmp_path)
    assert manifest["models"][0]["weights"] == "rebuild"
    assert "models/squeezenet/squeezenet.weights" not in manifest["files"]
    rc, results = _dry_run(bundle, tmp_path / "out")
    rebuilt = results["checks"]["model.squeezenet"]["weights_rebuilt"]
    assert rc == 0 and rebuilt["ok"], rebuilt["output"]
    assert not (bundle / "models" / "squeezenet" / "squeezenet.weights").exists()  # a dry run writes elsewhere


def test_model_check_runs_its_gpu_path_on_a_fake_device(bundle, tmp_path):
    """gpu_check's model check as it runs on the GPU (not a dry run), with kiln.load handing out the CPU build of
    the same model on host memory through the fake CUDA API: the script's own logic, comparisons and timing
    bookkeeping run here; only the device is pretended."""
    import kiln
    from kiln.config import Options

    from .test_cuda_runtime import _fake_model

    gpu_check, gpu_bundle = _bench("gpu_check"), _bench("gpu_bundle")
    cpu = kiln.compile(gpu_bundle.tiny_cnn(), tmp_path / "tiny_cpu.so", Options(target="x86-avx2")).path
    run = gpu_check.Run(bundle, tmp_path / "out", dry_run=False)
    run.manifest = json.loads((bundle / "manifest.json").read_text())
    run.kiln_runtime = types.SimpleNamespace(load=lambda path, cuda_graphs=None: _fake_model(
        cpu, graphs=cuda_graphs is not False)[0])
    (entry,) = run.manifest["models"]
    result = gpu_check.model_check(entry)(run)
    assert result["ok"] and result["match"] and result["no_graph_match"], result
    assert result["outputs"]["softmax0"]["max_abs_err"] < 1e-5
    assert len(result["graph_launch"]["blocks_ms"]) == gpu_check.BLOCKS and 3 <= result["launches_per_block"]
    # bench/gpu.py's table reads what this check wrote
    (row,) = _bench("gpu").rows({"checks": {"model.tiny_cnn": result}})
    assert row["model"] == "tiny_cnn" and row["correct"] and row["kiln_ms"] == result["graph_launch"]["median_ms"]


def test_gpu_table_pairs_each_model_with_its_torch_anchor_and_target():
    gpu = _bench("gpu")

    def model(name, batch, precision, ms, **outputs):
        return {"model": name, "batch": batch, "precision": precision, "match": True, "compile_s": 30.0,
                "graph_launch": {"median_ms": ms}, "no_graph_launch": {"median_ms": 2 * ms}, "outputs": outputs}

    def anchor(eager, compiled):
        return {"eager": {"median_ms": eager}, "compiled_reduce_overhead": {"median_ms": compiled}, "compile_s": 20.0}

    checks = {"model.resnet50_fp16": model("resnet50", 1, "fp16", 0.6, y={"cosine": 0.9996, "max_abs_err": 1e-3}),
              "model.resnet50_batch32_fp16": model("resnet50", 32, "fp16", 4.0, y={"cosine": 0.9995, "max_abs_err": 0}),
              "model.resnet18": model("resnet18", 1, "fp32", 0.3, y={"cosine": 1.0, "max_abs_err": 2e-5}),
              "torch.resnet50.fp16": anchor(7.0, 0.47), "torch.resnet50.b32.fp16": anchor(4.6, 1.51),
              "torch.resnet18.fp32": anchor(2.0, 0.25)}
    rows = {(r["model"], r["batch"]): r for r in gpu.rows({"checks": checks})}
    assert rows[("resnet50", 1)]["met"] is True and abs(rows[("resnet50", 1)]["kiln_over_compile"] - 0.6 / 0.47) < 1e-9
    assert rows[("resnet50", 32)]["met"] is False and rows[("resnet50", 32)]["faster_than_eager"] is True
    assert rows[("resnet18", 1)]["target"] is None and rows[("resnet18", 1)]["agreement"].startswith("max abs err")
    assert "| resnet50 | 32 | fp16 |" in gpu.table(list(rows.values()), markdown=True)


def test_fuzz_check_runs_its_gpu_path_on_cpu_builds(bundle, tmp_path):
    """The fuzz plug-in as it runs on the GPU, with each case's artifact swapped for a CPU build of the same
    graph: every case passes; a wrong answer slipped into one case is reported with its seed."""
    import numpy as np

    import kiln
    from kiln.config import Options
    from kiln.random_models import random_model

    gpu_check, gpu_fuzz = _bench("gpu_check"), _bench("gpu_fuzz")
    cases = json.loads((bundle / "fuzz" / "fuzz.json").read_text())["cases"]
    cpu = {c["artifact"]: kiln.load(kiln.compile(random_model(c["seed"])[0], tmp_path / c["artifact"],
                                                 Options(target="x86-avx2", shipped_logs=False)).path)
           for c in cases}
    run = gpu_check.Run(bundle, tmp_path / "out", dry_run=False)
    run.kiln_runtime = types.SimpleNamespace(load=lambda path: cpu[Path(path).name])
    result = gpu_fuzz.fuzz(run)
    assert len(cases) >= 2  # of seeds 0-5, those within gpu_fuzz.CASE_BYTES
    assert result["ok"] and result["passed"] == len(cases) and not result["failures"], result

    wrong = cases[1]["artifact"]
    right = cpu[wrong]
    cpu[wrong] = types.SimpleNamespace(run=lambda x: [np.asarray(y) + 1 for y in right.run(x)] if isinstance(
        right.run(x), (list, tuple)) else np.asarray(right.run(x)) + 1)
    result = gpu_fuzz.fuzz(run)
    assert not result["ok"] and [f["seed"] for f in result["failures"]] == [cases[1]["seed"]], result


@pytest.mark.slow  # two SqueezeNet builds and a dry run: 21 s
def test_a_model_at_batch_two_carries_no_inputs_and_is_checked_against_outputs_made_there(tmp_path):
    """"squeezenet,batch=2" (the bundle's ResNet-50 at batch 32 in small): only the artifact travels; the
    check makes the seeded inputs and ONNX Runtime's outputs where it runs, and compares Kiln's with them.
    The GPU path runs here on a CPU build of the same model through the fake CUDA API."""
    import kiln
    from kiln.config import Options
    from kiln.zoo import resolve

    from .test_cuda_runtime import _fake_model

    bundle = tmp_path / "gpu_bundle"
    manifest = _build(bundle, ["squeezenet,batch=2"], 60 << 20, tmp_path)
    (entry,) = manifest["models"]
    assert entry["batch"] == 2 and entry["inputs"] is None and entry["name"] == "squeezenet_batch2"
    assert not any(f.endswith((".npz",)) for f in manifest["files"] if f.startswith("models/"))
    rc, results = _dry_run(bundle, tmp_path / "out")
    check = results["checks"]["model.squeezenet_batch2"]
    assert rc == 0 and results["checks"]["manifest"]["ok"], results["failed"]
    assert check["ok"] and check["inputs"] == {"data_0": [2, 3, 224, 224]}, check

    gpu_check = _bench("gpu_check")
    cpu = kiln.compile(resolve("zoo:squeezenet,batch=2"), tmp_path / "sq2_cpu.so", Options(target="x86-avx2")).path
    run = gpu_check.Run(bundle, tmp_path / "out2", dry_run=False)
    run.manifest = manifest
    run.kiln_runtime = types.SimpleNamespace(load=lambda path, cuda_graphs=None: _fake_model(
        cpu, graphs=cuda_graphs is not False)[0])
    result = gpu_check.model_check({**entry, "weights": "embedded"})(run)
    assert result["ok"] and result["match"] and result["batch"] == 2, result
