"""The one prepared GPU check (issue 15): run on the GPU machine, with the bundle `bench/gpu_bundle.py` built here.

    python3 bench/gpu_check.py --bundle gpu_bundle --out $OUT            # there: under 6 minutes
    python bench/gpu_check.py --bundle gpu_bundle --dry-run               # here, on the CPU: what can be checked

Each check runs in its own try/except, so one failure never hides the rest; results go to $OUT/gpu_check.json
and the log to $OUT/gpu_check.log as they come (a run cut off at its limit still leaves both). The checks, in
order: the environment (nvidia-smi, driver, torch), the manifest (every file, its size and SHA-256), the tvm_ffi
wheel installed into a temporary site dir, TVM's runtime libraries from the bundle, then per model kiln.load →
run → compare with ONNX Runtime's outputs (rtol 1e-3, atol 1e-4), graph against no-graph launch times (CUDA
events on the model's stream), a torch CUDA tensor as a DLPack input and run_dlpack's outputs; then torch eager
and torch.compile(mode="reduce-overhead") anchors (torchvision, batch 1, fp32 and fp16, and each larger-batch
model's batch and precision, cudnn.benchmark,
channels-last) timed with torch.cuda.Event (Kiln's launches are timed with CUDA events recorded on the model's
own stream, through ctypes). Other checks plug in: a module in bench/ named in PLUGINS that defines
`CHECKS = [(name, fn)]`, each `fn(run: Run) -> dict` with "ok" (bench/gpu_gemm.py: the tensor-core GEMM bench);
in a dry run (`run.dry_run`) it checks what it can without a GPU or returns {"ok": None, "skipped": why};
`run.bundle`, `run.manifest`, `run.torch`, `run.kiln_runtime` (kiln.runtime from the bundle), `run.left_s()` and
`run.log` are what it may use.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TIME_LIMIT_S = 330  # the whole script, under 6 minutes; anchors and plug-ins are skipped once it runs out
RTOL, ATOL = 1e-3, 1e-4  # float32 builds against ONNX Runtime
COSINE = 0.999  # fp16/bf16 builds against the same float32 outputs, per output
REPEAT, BLOCKS = 50, 5  # timings: the median of BLOCKS blocks' medians of REPEAT launches
PLUGINS = ("gpu_gemm", "gpu_fp16", "gpu_fuzz", "gpu_tune")  # bench/<name>.py, each with CHECKS = [(name, fn)], when present


class Run:
    """What the checks share: the bundle, its manifest, the output folder, the log, what was loaded so far."""

    def __init__(self, bundle: Path, out: Path, dry_run: bool):
        self.bundle, self.out, self.dry_run = bundle.resolve(), out, dry_run
        self.started = time.monotonic()
        self.manifest: dict = {}
        self.results: dict = {"dry_run": dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "checks": {}}
        self.torch = None
        self.kiln_runtime = None
        out.mkdir(parents=True, exist_ok=True)
        self._log = open(out / "gpu_check.log", "a")  # noqa: SIM115  (open for the whole run, line by line)

    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] {msg}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def left_s(self) -> float:
        return TIME_LIMIT_S - (time.monotonic() - self.started)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))

    def gpu(self) -> bool:
        return not self.dry_run


Check = Callable[[Run], dict]
CHECKS: list[tuple[str, Check]] = []


def check(name: str):
    def register(fn: Check) -> Check:
        CHECKS.append((name, fn))
        return fn
    return register


def run_check(run: Run, name: str, fn: Check) -> bool:
    run.log(f"--- {name}")
    t0 = time.monotonic()
    try:
        result = fn(run) or {}
        result.setdefault("ok", True)
    except Skip as why:
        result = {"ok": None, "skipped": str(why)}
    except Exception as err:  # noqa: BLE001  (the point of the script: record it, go on to the next check)
        result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    result["seconds"] = round(time.monotonic() - t0, 2)
    run.results["checks"][name] = result
    run.log(f"    {json.dumps({k: v for k, v in result.items() if k != 'traceback'}, default=str)[:1500]}")
    if "traceback" in result:
        run.log(result["traceback"])
    run.save()
    return bool(result["ok"])


class Skip(Exception):
    """A check that does not apply here (no GPU in a dry run, no torch, out of time)."""


def sh(cmd: list[str], timeout: float = 30) -> str:
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    return (done.stdout + done.stderr).strip()


# --- the checks, in order ----------------------------------------------------------------------------------

@check("environment")
def environment(run: Run) -> dict:
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": np.__version__}
    if shutil.which("nvidia-smi"):
        env["nvidia_smi"] = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                "--format=csv,noheader"])
    else:
        env["nvidia_smi"] = None
    env["nvcc"] = sh(["nvcc", "--version"]).splitlines()[-1] if shutil.which("nvcc") else None
    try:
        import torch

        run.torch = torch
        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if env["cuda_available"]:
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        env["torch"] = None
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:
        env["torchvision"] = None
    run.results["environment"] = env
    if run.gpu() and not env["nvidia_smi"]:
        return {"ok": False, **env, "error": "no nvidia-smi: not a GPU machine?"}
    return env


@check("manifest")
def manifest(run: Run) -> dict:
    import hashlib

    path = run.bundle / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no bundle; build it with python bench/gpu_bundle.py")
    m = run.manifest = json.loads(path.read_text())
    bad = []
    for rel, want in m["files"].items():
        p = run.bundle / rel
        if not p.is_file():
            bad.append(f"{rel}: missing")
        elif p.stat().st_size != want["bytes"] or hashlib.sha256(p.read_bytes()).hexdigest() != want["sha256"]:
            bad.append(f"{rel}: differs from the manifest")
    for entry in m["models"]:
        if entry.get("generate_io"):  # inputs and references made here from the seed (generated_io)
            if entry["artifact"] not in m["files"]:
                bad.append(f"{entry['name']}: its artifact {entry['artifact']} is not in the manifest's files")
            continue
        for key in ("artifact", "inputs", "reference"):
            if entry[key] not in m["files"]:
                bad.append(f"{entry['name']}: its {key} {entry[key]} is not in the manifest's files")
        if any(e.startswith(f"{entry[k]}:") for e in bad for k in ("inputs", "reference")):
            continue  # damaged: reported above
        inputs = np.load(run.bundle / entry["inputs"])
        ref = np.load(run.bundle / entry["reference"])
        if sorted(inputs.files) != sorted(entry["input_names"]) or sorted(ref.files) != sorted(entry["output_names"]):
            bad.append(f"{entry['name']}: inputs or references do not name the manifest's inputs and outputs")
    if m.get("ffi_wheel") is None:
        bad.append("no tvm_ffi wheel in the bundle (built with --no-wheel, or pip download failed)")
    return {"ok": not bad, "problems": bad, "models": [e["name"] for e in m["models"]], "target": m["target"],
            "total_mib": round(m["total_bytes"] / 2**20, 1), "kiln_commit": m.get("kiln_commit")}


@check("install_ffi")
def install_ffi(run: Run) -> dict:
    """tvm_ffi from the bundle's wheel, into a temporary site dir put first on sys.path (no network there)."""
    wheel = run.manifest.get("ffi_wheel")
    if run.dry_run:
        if wheel is None:
            raise Skip("no wheel in the bundle")
        with zipfile.ZipFile(run.bundle / wheel) as z:
            has = any(n == "tvm_ffi/__init__.py" for n in z.namelist())
        import tvm_ffi  # the one installed here

        return {"ok": has, "wheel": wheel, "wheel_has_tvm_ffi": has, "local_tvm_ffi": tvm_ffi.__version__}
    try:
        import tvm_ffi

        return {"wheel": wheel, "already_installed": tvm_ffi.__version__}
    except ImportError:
        pass
    if wheel is None:
        raise FileNotFoundError("no tvm_ffi installed and no wheel in the bundle")
    site = Path(tempfile.mkdtemp(prefix="kiln-site-"))
    out = sh([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
              "--target", str(site), str(run.bundle / wheel)], timeout=120)
    sys.path.insert(0, str(site))
    import tvm_ffi

    return {"wheel": wheel, "site": str(site), "tvm_ffi": tvm_ffi.__version__, "pip": out[-500:]}


