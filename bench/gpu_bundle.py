"""Build here everything one run on the GPU machine needs (issue 15), into a gitignored folder, ≤ 60 MiB:

    python bench/gpu_bundle.py [--out gpu_bundle] [--target cuda-sm90] [--models tiny_cnn squeezenet ...]

TVM's runtime libraries (runtime, extra, cuda) from the installed apache-tvm, the apache-tvm-ffi cp312 wheel
(downloaded once, cached in ~/.cache/kiln/gpu_bundle), Kiln's sources (laid out as the installed package:
`kiln.runtime` to run, the frontend and passes for `kiln.rebuild_weights`), CUDA artifacts of the models, their
inputs and ONNX Runtime's outputs, and manifest.json (every file with its size and SHA-256). A model whose
weights would push the bundle past the budget is built with external weights, left behind and made again there
from the seeded zoo code (`python -m kiln.rebuild_weights`, no TVM needed; manifest `"weights": "rebuild"`). The GPU machine has no TVM and no network, and one run carries at most 64 MiB: there,
`python3 bench/gpu_check.py --bundle gpu_bundle --out $OUT` (carry: ["gpu_bundle"]).

It carries random graphs too (`--fuzz 400`: bench/gpu_fuzz.py, compiled here, checked there against ONNX
Runtime's outputs), and one round of batch tuning (`--tune resnet50:256`: autotune/batch.py, the candidates built for
the target with their inputs' seeds and sampled references); bench/gpu_tune.py measures it there and leaves
$OUT/tune/<model>/results.jsonl, which `kiln tune zoo:<model> --target cuda-sm90 --batch-import DIR` turns into
records once copied into the batch folder here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BUDGET_BYTES = 60 << 20
EMBED_BYTES = 6 << 20  # weights up to this travel inside the artifact (SqueezeNet's 5 MB: one model that way)
FFI_WHEEL = "apache-tvm-ffi==0.1.14.post1"  # the tvm_ffi this repository's apache-tvm 0.27 runs with
WHEEL_CACHE = Path.home() / ".cache" / "kiln" / "gpu_bundle"
LEFT_OUT_PACKAGES = {"kiln.tests"}
# In priority order. ResNet-18's fp32 weights alone are 47 MB, ResNet-50's 102 MB: they travel as code.
# "name,batch=N" is the zoo model at batch N (issue 15's ResNet-50 batch-32 target): its inputs (19 MB at 32)
# and ONNX Runtime's outputs are made there from the seed, not carried.
DEFAULT_MODELS = ["tiny_cnn", "squeezenet", "mobilenet_v2", "resnet18", "resnet50", "bert_layer",
                  "mobilenet_v2@fp16", "resnet50@fp16", "bert_layer@fp16", "resnet50,batch=32@fp16"]
TORCHVISION = {"mobilenet_v2": "mobilenet_v2", "resnet18": "resnet18", "resnet50": "resnet50"}


def tiny_cnn():
    """Two convs, a pool and a classifier: kilobytes, a first check that the executor runs at all."""
    from kiln.model_builders import small_cnn

    return small_cnn(0, "tiny_cnn")


def onnx_model(name: str):
    """A zoo name, "name,batch=N" included (seeded random weights), or tiny_cnn."""
    if name == "tiny_cnn":
        return tiny_cnn()
    from kiln.zoo import resolve

    return resolve(f"zoo:{name}")


def folder_name(spec: str) -> str:
    """"resnet50,batch=32@fp16" → "resnet50_batch32_fp16": a plain name for a folder."""
    return spec.replace(",", "_").replace("=", "").replace("@", "_")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ffi_wheel(cache: Path) -> Path | None:
    """The cp312 manylinux wheel of apache-tvm-ffi, from the cache or pip download (None if neither works)."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("apache_tvm_ffi-*-cp312-*.whl"))
    if found:
        return found[-1]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
           "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(cache), FFI_WHEEL]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"pip download {FFI_WHEEL} failed: {done.stderr.strip()[-400:]}", file=sys.stderr)
        return None
    found = sorted(cache.glob("apache_tvm_ffi-*-cp312-*.whl"))
    return found[-1] if found else None


