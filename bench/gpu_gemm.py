"""Tensor-core GEMM bench (issue 15): cuda.dense_tensorcore at 4096³ in float16 and bfloat16 against cuBLAS
(torch.matmul), on the GPU machine, from kernels built here.

    python bench/gpu_gemm.py --build /tmp/gemm_bundle [--target cuda-sm90]   # here: kernels, PTX, manifest
    python3 bench/gpu_gemm.py --bundle /tmp/gemm_bundle --out $OUT          # there: check, time, gemm.json

`--build` lowers y = x @ w.T (x, w: [4096, 4096], y rounded to the input dtype, float32 sums) through the
template registry at a few knob points (the default among them), compiles each to a library (`<name>.so`, its
CUDA module as CUDA C source, as TVM 0.27 writes it) and to PTX with the local nvcc (`<name>.ptx`), and copies
TVM's runtime libraries into `tvm_lib/` and the apache-tvm-ffi wheel, if cached by bench/gpu_bundle.py, into
`wheels/`. There nothing compiles: TVM's CUDA runtime asks `tvm_callback_cuda_compile` for the kernels' PTX and
gets the file built here. Each point is checked against torch.matmul (relative Frobenius error, and against a
float32 product) and timed with CUDA events against cuBLAS on the same inputs; TFLOP/s = 2·m·n·k / time.

bench/gpu_check.py runs it as a plug-in (`CHECKS`) on `<bundle>/gemm`, built with
`python bench/gpu_gemm.py --build gpu_bundle/gemm --kernels-only` (gpu_check has loaded TVM's runtime and tvm_ffi
from the bundle by then); `run(bundle_dir, out_dir)`
is the same bench for any caller. Nothing here imports Kiln on the GPU machine: only tvm_ffi, torch and the
bundled TVM runtime libraries.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZE = 4096
TEMPLATE = "cuda.dense_tensorcore"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_runtime_extra.so", "libtvm_runtime_cuda.so")
WHEEL_CACHE = Path.home() / ".cache" / "kiln" / "gpu_bundle"
# (name, dtype, knobs over the default: {} is the default config itself)
POINTS = [
    ("f16_default", "float16", {}),
    ("f16_128x256", "float16", {"block_m": 128, "block_n": 256, "warp_m": 64, "warp_n": 64}),
    ("f16_256x128", "float16", {"block_m": 256, "block_n": 128, "warp_m": 64, "warp_n": 64}),
    ("f16_128x128_s4", "float16", {"stages": 4}),
    ("f16_128x128_k64", "float16", {"chunk_k": 64, "stages": 2}),
    ("bf16_default", "bfloat16", {}),
    ("bf16_128x256", "bfloat16", {"block_m": 128, "block_n": 256, "warp_m": 64, "warp_n": 64}),
]
MAX_REL_ERR = 1e-2  # against the float32 product: rounding the output to bfloat16 alone costs ~2e-3
WARMUP, REPEAT, BLOCKS = 5, 20, 5  # the median of BLOCKS blocks' per-launch times over REPEAT launches


# --- here: build ---------------------------------------------------------------------------------------------

def build(out: Path, target_name: str, points=POINTS, runtime: bool = True) -> dict:
    """Every point's library and PTX into `out`, and gemm.json listing them; with `runtime`, TVM's runtime
    libraries and the tvm_ffi wheel too (without: inside a gpu_bundle, whose own copies gpu_check loads)."""
    import tvm
    from kiln.codegen.cuda import compile_ptx, device_source
    from kiln.codegen.lower import lower_group
    from kiln.codegen.target import resolve_target
    from kiln.ir import Call, Function, TensorType, var
    from kiln.ir.ops.dense import DENSE, DenseAttrs
    from kiln.schedules.dispatch import task_of
    from kiln.schedules.target_info import target_info

    target = resolve_target(target_name)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, dtype, knobs in points:
        started = time.monotonic()
        x, w = var("x", TensorType((SIZE, SIZE), dtype)), var("w", TensorType((SIZE, SIZE), dtype))
        fn = Function((x, w), Call(DENSE, (x, w), DenseAttrs()), {"primitive": True, "name": name})
        template, wl = task_of(fn, target)
        if template.name != TEMPLATE:
            raise SystemExit(f"{name}: {template.name} took the {dtype} GEMM, not {TEMPLATE}")
        cfg = {**template.default(wl, target_info(target)), **knobs}
        lowered = lower_group(fn, f"gemm_{name}", target, {wl.key: cfg})
        if lowered.config != cfg or lowered.template != template.key:
            raise SystemExit(f"{name}: scheduled {lowered.template} {lowered.config} ({lowered.config_source}), "
                             f"not {cfg}")
        executable = tvm.compile(tvm.IRModule({lowered.symbol: lowered.prim_func}), target=target)
        executable.export_library(str(out / f"{name}.so"))
        ptx = compile_ptx(device_source(executable), target)
        (out / f"{name}.ptx").write_text(ptx)
        entries.append({"name": name, "dtype": dtype, "m": SIZE, "n": SIZE, "k": SIZE, "config": cfg,
                        "function": lowered.symbol, "so": f"{name}.so", "ptx": f"{name}.ptx",
                        "schedule": lowered.schedule, "ptxas": ptxas_usage(out / f"{name}.ptx", target_name),
                        "build_s": round(time.monotonic() - started, 1)})
        print(f"{name}: {lowered.schedule} {entries[-1]['ptxas']} in {entries[-1]['build_s']} s", flush=True)
    libs = _runtime_libs() if runtime else None
    if libs is not None:
        (out / "tvm_lib").mkdir(exist_ok=True)
        for lib in RUNTIME_LIBS:
            shutil.copy2(libs / lib, out / "tvm_lib" / lib)
    wheels = sorted(WHEEL_CACHE.glob("apache_tvm_ffi-*cp312*.whl")) if runtime and WHEEL_CACHE.is_dir() else []
    if wheels:
        (out / "wheels").mkdir(exist_ok=True)
        shutil.copy2(wheels[-1], out / "wheels" / wheels[-1].name)
    manifest = {"format": 1, "template": TEMPLATE, "target": target_name, "points": entries,
                "tvm_lib": "tvm_lib" if libs is not None else None,
                "ffi_wheel": f"wheels/{wheels[-1].name}" if wheels else None}
    (out / "gemm.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def ptxas_usage(ptx: Path, target_name: str) -> dict:
    """Registers, spill bytes and shared memory of the PTX's kernel, from `ptxas -v` for the target's arch."""
    arch = "sm_90" if target_name.endswith("sm90") else "sm_80"
    run = subprocess.run(["ptxas", "-v", f"-arch={arch}", str(ptx), "-o", os.devnull], capture_output=True,
                         text=True, check=True)
    return parse_ptxas(run.stderr)


def parse_ptxas(text: str) -> dict:
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spills.group(1)) if spills else None,
            "spill_load_bytes": int(spills.group(2)) if spills else None}


def _runtime_libs() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("tvm")
    return Path(spec.origin).parent / "lib" if spec is not None and spec.origin else None


# --- there: load, check, time ---------------------------------------------------------------------------------

_PTX: dict[str, str] = {}  # kernel name → the PTX holding it, for every library loaded so far
_previous_callback = None  # the callback registered before ours (Kiln's, under gpu_check): restored after run()


def _kernel_names(text: str, pattern: str) -> list[str]:
    return re.findall(pattern, text, flags=re.MULTILINE)


def _compile_callback(code: str, target) -> bytes:
    """TVM's CUDA runtime compiling a module's CUDA source: the PTX built beside it instead."""
    names = _kernel_names(code, r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(')
    ptx = {_PTX.get(n) for n in names}
    if ptx == {None} and _previous_callback is not None:
        return _previous_callback(code, target)  # not one of ours
    if not names or None in ptx or len(ptx) != 1:
        raise RuntimeError(f"no bundled PTX holds the kernels {names}")
    return ptx.pop().encode()


def load_runtime(bundle: Path, manifest: dict):
    """tvm_ffi and TVM's runtime libraries (bundle's tvm_lib/, else KILN_TVM_RUNTIME_DIR, else an installed
    apache-tvm), the compile callback registered; the tvm_ffi module (from the bundle's wheel if not installed)."""
    try:
        import tvm_ffi
    except ImportError:
        if not manifest.get("ffi_wheel"):
            raise
        import tempfile

        site = tempfile.mkdtemp(prefix="kiln-gemm-site-")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", site,
                        str(bundle / manifest["ffi_wheel"])], check=True, timeout=120)
        sys.path.insert(0, site)
        import tvm_ffi

    for d in (bundle / (manifest.get("tvm_lib") or "tvm_lib"), os.environ.get("KILN_TVM_RUNTIME_DIR"),
              _runtime_libs()):
        if d is not None and all((Path(d) / lib).is_file() for lib in RUNTIME_LIBS):
            for lib in RUNTIME_LIBS:
                ctypes.CDLL(str(Path(d) / lib), mode=ctypes.RTLD_GLOBAL)
            break
    else:
        raise FileNotFoundError(f"TVM's runtime libraries {RUNTIME_LIBS} are in neither {bundle}/tvm_lib, "
                                "KILN_TVM_RUNTIME_DIR nor an installed apache-tvm")
    global _previous_callback
    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    if previous is not None and _previous_callback is None:
        _previous_callback = previous
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile_callback, override=True)
    return tvm_ffi