@check("runtime")
def runtime(run: Run) -> dict:
    """kiln.runtime from the bundle's sources, TVM's runtime libraries from the bundle (KILN_TVM_RUNTIME_DIR)."""
    os.environ["KILN_TVM_RUNTIME_DIR"] = str(run.bundle / run.manifest.get("tvm_lib", "tvm_lib"))
    sys.path.insert(0, str(run.bundle / run.manifest.get("src", "src")))
    for name in [m for m in sys.modules if m == "kiln" or m.startswith("kiln.")]:
        del sys.modules[name]  # the bundle's copy, even where an installed Kiln was imported first
    rt = importlib.import_module("kiln.runtime")
    cuda = importlib.import_module("kiln.runtime.cuda")
    run.kiln_runtime = rt
    stray = stray_modules(run.bundle / run.manifest.get("src", "src"))
    from_bundle = not stray and str(run.bundle) in str(Path(rt.__file__).resolve())
    cuda.load_bundle_runtime()
    why = cuda.load_cuda_runtime()
    result = {"kiln_runtime": rt.__file__, "from_bundle": from_bundle, "stray_modules": stray,
              "cuda_runtime": why or "loaded"}
    if why is not None:
        if run.dry_run:
            return {**result, "ok": from_bundle, "note": "no CUDA driver here, as expected in a dry run"}
        return {**result, "ok": False}
    count, why = cuda.CudaApi().device_count()
    return {**result, "ok": from_bundle and count > 0, "devices": count, "why": why}


