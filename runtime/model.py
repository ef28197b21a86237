"""A loaded artifact: `kiln.load(path)` → Model. Inputs are checked against the metadata before any kernel
runs; all memory (storage blocks, weights, input staging, outputs) is allocated once at load, so a run
allocates only the copies of the outputs it returns.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kiln.errors import ArtifactError, InputError

from .artifact import ALIGN, META_SYMBOL, WEIGHTS_SYMBOL, check_elf, validate_metadata
from .cpu import host_arch, missing_features
from .timing import time_ms

log = logging.getLogger(__name__)
_RUNTIME_LOADED = False
_LOADED: dict[Path, tuple[int, int, int]] = {}  # path → (inode, mtime, size) of the file first loaded from it


def _open_library(tvm_ffi, path: Path):
    """Load the shared library at `path`. glibc's dlopen returns the library already loaded under the same
    name, even after the file was replaced (a recompile with --force): a process would keep running the old
    kernels against the new metadata. A replaced file is therefore loaded from a private copy."""
    st = path.stat()
    ident = (st.st_ino, st.st_mtime_ns, st.st_size)
    if _LOADED.setdefault(path, ident) == ident:
        return tvm_ffi.load_module(str(path))
    with tempfile.TemporaryDirectory(prefix="kiln-load-") as tmp:
        copy = Path(tmp) / f"{path.stem}-{st.st_ino}-{st.st_mtime_ns}{path.suffix}"
        shutil.copyfile(path, copy)
        return tvm_ffi.load_module(str(copy))  # mapped now: the copy may go


def _load_tvm_runtime() -> None:
    """libtvm_runtime provides the thread pool parallel kernels need; load it without importing the compiler."""
    global _RUNTIME_LOADED
    if _RUNTIME_LOADED:
        return
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi, which libtvm_runtime links against)

    spec = importlib.util.find_spec("tvm")
    if spec is None or spec.origin is None:
        raise ArtifactError("TVM's runtime library is not installed (pip install apache-tvm)")
    lib = os.path.join(os.path.dirname(spec.origin), "lib", "libtvm_runtime.so")
    # TVM sizes its worker pool once, from TVM_NUM_THREADS, when the first parallel kernel runs, and defaults to
    # half the logical CPUs (one thread on a 2-core machine); `runtime.config_threadpool` can only shrink it
    # later. Default to every core this process may use, as ONNX Runtime does.
    os.environ.setdefault("TVM_NUM_THREADS", str(usable_cpus()))
    if int(os.environ["TVM_NUM_THREADS"]) > 1:
        # every core runs a pool worker and the caller only waits, instead of the caller doing worker 0's share:
        # MobileNetV2 3.71 -> 3.50 ms on 2 cores (ResNet-50 unchanged), alternating runs
        os.environ.setdefault("TVM_EXCLUDE_WORKER0", "0")
    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    _RUNTIME_LOADED = True


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def aligned_empty(shape: Sequence[int], dtype: str) -> np.ndarray:
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = np.empty(n + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + n].view(dt).reshape(shape)


class TensorInfo:
    def __init__(self, d: dict):
        self.name: str = d["name"]
        self.shape: tuple[int, ...] = tuple(d["shape"])
        self.dtype: str = d["dtype"]

    def __repr__(self) -> str:
        return f"{self.name}: {self.dtype}{list(self.shape)}"


class Model:
    """A compiled model. `model.run(x)` or `model(x)`; inputs positionally or by name; returns a list."""

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise ArtifactError(f"artifact {str(path)!r} does not exist")
        check_elf(self.path, expect_arch=host_arch())
        _load_tvm_runtime()
        import tvm_ffi

        if num_threads is not None:
            set_num_threads(num_threads)

        try:
            self._lib = _open_library(tvm_ffi, self.path)
            meta_fn = self._lib[META_SYMBOL]
        except Exception as err:  # a library that loads but is not ours, or does not load at all
            if "load_from_bytes.cuda" in str(err):  # TVM's CUDA runtime registers this loader
                raise ArtifactError(f"{path} was built for CUDA; no CUDA driver on this machine (TVM's CUDA runtime "
                                    f"is not available), and kiln.load runs CPU artifacts only; its kernels are "
                                    f"in {self.path.with_suffix('.ptx').name} beside it") from None
            raise ArtifactError(f"{path} is not a loadable Kiln artifact: {str(err).splitlines()[0]}") from None
        try:
            meta = json.loads(bytes(meta_fn()))
        except (ValueError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{path}: metadata is corrupted ({err})") from None
        validate_metadata(meta, self.path)
        lacking = missing_features(meta.get("cpu_features", []))
        if lacking:
            raise ArtifactError(f"{path} was compiled for {meta.get('cpu', '?')} and uses CPU features this "
                                f"machine lacks: {', '.join(lacking)}; recompile with --target native")
        self.meta = meta
        self.inputs = [TensorInfo(d) for d in meta["inputs"]]
        self.outputs = [TensorInfo(d) for d in meta["outputs"]]
        self._setup(tvm_ffi)

    def _setup(self, tvm_ffi) -> None:
        meta = self.meta
        weights = bytes(self._lib[WEIGHTS_SYMBOL]()) if meta.get("weights_nbytes") else b""
        if len(weights) != meta.get("weights_nbytes", 0):
            raise ArtifactError(f"{self.path}: weights blob is {len(weights)} bytes, metadata says "
                                f"{meta.get('weights_nbytes')}")
        if "weights_crc32" in meta and zlib.crc32(weights) != meta["weights_crc32"]:
            raise ArtifactError(f"{self.path}: weights are corrupted (checksum mismatch); rebuild the artifact")
        arena = aligned_empty((len(weights),), "uint8")
        arena[:] = np.frombuffer(weights, np.uint8)
        blocks = [aligned_empty((n,), "uint8") for n in meta["blocks"]]
        self._inputs = [aligned_empty(t.shape, t.dtype) for t in self.inputs]
        self._outputs = [aligned_empty(t.shape, t.dtype) for t in self.outputs]
        arrays: list[np.ndarray] = []
        for v in meta["values"]:
            shape, dtype = tuple(v["shape"]), np.dtype(v["dtype"])
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            kind = v["kind"]
            if kind == "input":
                arrays.append(self._inputs[v["index"]])
            elif kind == "output":
                arrays.append(self._outputs[v["index"]])
            elif kind == "const":
                arrays.append(arena[v["offset"]:v["offset"] + nbytes].view(dtype).reshape(shape))
            elif kind == "block":  # at an offset when it is one part of a concat planned as a view
                at = v.get("offset", 0)
                arrays.append(blocks[v["block"]][at:at + nbytes].view(dtype).reshape(shape))
            else:
                raise ArtifactError(f"{self.path}: unknown value kind {kind!r}")
        self._keepalive = (arena, blocks, arrays)
        tensors = [tvm_ffi.from_dlpack(a) for a in arrays]
        self._values = tensors
        self._input_values = {v["index"]: i for i, v in enumerate(meta["values"]) if v["kind"] == "input"}
        self._table, self._shapes = _descriptor_table(arrays)
        self._table_tensor = tvm_ffi.from_dlpack(self._table.view(np.uint8))
        self._entry = None
        if meta.get("entry"):
            try:
                self._entry = self._lib[meta["entry"]]
            except Exception:
                raise ArtifactError(f"{self.path}: entry function {meta['entry']} is missing") from None
        self._steps = []
        for step in meta["steps"]:
            try:
                fn = self._lib[step["kernel"]]
            except Exception:
                raise ArtifactError(f"{self.path}: kernel {step['kernel']} is missing") from None
            self._steps.append((fn, [tensors[i] for i in step["args"]]))

    def _check(self, args: tuple, named: dict) -> list[np.ndarray]:
        return check_inputs(self.inputs, args, named)

    def run(self, *args: np.ndarray, **named: np.ndarray) -> list[np.ndarray]:
        """Run the model; returns fresh arrays (later runs never change what an earlier run returned)."""
        checked = self._check(args, named)
        if self._entry is not None:
            table = self._table
            for k, (staging, v) in enumerate(zip(self._inputs, checked)):
                if v.flags.c_contiguous and v.ctypes.data % ALIGN == 0:
                    table["data"][self._input_values[k]] = v.ctypes.data  # zero-copy: aligned and contiguous
                else:
                    table["data"][self._input_values[k]] = staging.ctypes.data
                    np.copyto(staging, v)  # an unaligned array never reaches a vectorized kernel
            self._entry(self._table_tensor)  # every kernel, in native code
            return [o.copy() for o in self._outputs]
        for staging, v in zip(self._inputs, checked):
            np.copyto(staging, v)
        for fn, fargs in self._steps:
            fn(*fargs)
        return [o.copy() for o in self._outputs]

    __call__ = run

    def profile(self, repeat: int = 20) -> dict:
        """Per-kernel median times (each kernel called `repeat` times on the current buffers) and the whole
        run's median, so `run_ms - sum(kernel_ms)` is the executor's own overhead."""
        kernels = []
        for (fn, fargs), step in zip(self._steps, self.meta["steps"]):
            ms = float(np.median(time_ms(lambda: fn(*fargs), repeat)))
            kernels.append({"kernel": step["kernel"], "name": step.get("name", ""), "ops": step.get("ops", []),
                            "ms": ms, "gflops": step.get("flops", 0) / (ms * 1e6) if ms > 0 else 0.0,
                            "schedule": step.get("schedule", "")})
        feeds = [np.zeros(t.shape, t.dtype) for t in self.inputs]

        def median_ms(fn) -> float:
            return float(np.median(time_ms(fn, repeat)))

        # Interleaved, so both medians see the same machine: the whole run, and the kernels alone (the native
        # entry, or the loop over kernels); their difference is what the executor adds (checks, copies, calls).
        run_ms = median_ms(lambda: self.run(*feeds))
        if self._entry is not None:
            kernels_only = median_ms(lambda: self._entry(self._table_tensor))
        else:
            kernels_only = median_ms(lambda: [fn(*fargs) for fn, fargs in self._steps])
        for k, ms in zip(kernels, self._in_sequence_ms(repeat)):
            k["in_sequence_ms"] = ms
        return {"run_ms": run_ms, "kernels_ms": kernels_only, "kernels": kernels,
                "sum_of_isolated_kernels_ms": sum(k["ms"] for k in kernels)}

    def _in_sequence_ms(self, repeat: int) -> list[float]:
        """Each kernel's median time inside whole runs (the entry stamps the clock between kernels), where it
        meets cold weights and inputs left in the other core's cache; empty for artifacts without stamps."""
        if self._entry is None:
            return []
        import tvm_ffi

        stamps = np.zeros(len(self._steps) + 1, np.int64)
        handle = tvm_ffi.from_dlpack(stamps)
        rows = []
        try:
            for _ in range(repeat + 3):
                self._entry(self._table_tensor, handle)
                rows.append(np.diff(stamps) / 1e6)
        except Exception:  # noqa: BLE001  (an artifact built before the entry took stamps)
            return []
        return [float(v) for v in np.median(np.array(rows[3:]), axis=0)]

    def __repr__(self) -> str:
        return f"Model({self.path.name}: {self.inputs} -> {self.outputs}, {len(self._steps)} kernels)"