def restore_callback(tvm_ffi) -> None:
    """Give the compile callback back to whoever held it before load_runtime (Kiln's loader, under gpu_check)."""
    if _previous_callback is not None:
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", _previous_callback, override=True)


def _time_ms(torch, fn) -> dict:
    """Per-launch milliseconds: the median over BLOCKS blocks of REPEAT launches between two CUDA events."""
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    blocks = []
    for _ in range(BLOCKS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPEAT):
            fn()
        end.record()
        end.synchronize()
        blocks.append(start.elapsed_time(end) / REPEAT)
    return {"median_ms": statistics.median(blocks), "blocks_ms": [round(b, 4) for b in blocks]}


def run(bundle_dir, out_dir=None, log=print) -> dict:
    """Every point of the bundle: relative error against torch.matmul and a float32 product, TFLOP/s against
    cuBLAS; the results, also written to out_dir/gemm.json. "ok" when every point loads, runs and is within
    MAX_REL_ERR."""
    import torch

    bundle = Path(bundle_dir)
    manifest = json.loads((bundle / "gemm.json").read_text())
    tvm_ffi = load_runtime(bundle, manifest)
    try:
        return _run(torch, tvm_ffi, bundle, manifest, out_dir, log)
    finally:
        restore_callback(tvm_ffi)