def _repeat_for(first_ms: float) -> int:
    """Launches per block: about 0.2 s of device time, 3 to REPEAT (untuned kernels may take 100 ms a run)."""
    return max(3, min(REPEAT, int(200 / max(first_ms, 1e-3))))


def _median_of_blocks(times_block: Callable[[], list[float]]) -> dict:
    blocks = [statistics.median(times_block()) for _ in range(BLOCKS)]
    return {"median_ms": round(statistics.median(blocks), 4), "blocks_ms": [round(b, 4) for b in blocks]}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))


def generated_io(entry: dict) -> tuple[dict, dict, float]:
    """(inputs, ONNX Runtime's float32 outputs, seconds) of a bundle entry too large to carry them (ResNet-50 at
    batch 32: 19 MB of input): the zoo model from the bundle's sources (onnx is there), its seeded inputs, and
    ONNX Runtime on this machine's CPU."""
    import onnxruntime as ort

    from kiln.model_builders import random_feeds
    from kiln.zoo import resolve

    t0 = time.perf_counter()
    model = resolve(entry["zoo"])
    feeds = random_feeds(model, seed=entry["generate_io"]["seed"])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    refs = dict(zip(entry["output_names"], sess.run(entry["output_names"], feeds)))
    return feeds, refs, round(time.perf_counter() - t0, 1)


