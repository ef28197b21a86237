"""Measures a packed batch of tuning candidates on a machine that has only TVM's runtime: a GPU host reached in
short runs, with no TVM compiler, no kiln dependencies and no network.

    python3 BATCH/device_worker.py BATCH [--budget-s 480] [--timeout-s 30]

`autotune/batch.py` builds the candidates here, computes their inputs and NumPy reference outputs, and writes
them with a manifest and a copy of this file into BATCH; this script needs the Python standard library, NumPy,
`tvm_ffi` and TVM's runtime libraries (libtvm_runtime.so, libtvm_runtime_extra.so and, for CUDA,
libtvm_runtime_cuda.so, found with --runtime-dir, $KILN_TVM_RUNTIME_DIR or an installed `tvm`). It appends one
JSON line per candidate to BATCH/results.jsonl and `batch.py` turns them into tuning records.

A candidate cannot take the run down: a child process measures, the parent watches it, and a crash or a hang
costs that candidate (recorded as its error) while a fresh child goes on with the rest. After a CUDA error the
child exits too, since a faulted CUDA context fails every later launch. A rerun skips what results.jsonl already
holds, and no candidate starts after the budget, so a run sized to the device's time limit returns its results.

Every candidate is checked against its reference before it is timed: on a device reached in batches, a wrong
kernel discovered later would cost a whole round trip.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import select
import struct
import subprocess
import sys
import time

import numpy as np

MANIFEST = "manifest.json"
RESULTS = "results.jsonl"
ENTRY = "main"
DEVICE_TYPES = {"cpu": 1, "cuda": 2}
CUDA_ERROR_EXIT = 3  # the child's exit status after a CUDA error: the parent restarts it, nothing lost

# (rtol, atol) of a candidate's output against the NumPy reference, by output dtype; other dtypes are exact.
# The tuner's local runner compares with these too (runner.py imports them): one definition.
TOLERANCES = {
    "float32": (1e-3, 1e-4),
    "float64": (1e-6, 1e-8),
    "float16": (1e-2, 1e-2),
    "bfloat16": (2e-2, 2e-2),
}
# 8- and 16-bit integer outputs are quantized values: a float sum taken in another order than the reference's
# rounds a value next to a .5 to the other side, one step off (seen on 1 of 401,408 elements of a QDQ
# MobileNetV2's depthwise conv). One step on at most 1 in 1,000 elements passes; anything more is wrong.
QUANTIZED = ("uint8", "int8", "uint16", "int16")
QUANTIZED_FLIPS = 1e-3


def compare(got: np.ndarray, want: np.ndarray, dtype: str | None = None, step: float | None = None) -> str | None:
    """None when `got` matches the reference within the dtype's tolerance; else "wrong result: ...". `step`: the
    output is a dequantized value of that step (a kernel ending in dequantize), so, as for integer outputs, at
    most 1 in 1,000 values may be one step off."""
    if got.shape != want.shape:
        return f"wrong result: shape {got.shape}, reference {want.shape}"
    rtol, atol = TOLERANCES.get(dtype or str(want.dtype), (0.0, 0.0))
    g, w = got.astype(np.float64), want.astype(np.float64)
    if step:
        off = ~np.isclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
        flips = np.abs(g - w)[off]
        if flips.size <= QUANTIZED_FLIPS * g.size and flips.max(initial=0) <= step * (1 + 1e-3) + atol:
            return None
    if (dtype or str(want.dtype)) in QUANTIZED:
        off = np.abs(g - w)
        n_off = np.count_nonzero(off)
        if off.max(initial=0) <= 1 and n_off <= QUANTIZED_FLIPS * off.size:
            return None
        return (f"wrong result: max abs err {float(off.max()):.3g} at {np.unravel_index(int(off.argmax()), off.shape)}, "
                f"{n_off} of {off.size} elements off (one step on at most {QUANTIZED_FLIPS:g} of them allowed)")
    finite = w[np.isfinite(w)]
    if atol and finite.size:  # absolute error scales with the outputs: Winograd F(4x4) over 64 channels of
        # unit-variance data gives sums of about 7 and errors of 2e-4 (a correct kernel, not a wrong one)
        atol = max(atol, rtol * float(np.sqrt(np.mean(finite * finite))))
    bad = ~np.isclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
    if not bad.any():
        return None
    err = np.abs(g - w)
    err = np.where(np.isnan(err), np.inf, err)
    return (
        f"wrong result: max abs err {float(err.max()):.3g} at {np.unravel_index(int(err.argmax()), err.shape)}, "
        f"{int(bad.sum())} of {bad.size} elements off (rtol {rtol:g}, atol {atol:g})"
    )


def from_bits(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored arrays as NumPy can compute with them: bfloat16 is kept as its uint16 bits (NumPy has no
    bfloat16 and the device machine may lack ml_dtypes) and widened here exactly."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw


def synth(shape, dtype: str, seed: int) -> np.ndarray:
    """Inputs both machines make alike from a seed, so they need not travel (ResNet-50's tasks' inputs alone
    are tens of megabytes): an integer hash of each element's index, mapped to a float of unit variance and
    rounded to `dtype` by arithmetic NumPy does the same everywhere (bfloat16 as its uint16 bits)."""
    n = int(np.prod(shape, dtype=np.int64))
    h = (np.arange(n, dtype=np.uint64) + np.uint64((seed * 0x9E3779B9) & 0xFFFFFFFF)) & np.uint64(0xFFFFFFFF)
    for mul, shift in ((0x7FEB352D, 15), (0x846CA68B, 16)):
        h ^= h >> np.uint64(shift)
        h = (h * np.uint64(mul)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(16)
    u = (h >> np.uint64(8)).astype(np.float64) * (2.0 ** -24)  # 24 bits: exact in float32
    x = ((u * 2.0 - 1.0) * 1.7320508075688772).astype(np.float32).reshape(shape)  # uniform, unit variance
    if dtype == "bfloat16":
        b = x.view(np.uint32)
        return ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return x.astype(dtype)


def inputs_of(cand: dict, stored: dict) -> list[np.ndarray]:
    """A candidate's input arrays in parameter order: stored ones from its data file, the rest synthesized."""
    out = []
    for spec in cand["inputs"]:
        if "synth" in spec:
            out.append(synth(spec["shape"], spec["dtype"], spec["synth"]))
        else:
            out.append(stored[spec["name"]])
    return out