def _run(torch, tvm_ffi, bundle: Path, manifest: dict, out_dir, log) -> dict:
    torch.manual_seed(0)
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "cublas": {}, "points": {}}
    inputs = {}
    for dtype in sorted({p["dtype"] for p in manifest["points"]}):
        tdt = getattr(torch, dtype)
        x = torch.randn(SIZE, SIZE, device="cuda").to(tdt)
        w = torch.randn(SIZE, SIZE, device="cuda").to(tdt)
        exact = x.float() @ w.float().T  # TF32 is off by default for float32 matmul in torch
        reference = torch.matmul(x, w.T)
        cublas = _time_ms(torch, lambda x=x, w=w: torch.matmul(x, w.T))
        flops = 2 * SIZE**3
        results["cublas"][dtype] = {**cublas, "tflops": flops / cublas["median_ms"] / 1e9,
                                    "rel_err_vs_f32": _rel(reference, exact)}
        inputs[dtype] = (x, w, exact, reference)
        log(f"cuBLAS {dtype}: {cublas['median_ms']:.3f} ms, {results['cublas'][dtype]['tflops']:.0f} TFLOP/s")
    ok = True
    for p in manifest["points"]:
        name = p["name"]
        try:
            for kernel in _kernel_names((bundle / p["ptx"]).read_text(), r"^\.visible \.entry (\w+)\("):
                _PTX[kernel] = (bundle / p["ptx"]).read_text()
            module = tvm_ffi.load_module(str((bundle / p["so"]).resolve()))
            f = module[p["function"]]
            x, w, exact, reference = inputs[p["dtype"]]
            y = torch.empty(SIZE, SIZE, dtype=x.dtype, device="cuda")
            f(x, w, y)
            torch.cuda.synchronize()
            err, err_cublas = _rel(y, exact), _rel(y, reference)
            timing = _time_ms(torch, lambda f=f, x=x, w=w, y=y: f(x, w, y))
            tflops = 2 * p["m"] * p["n"] * p["k"] / timing["median_ms"] / 1e9
            ratio = tflops / results["cublas"][p["dtype"]]["tflops"]
            good = err <= MAX_REL_ERR
            ok &= good
            results["points"][name] = {"config": p["config"], "ok": good, "rel_err_vs_f32": err,
                                       "rel_err_vs_cublas": err_cublas, **timing, "tflops": tflops,
                                       "ratio_to_cublas": ratio, "ptxas": p.get("ptxas")}
            log(f"{name}: {timing['median_ms']:.3f} ms, {tflops:.0f} TFLOP/s = {ratio:.0%} of cuBLAS, "
                f"rel err {err:.2e} (vs cuBLAS {err_cublas:.2e}){'' if good else '  WRONG'}")
        except Exception as err:  # noqa: BLE001  (one point failing never hides the others; recorded, not passed)
            ok = False
            results["points"][name] = {"config": p["config"], "ok": False, "error": f"{type(err).__name__}: {err}"}
            log(f"{name}: FAILED {type(err).__name__}: {err}")
    results["ok"] = ok
    best = max((r for r in results["points"].values() if "tflops" in r), key=lambda r: r["tflops"], default=None)
    if best is not None:
        results["best"] = {k: best[k] for k in ("config", "tflops", "ratio_to_cublas")}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "gemm.json").write_text(json.dumps(results, indent=1))
    return results