def model_check(entry: dict) -> Check:
    def fn(run: Run) -> dict:
        bundle = run.bundle
        if entry.get("generate_io"):
            feeds, refs, io_s = generated_io(entry)
        else:
            feeds, refs, io_s = dict(np.load(bundle / entry["inputs"])), dict(np.load(bundle / entry["reference"])), 0
        xs = [feeds[n] for n in entry["input_names"]]
        art = bundle / entry["artifact"]
        rebuilt = rebuild_weights(run, entry) if entry.get("weights") == "rebuild" else None
        if run.dry_run:
            rt = run.kiln_runtime
            try:
                rt.load(art)
            except Exception as err:  # noqa: BLE001  (expected here: no driver; anything else is a finding)
                msg = str(err)
                expected = "no CUDA driver" in msg
                return {"ok": expected and (rebuilt is None or rebuilt["ok"]), "load": msg[:300],
                        "weights_rebuilt": rebuilt, "inputs": {k: list(v.shape) for k, v in feeds.items()},
                        "outputs": {k: list(v.shape) for k, v in refs.items()}}
            return {"ok": False, "load": "loaded on a machine without a GPU?"}
        if run.left_s() < 30:
            raise Skip("out of time")
        rt = run.kiln_runtime
        cuda = importlib.import_module("kiln.runtime.cuda")
        result: dict = {"model": entry["model"].partition(",")[0], "precision": entry.get("precision", "fp32"),
                        "batch": entry.get("batch", 1), "compile_s": entry.get("compile_s"),
                        "weights_rebuilt": rebuilt, "generated_io_s": io_s}
        t0 = time.perf_counter()
        m = rt.load(art)
        result["load_s"] = round(time.perf_counter() - t0, 3)
        got = m.run(*xs)
        errs = {}
        ok = True
        half = entry.get("precision", "fp32") in ("fp16", "bf16")
        for name, g in zip(entry["output_names"], got):
            want = refs[name]
            cos = cosine(g, want)
            close = cos >= COSINE if half else bool(np.allclose(g, want, rtol=RTOL, atol=ATOL))
            ok &= close
            errs[name] = {"match": close, "max_abs_err": float(np.max(np.abs(g.astype(np.float64) - want))),
                          "cosine": cos}
        result["outputs"] = errs
        result["match"] = ok
        repeat = _repeat_for(statistics.median(cuda.launch_times_ms(m, 3)))
        result["launches_per_block"] = repeat
        result["graph_launch"] = _median_of_blocks(lambda: cuda.launch_times_ms(m, repeat))
        m_eager = rt.load(art, cuda_graphs=False)
        again = m_eager.run(*xs)
        result["no_graph_match"] = all(np.allclose(a, b, rtol=RTOL, atol=ATOL) for a, b in zip(again, got))
        result["no_graph_launch"] = _median_of_blocks(lambda: cuda.launch_times_ms(m_eager, repeat))
        walls = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            m.run(*xs)
            walls.append((time.perf_counter() - t0) * 1e3)
        result["run_wall_ms_median"] = round(statistics.median(walls), 4)  # copies in and out included
        torch = run.torch
        if torch is not None and torch.cuda.is_available():
            tx = [torch.from_numpy(x).cuda() for x in xs]
            torch.cuda.synchronize()
            dl = m.run(*tx)
            dl_eager = m_eager.run(*tx)  # without a graph the tensor is bound in place (aligned) or copied
            ys = [torch.from_dlpack(y) for y in m.run_dlpack(*tx)]
            result["dlpack_input_match"] = all(np.allclose(a, b, rtol=RTOL, atol=ATOL)
                                               for a, b in zip(dl + dl_eager, got + got))
            result["dlpack_output_match"] = all(np.allclose(y.cpu().numpy(), b, rtol=RTOL, atol=ATOL)
                                                for y, b in zip(ys, got))
            result["dlpack_output_device"] = str(ys[0].device)
        result["ok"] = ok and result["no_graph_match"] and result.get("dlpack_input_match", True) and result.get(
            "dlpack_output_match", True)
        return result
    return fn