def check(got: np.ndarray, stored: dict, dtype: str) -> str | None:
    """Compare with the stored reference: whole, or at the sampled flat indices it keeps."""
    if "ref" in stored:
        return compare(got, from_bits(stored["ref"], dtype), dtype)
    idx = stored["ref_idx"]
    return compare(got.reshape(-1)[idx], from_bits(stored["ref_val"], dtype), dtype)


# ----- the runtime --------------------------------------------------------------------------------------------


def runtime_dir(explicit: str | None = None) -> str:
    for d in (explicit, os.environ.get("KILN_TVM_RUNTIME_DIR")):
        if d:
            return d
    spec = importlib.util.find_spec("tvm")  # an installed tvm's libraries, without importing tvm
    if spec is None or spec.origin is None:
        raise SystemExit("no TVM runtime libraries: pass --runtime-dir or set KILN_TVM_RUNTIME_DIR")
    return os.path.join(os.path.dirname(spec.origin), "lib")


class Runtime:
    """TVM's runtime through tvm_ffi alone: tensors, copies and the time evaluator as global functions."""

    def __init__(self, device: str, lib_dir: str, arch: str | None = None):
        import tvm_ffi  # loads libtvm_ffi, which the runtime libraries link against

        names = ["libtvm_runtime.so", "libtvm_runtime_extra.so"] + (["libtvm_runtime_cuda.so"] if device == "cuda"
                                                                    else [])
        for name in names:
            ctypes.CDLL(os.path.join(lib_dir, name), mode=ctypes.RTLD_GLOBAL)
        self.ffi = tvm_ffi
        self.kind = device
        self.dev_type = DEVICE_TYPES[device]
        self.device = tvm_ffi.device(device, 0)
        g = tvm_ffi.get_global_func
        self._alloc = g("runtime.TVMTensorAllocWithScope")
        self._to_device = g("runtime.TVMTensorCopyFromBytes")
        self._from_device = g("runtime.TVMTensorCopyToBytes")
        self._evaluator = g("runtime.RPCTimeEvaluator")
        if device == "cuda" and tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True) is None:
            # a library that carries CUDA source (not precompiled PTX/cubin) is compiled as it loads
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", _nvcc(arch), override=True)

    def tensor(self, array: np.ndarray, dtype: str):
        t = self._alloc(tuple(int(d) for d in array.shape), dtype, self.device, None)
        a = np.ascontiguousarray(array)
        self._to_device(t, ctypes.c_void_p(a.ctypes.data), a.nbytes)
        return t

    def numpy(self, t, shape, storage: np.dtype) -> np.ndarray:
        a = np.empty(shape, dtype=storage)
        self._from_device(t, ctypes.c_void_p(a.ctypes.data), a.nbytes)
        return a

    def time(self, module, args, timing: dict) -> list[float]:
        repeat = int(timing.get("repeat", 5))
        feval = self._evaluator(module, ENTRY, self.dev_type, 0, int(timing.get("number", 1)), repeat,
                                int(timing.get("min_repeat_ms", 0)), 100, 0, 1,
                                int(timing.get("flush_bytes", 0)) if self.kind == "cpu" else 0, "")
        return list(struct.unpack("@" + "d" * repeat, bytes(feval(*args))))

    def device_name(self) -> str:
        try:
            name = self.ffi.get_global_func("runtime.GetDeviceAttr")(self.dev_type, 0, 5)
        except Exception:  # noqa: BLE001  (a name is a label; its absence never stops a run)
            name = None
        return str(name) if name else self.kind