def _rel(got, want) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def check_bundle(bundle_dir) -> dict:
    """What a machine without a GPU can check of a bundle: every file present, each PTX holding mma.sync
    m16n8k16 with float32 sums, ldmatrix and cp.async."""
    bundle = Path(bundle_dir)
    manifest = json.loads((bundle / "gemm.json").read_text())
    missing, lacking = [], {}
    for p in manifest["points"]:
        missing += [p[f] for f in ("so", "ptx") if not (bundle / p[f]).is_file()]
        if (bundle / p["ptx"]).is_file():
            ptx = (bundle / p["ptx"]).read_text()
            need = ("mma.sync.aligned.m16n8k16.row.col.f32", "ldmatrix.sync.aligned", "cp.async")
            if absent := [s for s in need if s not in ptx]:
                lacking[p["name"]] = absent
    return {"ok": not missing and not lacking, "points": [p["name"] for p in manifest["points"]],
            "missing": missing, "ptx_lacking": lacking}


def _gpu_check(run_) -> dict:
    """The bench/gpu_check.py plug-in: the bundle's gemm/ folder (build it with --build <bundle>/gemm)."""
    bundle = run_.bundle / "gemm"
    if not (bundle / "gemm.json").is_file():
        return {"ok": None, "skipped": f"no {bundle}/gemm.json: python bench/gpu_gemm.py --build {bundle}"}
    if run_.dry_run:
        return check_bundle(bundle)
    return run(bundle, run_.out / "gemm", log=run_.log)


CHECKS = [("gemm.tensorcore", _gpu_check)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, help="build the kernels into this folder (here, with TVM and nvcc)")
    ap.add_argument("--target", default="cuda-sm90", help="cuda-sm90 (H100/H200) or cuda-sm80")
    ap.add_argument("--only", nargs="*", help="build only these points (names from POINTS)")
    ap.add_argument("--kernels-only", action="store_true",
                    help="leave out TVM's runtime and the tvm_ffi wheel (building into gpu_bundle/gemm: 8 MB less)")
    ap.add_argument("--bundle", type=Path, help="run the bench on the kernels in this folder (on the GPU)")
    ap.add_argument("--out", type=Path, default=None, help="where gemm.json goes (default $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="check the bundle's files without a GPU")
    args = ap.parse_args(argv)
    if args.build:
        points = [p for p in POINTS if not args.only or p[0] in args.only]
        build(args.build, args.target, points, runtime=not args.kernels_only)
        print(json.dumps(check_bundle(args.build)))
        return 0
    if args.bundle is None:
        ap.error("give --build DIR (here) or --bundle DIR (on the GPU machine)")
    if args.dry_run:
        result = check_bundle(args.bundle)
        print(json.dumps(result, indent=1))
        return 0 if result["ok"] else 1
    result = run(args.bundle, args.out or os.environ.get("OUT"))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