# kiln.rebuild_weights run from the bundle's sources, failing if any kiln module came from elsewhere (here an
# editable install of Kiln would fill in whatever the bundle lacks; the GPU machine has none)
LAUNCH = """import runpy, sys
src = sys.argv.pop(1)
try:
    runpy.run_module("kiln.rebuild_weights", run_name="__main__", alter_sys=True)
finally:
    stray = sorted(n for n, m in list(sys.modules.items())
                   if n.split(".")[0] == "kiln" and not (getattr(m, "__file__", None) or src).startswith(src))
    if stray:
        print("kiln modules not from the bundle:", stray)
        sys.exit(3)
"""


def stray_modules(src: Path) -> list[str]:
    """Kiln modules loaded from anywhere but the bundle's sources."""
    return sorted(n for n, m in list(sys.modules.items())
                  if n.split(".")[0] == "kiln" and not (getattr(m, "__file__", None) or str(src)).startswith(str(src)))


def rebuild_weights(run: Run, entry: dict) -> dict:
    """The weights file left behind at bundling, made again from the zoo's seeded code with the bundle's Kiln
    sources and no TVM (a shim makes `import tvm` fail, as on the GPU machine); the tool checks the CRC-32
    against the artifact's metadata. A dry run writes into a temporary folder, never into the bundle."""
    art = run.bundle / entry["artifact"]
    out = (Path(tempfile.mkdtemp(prefix="kiln-weights-")) if run.dry_run else art.parent) / f"{art.stem}.weights"
    shim = Path(tempfile.mkdtemp(prefix="kiln-notvm-")) / "tvm"
    shim.mkdir()
    (shim / "__init__.py").write_text('raise ImportError("no TVM here (gpu_check shim)")\n')
    src = run.bundle / run.manifest.get("src", "src")
    (shim.parent / "launch.py").write_text(LAUNCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim.parent), str(src), *sys.path[1:]])}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(shim.parent / "launch.py"), str(src), entry["zoo"], "--target",
                          run.manifest["target"], "--precision", entry.get("precision", "fp32"), "--artifact",
                          str(art), "-o", str(out)], check=False,
                         capture_output=True, text=True, timeout=180, env=env, cwd=shim.parent)
    result = {"ok": done.returncode == 0 and out.is_file(), "seconds": round(time.perf_counter() - t0, 1),
              "output": (done.stdout + done.stderr)[-600:],
              "mib": round(out.stat().st_size / 2**20, 1) if out.is_file() else None}
    if run.dry_run:
        shutil.rmtree(out.parent)  # ResNet-50's are 100 MB
    shutil.rmtree(shim.parent)
    return result


def torch_net(torch, name: str, batch: int, dt):
    """(module, inputs) on the GPU: a torchvision model at `batch` (channels-last), or, for "bert_layer", torch's
    own BERT-base encoder layer (768 wide, 12 heads, 3072 FFN, GELU, post-norm, as kiln.model_builders builds
    it) on 128 tokens whose last quarter is padding."""
    if name == "bert_layer":
        layer = torch.nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, activation="gelu", batch_first=True,
                                                 layer_norm_eps=1e-12)
        net = layer.eval().cuda().to(dt)
        x = torch.randn(batch, 128, 768, device="cuda", dtype=dt)
        pad = torch.zeros(batch, 128, dtype=torch.bool, device="cuda")
        pad[:, 96:] = True
        return (lambda x, pad: net(x, src_key_padding_mask=pad)), net, (x, pad)
    import torchvision

    net = getattr(torchvision.models, name)(weights=None).eval().cuda().to(dt).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dt).to(memory_format=torch.channels_last)
    return net, net, (x,)