def _nvcc(arch: str | None):
    def compile_cuda(code: str, target=None) -> bytes:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            src, out = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(code)
            cmd = ["nvcc", "--ptx", "-O3", src, "-o", out] + ([f"-arch={arch}"] if arch else [])
            subprocess.run(cmd, check=True, capture_output=True)
            with open(out, "rb") as f:
                return f.read()

    return compile_cuda


# ----- the child: measure candidates in order -----------------------------------------------------------------


def _storage(dtype: str) -> np.dtype:
    return np.dtype("uint16") if dtype == "bfloat16" else np.dtype(dtype)


def measure(rt: Runtime, folder: str, cand: dict, timing: dict, cache: dict) -> dict:
    """One candidate: load, run, check against its reference, time. Returns its result line (without id)."""
    start = time.perf_counter()
    data_path = os.path.join(folder, cand["data"])
    if data_path not in cache:
        cache.clear()  # one task's arrays at a time: candidates are grouped by task
        with np.load(data_path) as z:
            cache[data_path] = {k: z[k] for k in z.files}
    arrays = cache[data_path]
    try:
        module = rt.ffi.load_module(os.path.abspath(os.path.join(folder, cand["lib"])))
    except Exception as err:  # noqa: BLE001
        return {"costs_s": [], "error": f"load: {type(err).__name__}: {_short(err)}",
                "run_s": time.perf_counter() - start}
    out_spec = cand["output"]
    try:
        key = (data_path, "inputs", json.dumps(cand["inputs"]))
        if key not in cache:
            cache[key] = inputs_of(cand, arrays)
        args = [rt.tensor(a, i["dtype"]) for a, i in zip(cache[key], cand["inputs"])]
        poison = np.full(out_spec["shape"], np.nan if out_spec["dtype"].startswith(("float", "bfloat")) else 0x5A)
        if out_spec["dtype"] == "bfloat16":
            poison = np.full(out_spec["shape"], 0x7FC0, dtype=np.uint16)  # a bfloat16 NaN
        out = rt.tensor(poison.astype(_storage(out_spec["dtype"])), out_spec["dtype"])
        module[ENTRY](*args, out)
        got = from_bits(rt.numpy(out, out_spec["shape"], _storage(out_spec["dtype"])), out_spec["dtype"])
        if cand.get("reference"):
            error = check(got, arrays, out_spec["dtype"])
            if error is not None:
                return {"costs_s": [], "error": error, "run_s": time.perf_counter() - start}
        costs = rt.time(module, [*args, out], timing)
    except Exception as err:  # noqa: BLE001  (a runtime error in the candidate: its result)
        return {"costs_s": [], "error": f"run: {type(err).__name__}: {_short(err)}",
                "run_s": time.perf_counter() - start, "fatal": rt.kind == "cuda"}
    return {"costs_s": [float(c) for c in costs], "error": None, "run_s": time.perf_counter() - start,
            "checked": bool(cand.get("reference"))}