def copy_sources(dest: Path) -> None:
    """Kiln's packages as pyproject's package-dir maps them (kiln.runtime = runtime/ → dest/kiln/runtime)."""
    import tomllib

    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dir.items(), key=lambda kv: kv[0].count(".")):
        if package in LEFT_OUT_PACKAGES:
            continue
        target = dest.joinpath(*package.split("."))
        shutil.copytree(ROOT / folder, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def weights_bytes(model) -> int:
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def copy_runtime_libs(dest: Path) -> None:
    from kiln.runtime.cuda import RUNTIME_LIBS, runtime_dir

    lib = runtime_dir()
    if lib is None:
        raise SystemExit("apache-tvm is not installed here: its runtime libraries cannot be bundled")
    dest.mkdir(parents=True, exist_ok=True)
    for name in RUNTIME_LIBS:
        shutil.copy2(lib / name, dest / name)


def split_spec(spec: str) -> tuple[str, str]:
    """"resnet50@fp16" → ("resnet50", "fp16"); a plain name is fp32."""
    name, _, precision = spec.partition("@")
    return name, precision or "fp32"


def build_model(spec: str, dest: Path, target: str, external: bool) -> dict:
    """Compile `spec` (a model, `@fp16`/`@bf16` for half precision) for `target` into dest/, with its inputs and
    ONNX Runtime's (float32) outputs; `external`: its weights file is left out, to be rebuilt there."""
    name, precision = split_spec(spec)
    import onnxruntime as ort

    import kiln
    from kiln.config import Options
    from kiln.model_builders import random_feeds

    model = onnx_model(name)
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stem = folder_name(name)
    report = kiln.compile(model, dest / f"{stem}.so", Options(target=target, precision=precision),
                          weights="external" if external else "embedded")
    compile_s = time.perf_counter() - t0
    if external:
        (dest / f"{stem}.weights").unlink()
    # the PTX written beside an artifact is for reading; the fatbin inside it is what loads (ResNet-50 at batch
    # 32 in fp16: 5.3 MB of PTX, room for the fuzz graphs and the tuning batch)
    (dest / f"{stem}.ptx").unlink(missing_ok=True)
    feeds = random_feeds(model, seed=0)
    names = [o.name for o in model.graph.output]
    folder = dest.name
    base, batch = name.partition(",")[0], next(iter(feeds.values())).shape[0]
    generate = batch > 1  # inputs and references made there (gpu_check.generated_io), from the same seed
    if not generate:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        np.savez(dest / "inputs.npz", **feeds)
        np.savez(dest / "reference.npz", **dict(zip(names, sess.run(names, feeds))))
    return {"name": folder, "model": name, "precision": precision, "batch": batch,
            "artifact": f"models/{folder}/{report.path.name}",
            "inputs": None if generate else f"models/{folder}/inputs.npz",
            "reference": None if generate else f"models/{folder}/reference.npz",
            "generate_io": {"seed": 0} if generate else None, "input_names": list(feeds), "output_names": names,
            "torchvision": TORCHVISION.get(base), "kernels": report.kernels, "compile_s": round(compile_s, 1),
            "weights": "rebuild" if external else "embedded", "zoo": f"zoo:{name}" if name != "tiny_cnn" else None,
            "weights_mib": round(weights_bytes(model) / 2**20, 1)}


def manifest_files(root: Path) -> dict[str, dict]:
    return {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def git_commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False,
                          capture_output=True, text=True)
    return done.stdout.strip()


def build_tune_batch(model: str, size: int, dest: Path, target: str, room: int) -> dict:
    """One round of batch tuning (autotune/batch.py) for the model's tasks on `target`: candidates built
    here, measured there by the batch's own runtime-only worker (bench/gpu_tune.py); its log starts empty, or
    from tuning_logs/<arch>/<model>.jsonl when earlier rounds came home. Shrunk until it fits in `room`."""
    from kiln.autotune.batch import export_batch
    from kiln.autotune.tune import TuneOptions
    from kiln.config import Options
    from kiln.driver import model_tasks

    from kiln import zoo

    tasks = model_tasks(zoo.resolve(f"zoo:{model}"), Options(target=target))
    arch = str(tasks[0].target.attrs.get("arch", "gpu"))
    log = ROOT / "tuning_logs" / arch / f"{model}.jsonl"
    while True:
        start = time.perf_counter()
        manifest = export_batch(tasks, log, dest, TuneOptions(tuner="xgb"), size=size)
        if folder_bytes(dest) <= room or size <= 16:
            break
        shutil.rmtree(dest)
        size //= 2
    if folder_bytes(dest) > room:
        raise RuntimeError(f"a tuning batch of {size} candidates is {folder_bytes(dest) / 2**20:.1f} MiB, "
                           f"{room / 2**20:.1f} MiB left")
    print(f"  tune batch {model}: {len(manifest['candidates'])} candidates of {len(manifest['tasks'])} tasks, "
          f"{folder_bytes(dest) / 2**20:.1f} MiB, built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return {"model": model, "folder": str(dest.relative_to(dest.parent.parent)), "log": str(log.relative_to(ROOT)),
            "candidates": len(manifest["candidates"]), "tasks": len(manifest["tasks"]), "batch": manifest["batch"]}


def build(out: Path, target: str, models: list[str], wheel_cache: Path | None, budget: int,
          tune_batches: tuple[str, ...] = (), with_gemm: bool = False, fuzz_seeds: int = 0) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    copy_runtime_libs(out / "tvm_lib")
    copy_sources(out / "src")
    wheel = ffi_wheel(wheel_cache) if wheel_cache is not None else None
    if wheel is not None:
        (out / "wheels").mkdir()
        shutil.copy2(wheel, out / "wheels" / wheel.name)
    entries, skipped = [], []
    for name in models:
        dest = out / "models" / folder_name(name)
        model_name, precision = split_spec(name)
        half = 2 if precision in ("fp16", "bf16") else 1
        # weights over EMBED_BYTES, or that would not fit, stay behind: the zoo makes them again there (seeded
        # code, seconds), which leaves the carry for what cannot be remade (a round of tuning candidates)
        w = weights_bytes(onnx_model(model_name)) // half
        external = model_name != "tiny_cnn" and (w > EMBED_BYTES or folder_bytes(out) + w + (2 << 20) > budget)
        try:
            entry = build_model(name, dest, target, external)
        except Exception as err:  # noqa: BLE001  (one model that fails to build leaves the others in the bundle)
            skipped.append({"name": name, "why": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
            print(f"  {name}: not built: {skipped[-1]['why']}", file=sys.stderr)
            shutil.rmtree(dest, ignore_errors=True)
            continue
        size = folder_bytes(out)
        if size > budget:
            skipped.append({"name": name, "why": f"the bundle would be {size / 2**20:.1f} MiB > "
                                                 f"{budget / 2**20:.0f} MiB"})
            print(f"  {name}: left out: {skipped[-1]['why']}", file=sys.stderr)
            shutil.rmtree(dest)
            continue
        entries.append(entry)
        print(f"  {name}: {folder_bytes(dest) / 2**20:.1f} MiB, {entry['kernels']} kernels, "
              f"compiled in {entry['compile_s']} s", file=sys.stderr)
    gemm = None
    if with_gemm:  # the tensor-core GEMM bench's kernels (bench/gpu_gemm.py), timed there against cuBLAS
        try:
            sys.path.insert(0, str(ROOT / "bench"))
            import gpu_gemm

            gemm = gpu_gemm.build(out / "gemm", target, runtime=False)
            print(f"  gemm: {folder_bytes(out / 'gemm') / 2**20:.1f} MiB", file=sys.stderr)
        except Exception as err:  # noqa: BLE001  (the models stay in the bundle without it)
            skipped.append({"name": "gemm", "why": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
            shutil.rmtree(out / "gemm", ignore_errors=True)
    fuzz = None
    if fuzz_seeds:  # random graphs (bench/gpu_fuzz.py): a few MiB, checked there against ONNX Runtime's outputs
        try:
            sys.path.insert(0, str(ROOT / "bench"))
            import gpu_fuzz

            room = min(gpu_fuzz.BUDGET_BYTES, budget - folder_bytes(out) - (8 << 20))  # the tune batch's share
            fuzz = gpu_fuzz.build(out / "fuzz", target, range(fuzz_seeds), max(room, 0))
            print(f"  fuzz: {len(fuzz['cases'])} random graphs, {fuzz['bytes'] / 2**20:.1f} MiB; not built: "
                  f"{[c['seed'] for c in fuzz['not_built']]}", file=sys.stderr)
        except Exception as err:  # noqa: BLE001  (the models stay in the bundle without it)
            skipped.append({"name": "fuzz", "why": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
            shutil.rmtree(out / "fuzz", ignore_errors=True)
    tune = []
    for spec in tune_batches:
        model, _, size = spec.partition(":")
        try:
            tune.append(build_tune_batch(model, int(size or 256), out / "tune" / model, target,
                                         budget - folder_bytes(out)))
        except Exception as err:  # noqa: BLE001  (the models stay in the bundle without it)
            skipped.append({"name": f"tune:{model}", "why": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
            print(f"  tune batch {model}: not built: {skipped[-1]['why']}", file=sys.stderr)
            shutil.rmtree(out / "tune" / model, ignore_errors=True)
    manifest = {"format": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "kiln_commit": git_commit(), "target": target, "tvm_lib": "tvm_lib", "src": "src",
                "ffi_wheel": f"wheels/{wheel.name}" if wheel is not None else None,
                "models": entries, "gemm": "gemm" if gemm is not None else None, "tune": tune, "skipped": skipped,
                "fuzz": {"cases": len(fuzz["cases"]), "not_built": fuzz["not_built"]} if fuzz else None,
                "files": manifest_files(out)}
    manifest["total_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "gpu_bundle")
    ap.add_argument("--target", default="cuda-sm90")
    ap.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("--wheel-cache", type=Path, default=WHEEL_CACHE)
    ap.add_argument("--no-wheel", action="store_true", help="leave the tvm_ffi wheel out (tests)")
    ap.add_argument("--budget-mib", type=float, default=BUDGET_BYTES / 2**20)
    ap.add_argument("--no-gemm", action="store_true", help="leave out the tensor-core GEMM bench's kernels")
    ap.add_argument("--fuzz", type=int, default=400, help="random graphs (bench/gpu_fuzz.py) from seeds 0..N-1, "
                    "as many as fit 2 MiB")
    ap.add_argument("--tune", nargs="*", default=["resnet50:256"], help="MODEL:N tuning batches (bench/gpu_tune.py "
                    "measures them there; `kiln tune --batch-import` brings the results home)")
    args = ap.parse_args(argv)
    manifest = build(args.out, args.target, args.models, None if args.no_wheel else args.wheel_cache,
                     int(args.budget_mib * 2**20), tuple(args.tune), with_gemm=not args.no_gemm, fuzz_seeds=args.fuzz)
    print(f"{args.out}: {manifest['total_bytes'] / 2**20:.1f} MiB, models "
          f"{[m['name'] for m in manifest['models']]}, left out {[s['name'] for s in manifest['skipped']]}, "
          f"ffi wheel {'yes' if manifest['ffi_wheel'] else 'MISSING'}")
    return 0 if manifest["models"] and manifest["total_bytes"] <= BUDGET_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