def check_inputs(inputs: list[TensorInfo], args: tuple, named: dict) -> list[np.ndarray]:
    """The inputs in the model's order, each checked against its name, dtype and shape."""
    names = [t.name for t in inputs]
    if len(args) > len(names):
        raise InputError(f"model takes {len(names)} inputs {names}, got {len(args)} positional")
    given = dict(zip(names, args))
    for k, v in named.items():
        if k in given:
            raise InputError(f"input '{k}' given twice, positionally and by name")
        given[k] = v
    missing = [n for n in names if n not in given]
    extra = [n for n in given if n not in names]
    if missing or extra:
        raise InputError(f"inputs {sorted(given)} do not match the model's {names}"
                         + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
    out = []
    for t in inputs:
        v = np.asarray(given[t.name])
        if v.dtype.name != t.dtype:
            raise InputError(f"input '{t.name}' expects {t.dtype}{list(t.shape)}, got {v.dtype.name}; "
                             f"pass x.astype(np.{t.dtype})")
        if tuple(v.shape) != t.shape:
            raise InputError(f"input '{t.name}' expects {t.dtype}{list(t.shape)}, got shape {list(v.shape)}")
        out.append(v)
    return out


def set_num_threads(n: int) -> None:
    """Resize TVM's worker pool (process-wide: every loaded model shares it)."""
    if n < 1:
        raise InputError(f"num_threads must be ≥ 1, got {n}")
    _load_tvm_runtime()
    import tvm_ffi

    pool = int(os.environ.get("TVM_NUM_THREADS") or usable_cpus())
    if n > pool:
        log.warning("num_threads=%d but TVM's pool holds %d threads (TVM_NUM_THREADS); using %d", n, pool, pool)
        n = pool
    tvm_ffi.get_global_func("runtime.config_threadpool")(1, int(n))  # 1: no core pinning


_DLTENSOR = np.dtype([("data", "u8"), ("device_type", "i4"), ("device_id", "i4"), ("ndim", "i4"),
                      ("code", "u1"), ("bits", "u1"), ("lanes", "u2"), ("shape", "u8"), ("strides", "u8"),
                      ("byte_offset", "u8")])
assert _DLTENSOR.itemsize == 48
_DLPACK_CODES = {"i": 0, "u": 1, "f": 2, "b": 6}  # int, uint, float, bool (DLPack's kDLBool)


def _descriptor_table(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One DLTensor per value, pointing at the buffers allocated at load: what the native entry hands kernels."""
    table = np.zeros(len(arrays), dtype=_DLTENSOR)
    shapes = np.zeros(sum(max(a.ndim, 1) for a in arrays), dtype=np.int64)
    at = 0
    for i, a in enumerate(arrays):
        shapes[at:at + a.ndim] = a.shape
        table[i] = (a.ctypes.data, 1, 0, a.ndim, _DLPACK_CODES[a.dtype.kind], a.dtype.itemsize * 8, 1,
                    shapes[at:].ctypes.data, 0, 0)
        at += max(a.ndim, 1)
    return table, shapes


def load(path: str | os.PathLike, num_threads: int | None = None) -> Model:
    """Load a compiled artifact.

    >>> import kiln  # doctest: +SKIP
    >>> m = kiln.load("model.so"); y = m.run(x)  # doctest: +SKIP
    """
    return Model(path, num_threads)