def child_main(folder: str, ids: list[str], lib_dir: str, deadline: float) -> int:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what TVM or a kernel prints goes to stderr, never into the protocol
    manifest = _manifest(folder)
    rt = Runtime(manifest["device"], lib_dir, manifest.get("arch"))
    device = rt.device_name()
    by_id = {c["id"]: c for c in manifest["candidates"]}
    cache: dict = {}
    with open(os.path.join(folder, RESULTS), "a") as results:
        for cid in ids:
            if time.time() > deadline:
                break
            print(f"start {cid}", file=out)
            res = measure(rt, folder, by_id[cid], manifest.get("timing", {}), cache)
            fatal = res.pop("fatal", False)
            results.write(json.dumps({"id": cid, "device": device, **res}) + "\n")
            results.flush()
            os.fsync(results.fileno())
            print(f"done {cid}", file=out)
            if fatal and res["error"] is not None:
                return CUDA_ERROR_EXIT
    return 0


# ----- the parent: watch children, record crashes and hangs ---------------------------------------------------


def run(folder: str, budget_s: float, timeout_s: float, lib_dir: str, log=print) -> dict:
    """Measure every candidate of the batch not yet in results.jsonl; a summary of the run."""
    manifest = _manifest(folder)
    done = {r["id"] for r in read_results(folder)}
    pending = [c["id"] for c in manifest["candidates"] if c["id"] not in done]
    deadline = time.time() + budget_s
    counts = {"measured": 0, "errors": 0, "crashes": 0, "timeouts": 0, "left": 0}
    while pending and time.time() < deadline:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), folder, "--child", "--runtime-dir", lib_dir,
             "--deadline", repr(deadline), "--ids", ",".join(pending)],
            stdout=subprocess.PIPE, text=True)
        current = None
        started = time.monotonic()
        start_limit = 120.0  # importing NumPy and loading the runtime
        while True:
            limit = timeout_s if current is not None else start_limit
            ready = select.select([proc.stdout], [], [], max(0.0, started + limit - time.monotonic()))[0]
            if not ready:  # a hang: this candidate's trial is spent
                proc.kill()
                proc.wait()
                if current is None:
                    raise SystemExit(f"the measuring child did not start within {start_limit:g} s")
                _append(folder, {"id": current, "costs_s": [], "error": f"timeout after {timeout_s:g} s"})
                counts["timeouts"] += 1
                pending.remove(current)
                break
            line = proc.stdout.readline()
            if not line:  # the child is gone: a crash during `current`, a CUDA error, or the end
                rc = proc.wait()
                if current is not None:
                    reason = f"crash: signal {-rc}" if rc < 0 else f"crash: child exited with status {rc}"
                    _append(folder, {"id": current, "costs_s": [], "error": reason})
                    counts["crashes"] += 1
                    pending.remove(current)
                elif rc not in (0, CUDA_ERROR_EXIT):
                    raise SystemExit(f"the measuring child failed (status {rc}) before any candidate")
                break
            word, cid = line.split()
            if word == "start":
                current, started = cid, time.monotonic()
            elif word == "done":
                pending.remove(cid)
                current = None
                counts["measured"] += 1
                started = time.monotonic()
        proc.stdout.close()
        log(f"{len(manifest['candidates']) - len(pending)} of {len(manifest['candidates'])} candidates done")
    counts["left"] = len(pending)
    counts["errors"] = sum(1 for r in read_results(folder) if r.get("error"))
    return counts


def read_results(folder: str) -> list[dict]:
    """The result lines so far; a line cut off by a killed run is skipped (its candidate runs again)."""
    path = os.path.join(folder, RESULTS)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _append(folder: str, row: dict) -> None:
    with open(os.path.join(folder, RESULTS), "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _manifest(folder: str) -> dict:
    with open(os.path.join(folder, MANIFEST)) as f:
        return json.load(f)


def _short(err: BaseException) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:300]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--budget-s", type=float, default=480.0, help="start no candidate after this many seconds")
    ap.add_argument("--timeout-s", type=float, default=30.0, help="one candidate's load, check and timing")
    ap.add_argument("--runtime-dir", default=None, help="folder of TVM's runtime libraries")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ids", default="", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    lib_dir = runtime_dir(args.runtime_dir)
    if args.child:
        return child_main(args.folder, [i for i in args.ids.split(",") if i], lib_dir, args.deadline)
    summary = run(args.folder, args.budget_s, args.timeout_s, lib_dir)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