def torch_anchor(name: str, dtype: str, batch: int = 1) -> Check:
    """torch_net(name) at `batch` in `dtype`: eager and torch.compile(mode="reduce-overhead"), cudnn.benchmark on,
    each the median of 5 blocks timed with CUDA events."""
    def fn(run: Run) -> dict:
        if run.dry_run:
            raise Skip("no GPU in a dry run")
        torch = run.torch
        if torch is None or not torch.cuda.is_available():
            raise Skip("torch with CUDA is not available")
        if run.left_s() < 60:
            raise Skip(f"out of time ({run.left_s():.0f} s left)")
        torch.backends.cudnn.benchmark = True
        dt = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
        call, _, args = torch_net(torch, name, batch, dt)

        def time_fn(f) -> dict:
            with torch.no_grad():  # not inference_mode: torch.compile's CUDA graphs are made under no_grad
                for _ in range(10):
                    f(*args)
                torch.cuda.synchronize()

                def block() -> list[float]:
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(REPEAT):
                        f(*args)
                    end.record()
                    end.synchronize()
                    return [start.elapsed_time(end) / REPEAT]
                return _median_of_blocks(block)

        result = {"eager": time_fn(call)}
        t0 = time.perf_counter()
        compiled = torch.compile(call, mode="reduce-overhead")
        with torch.no_grad():
            compiled(*args)
            compiled(*args)
            torch.cuda.synchronize()
        result["compile_s"] = round(time.perf_counter() - t0, 1)
        result["compiled_reduce_overhead"] = time_fn(compiled)
        return result
    return fn


def plugin_checks(run: Run) -> list[tuple[str, Check]]:
    """Checks other modules in bench/ contribute (`CHECKS = [(name, fn)]`); a module that fails to import is
    recorded as a failed check of its own."""
    found = []
    sys.path.insert(0, str(HERE))
    for mod in PLUGINS:
        if not (HERE / f"{mod}.py").is_file():
            continue
        try:
            found += list(importlib.import_module(mod).CHECKS)
        except Exception as err:  # noqa: BLE001  (one broken plug-in never hides the others)
            msg = f"{type(err).__name__}: {err}"
            found.append((f"{mod}.import", lambda run, msg=msg: {"ok": False, "error": msg}))
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=HERE.parent / "gpu_bundle")
    ap.add_argument("--out", type=Path, default=None, help="where gpu_check.json and the log go ($OUT there)")
    ap.add_argument("--dry-run", action="store_true", help="on a machine without a GPU: check what can be")
    ap.add_argument("--no-anchors", action="store_true", help="skip the torch anchors")
    args = ap.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_check-"))
    run = Run(args.bundle, out, args.dry_run)
    run.log(f"gpu_check: bundle {run.bundle}, out {out}, dry run {args.dry_run}")
    for name, fn in CHECKS:
        run_check(run, name, fn)
    for entry in run.manifest.get("models", []):
        run_check(run, f"model.{entry['name']}", model_check(entry))
    for name, fn in plugin_checks(run):  # before the anchors, which take what time is left
        if run.left_s() < 20 and not run.dry_run:
            run.results["checks"][name] = {"ok": None, "skipped": "out of time"}
            continue
        run_check(run, name, fn)
    if not args.no_anchors:
        models = run.manifest.get("models", [])
        names = [e["torchvision"] for e in models if e.get("torchvision") and e.get("batch", 1) == 1]
        if any(e["model"].startswith("bert_layer") for e in models):
            names.append("bert_layer")  # torch's own encoder layer (torch_net)
        for name in dict.fromkeys([*names, "resnet50"]):
            for dtype in ("fp32", "fp16"):
                run_check(run, f"torch.{name}.{dtype}", torch_anchor(name, dtype))
        for e in models:  # larger batches: the precision the bundle built them in
            if e.get("torchvision") and e.get("batch", 1) > 1 and e.get("precision") in ("fp32", "fp16"):
                run_check(run, f"torch.{e['torchvision']}.b{e['batch']}.{e['precision']}",
                          torch_anchor(e["torchvision"], e["precision"], e["batch"]))
    failed = [k for k, v in run.results["checks"].items() if v.get("ok") is False]
    run.results["failed"] = failed
    run.save()
    run.log(f"done in {time.monotonic() - run.started:.0f} s; failed: {failed or 'none'}; "
            f"results in {out / 'gpu_check.json'}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
