"""The CUDA executor: a CUDA artifact's memory plan in device memory, the native entry launching every kernel on
one stream per execution context, and that launch sequence captured once into a CUDA graph and replayed.

Device memory comes from TVM's device API (`runtime.TVMTensorAllocWithScope`, freed with its tensors); streams,
copies, graphs and events go through ctypes on libcudart (the library TVM's CUDA runtime links): no torch or cupy.
After a context's first run (which makes TVM load the kernels: not allowed inside a capture), its launches are
captured on its stream; a run then copies the inputs into the planned buffers, replays the graph and copies the
outputs out, so the graph's pointers stay valid.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import itertools
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.errors import ArtifactError, InputError

from .artifact import dlpack_code, tensor_dtype

RUNTIME_DIR_ENV = "KILN_TVM_RUNTIME_DIR"  # a runtime-only bundle: libtvm_runtime{,_extra,_cuda}.so, no compiler
GRAPHS_ENV = "KILN_CUDA_GRAPHS"  # "0": launch the entry on every run instead of replaying a graph (debugging)
KDL_CPU, KDL_CUDA = 1, 2
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_runtime_extra.so", "libtvm_runtime_cuda.so")  # load order
CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")

# cudaMemcpyKind, cudaStreamCaptureMode, stream flags (cuda_runtime_api.h / driver_types.h)
H2D, D2H, D2D = 1, 2, 3
CAPTURE_THREAD_LOCAL = 1  # other threads may allocate, load or launch while this one captures
STREAM_NON_BLOCKING = 1  # no implicit sync with the legacy default stream (which may not join a capture)
# A device input is bound in place (no copy) only at this alignment: what a vectorized load may assume.
DEVICE_ALIGN = 64

# The layout of DLTensor on a 64-bit target (the same as runtime/model.py's, codegen/entry.py's DLTENSOR_BYTES)
DLTENSOR = np.dtype([("data", "u8"), ("device_type", "i4"), ("device_id", "i4"), ("ndim", "i4"),
                     ("code", "u1"), ("bits", "u1"), ("lanes", "u2"), ("shape", "u8"), ("strides", "u8"),
                     ("byte_offset", "u8")])


# --- TVM's runtime libraries -------------------------------------------------------------------------------

def bundle_dir() -> Path | None:
    """The runtime-only bundle named by KILN_TVM_RUNTIME_DIR, if any (machines without the apache-tvm wheel)."""
    d = os.environ.get(RUNTIME_DIR_ENV)
    return Path(d) if d else None


def runtime_dir() -> Path | None:
    """Where TVM's runtime libraries are: the bundle, else the installed apache-tvm's `tvm/lib`."""
    if (d := bundle_dir()) is not None:
        return d
    spec = importlib.util.find_spec("tvm")  # finds the package without importing the compiler
    return Path(spec.origin).parent / "lib" if spec is not None and spec.origin else None


_loaded: set[str] = set()
_load_lock = threading.Lock()


def _load_libs(names: Sequence[str]) -> str | None:
    """Load TVM's runtime libraries RTLD_GLOBAL, in order; None when loaded, else why not."""
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi, which every TVM runtime library links against)

    d = runtime_dir()
    if d is None:
        return f"TVM's runtime is not installed (pip install apache-tvm, or set {RUNTIME_DIR_ENV})"
    with _load_lock:
        for name in names:
            if name in _loaded:
                continue
            lib = d / name
            if not lib.is_file():
                return f"{lib} is missing"
            try:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            except OSError as err:  # libcuda.so.1 absent: no driver
                return str(err)
            _loaded.add(name)
    return None


def load_bundle_runtime() -> None:
    """TVM's CPU runtime from the bundle in KILN_TVM_RUNTIME_DIR (kiln.load on a machine without apache-tvm)."""
    why = _load_libs(RUNTIME_LIBS[:2])
    if why is not None:
        raise ArtifactError(f"cannot load TVM's runtime from {RUNTIME_DIR_ENV}={bundle_dir()}: {why}")


def load_cuda_runtime() -> str | None:
    """Load TVM's CUDA runtime (it registers the loader of CUDA modules); None when loaded, else why not."""
    return _load_libs(RUNTIME_LIBS)


# --- kernels shipped as CUDA source ------------------------------------------------------------------------

_pending = threading.local()  # the PTX for the CUDA module this thread is loading now
_previous_compile = None
_callback_registered = False


def _source_kernels(code: str) -> list[str]:
    return re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', code)


def _ptx_kernels(ptx: str) -> set[str]:
    return set(re.findall(r"^\.visible \.entry (\w+)\(", ptx, flags=re.MULTILINE))


def _compile_callback(code: str, target) -> bytes:
    """TVM's CUDA runtime asks for PTX when a module carries CUDA C source: hand it the PTX written beside the
    artifact at build time (no compiler needed here), after checking it holds every kernel of that source."""
    ptx = getattr(_pending, "ptx", None)
    if ptx is None:
        if _previous_compile is not None:  # someone else's module (the full TVM's nvcc callback)
            return _previous_compile(code, target)
        raise ArtifactError("a CUDA module carries CUDA source and no PTX was given for it")
    missing = sorted(set(_source_kernels(code)) - _ptx_kernels(ptx))
    if missing:
        raise ArtifactError(f"the PTX beside the artifact lacks kernels {missing[:5]} of its CUDA source: it belongs "
                            f"to another build; rebuild the artifact")
    return ptx.encode()


@contextlib.contextmanager
def ptx_for_source(ptx_path: Path):
    """While loading an artifact whose CUDA module is CUDA C source, answer TVM's compile callback with the PTX
    in `ptx_path`. Artifacts whose module is PTX or a cubin never call it."""
    global _previous_compile, _callback_registered
    import tvm_ffi

    with _load_lock:
        if not _callback_registered:
            _previous_compile = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile_callback, override=True)
            _callback_registered = True
    _pending.ptx = ptx_path.read_text() if ptx_path.is_file() else None
    try:
        yield
    finally:
        _pending.ptx = None


# --- the CUDA runtime API, through ctypes ------------------------------------------------------------------

_p = ctypes.c_void_p
# name: (restype, argtypes). Every call returns a cudaError_t (0: success) except cudaGetErrorString.
SIGNATURES: dict[str, tuple] = {
    "cudaGetDeviceCount": (ctypes.c_int, [ctypes.POINTER(ctypes.c_int)]),
    "cudaSetDevice": (ctypes.c_int, [ctypes.c_int]),
    "cudaDriverGetVersion": (ctypes.c_int, [ctypes.POINTER(ctypes.c_int)]),
    "cudaGetErrorString": (ctypes.c_char_p, [ctypes.c_int]),
    "cudaStreamCreateWithFlags": (ctypes.c_int, [ctypes.POINTER(_p), ctypes.c_uint]),
    "cudaStreamDestroy": (ctypes.c_int, [_p]),
    "cudaStreamSynchronize": (ctypes.c_int, [_p]),
    "cudaMemcpyAsync": (ctypes.c_int, [_p, _p, ctypes.c_size_t, ctypes.c_int, _p]),
    "cudaStreamBeginCapture": (ctypes.c_int, [_p, ctypes.c_int]),
    "cudaStreamEndCapture": (ctypes.c_int, [_p, ctypes.POINTER(_p)]),
    # (exec*, graph, flags): the same in CUDA 11.4 to 13, unlike cudaGraphInstantiate, whose arguments changed in 12
    "cudaGraphInstantiateWithFlags": (ctypes.c_int, [ctypes.POINTER(_p), _p, ctypes.c_ulonglong]),
    "cudaGraphLaunch": (ctypes.c_int, [_p, _p]),
    "cudaGraphExecDestroy": (ctypes.c_int, [_p]),
    "cudaGraphDestroy": (ctypes.c_int, [_p]),
    "cudaEventCreate": (ctypes.c_int, [ctypes.POINTER(_p)]),
    "cudaEventRecord": (ctypes.c_int, [_p, _p]),
    "cudaEventSynchronize": (ctypes.c_int, [_p]),
    "cudaEventElapsedTime": (ctypes.c_int, [ctypes.POINTER(ctypes.c_float), _p, _p]),
    "cudaEventDestroy": (ctypes.c_int, [_p]),
}


def find_cudart() -> ctypes.CDLL:
    """libcudart: the one TVM's CUDA runtime already loaded (found by soname), else the CUDA toolkit's."""
    tried = []
    for name in CUDART_NAMES + tuple(filter(None, [ctypes.util.find_library("cudart")])):
        for path in (name, f"/usr/local/cuda/lib64/{name}"):
            try:
                return ctypes.CDLL(path)
            except OSError as err:
                tried.append(str(err))
    raise ArtifactError(f"libcudart (the CUDA runtime) not found: {'; '.join(tried[:3])}")


class CudaApi:
    """The CUDA runtime calls the executor makes; each checks its cudaError_t and raises naming the call."""

    def __init__(self, lib: ctypes.CDLL | None = None):
        self.lib = lib or find_cudart()
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = restype, argtypes

    def _check(self, name: str, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"{name} failed: {self.lib.cudaGetErrorString(rc).decode()} (cudaError {rc})")

    def device_count(self) -> tuple[int, str]:
        """How many devices are visible, and why none when it is 0."""
        n = ctypes.c_int(0)
        rc = self.lib.cudaGetDeviceCount(ctypes.byref(n))
        if rc != 0:
            return 0, self.lib.cudaGetErrorString(rc).decode()
        return n.value, "" if n.value else "no CUDA device visible"

    def set_device(self, device_id: int) -> None:
        self._check("cudaSetDevice", self.lib.cudaSetDevice(device_id))

    def stream_create(self) -> int:
        s = _p()
        self._check("cudaStreamCreateWithFlags", self.lib.cudaStreamCreateWithFlags(ctypes.byref(s),
                                                                                     STREAM_NON_BLOCKING))
        return s.value

    def stream_destroy(self, stream: int) -> None:
        self._check("cudaStreamDestroy", self.lib.cudaStreamDestroy(stream))

    def synchronize(self, stream: int) -> None:
        self._check("cudaStreamSynchronize", self.lib.cudaStreamSynchronize(stream))

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self._check("cudaMemcpyAsync", self.lib.cudaMemcpyAsync(dst, src, nbytes, kind, stream))

    def capture(self, stream: int, launch: Callable[[], None]) -> int:
        """The launches `launch` makes on `stream`, captured and instantiated as a graph (its exec handle)."""
        self._check("cudaStreamBeginCapture", self.lib.cudaStreamBeginCapture(stream, CAPTURE_THREAD_LOCAL))
        graph = _p()
        try:
            launch()
        finally:  # a capture left open breaks the stream for good
            rc = self.lib.cudaStreamEndCapture(stream, ctypes.byref(graph))
        self._check("cudaStreamEndCapture", rc)
        exe = _p()
        try:
            self._check("cudaGraphInstantiateWithFlags",
                        self.lib.cudaGraphInstantiateWithFlags(ctypes.byref(exe), graph, 0))
        finally:
            self.lib.cudaGraphDestroy(graph)  # the instantiated graph does not need it
        return exe.value

    def graph_launch(self, graph_exec: int, stream: int) -> None:
        self._check("cudaGraphLaunch", self.lib.cudaGraphLaunch(graph_exec, stream))

    def graph_destroy(self, graph_exec: int) -> None:
        self._check("cudaGraphExecDestroy", self.lib.cudaGraphExecDestroy(graph_exec))

    def time_ms(self, stream: int, fn: Callable[[], None], repeat: int) -> list[float]:
        """Device time of each of `repeat` calls of `fn` (which enqueues work on `stream`), from CUDA events."""
        events = []
        for _ in range(repeat + 1):
            e = _p()
            self._check("cudaEventCreate", self.lib.cudaEventCreate(ctypes.byref(e)))
            events.append(e.value)
        try:
            self._check("cudaEventRecord", self.lib.cudaEventRecord(events[0], stream))
            for e in events[1:]:
                fn()
                self._check("cudaEventRecord", self.lib.cudaEventRecord(e, stream))
            self._check("cudaEventSynchronize", self.lib.cudaEventSynchronize(events[-1]))
            out, ms = [], ctypes.c_float()
            for a, b in itertools.pairwise(events):
                self._check("cudaEventElapsedTime", self.lib.cudaEventElapsedTime(ctypes.byref(ms), a, b))
                out.append(ms.value)
            return out
        finally:
            for e in events:
                self.lib.cudaEventDestroy(e)


# --- the plan in device memory -----------------------------------------------------------------------------

def value_addresses(values: list[dict], inputs: Sequence[int], outputs: Sequence[int], weights: int,
                    blocks: Sequence[int]) -> list[int]:
    """Each value's address, given where the inputs, outputs, weights and blocks were allocated."""
    out = []
    for v in values:
        kind = v["kind"]
        if kind == "input":
            out.append(inputs[v["index"]])
        elif kind == "output":
            out.append(outputs[v["index"]])
        elif kind == "const":
            out.append(weights + v["offset"])
        else:  # a block, at an offset when it is one part of a concat planned as a view
            out.append(blocks[v["block"]] + v.get("offset", 0))
    return out


def device_table(values: list[dict], addresses: Sequence[int], device: tuple[int, int]) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """One DLTensor per value pointing at `addresses` on `device` ({kDLCUDA, 0}): what the native entry hands
    the kernels (the table itself stays in host memory; the entry reads it on the host). Returns the table and
    the shapes array it points into, which must live as long as the table."""
    table = np.zeros(len(values), dtype=DLTENSOR)
    shapes = np.zeros(sum(max(len(v["shape"]), 1) for v in values), dtype=np.int64)
    at = 0
    for i, (v, addr) in enumerate(zip(values, addresses)):
        ndim = len(v["shape"])
        shapes[at:at + ndim] = v["shape"]
        table[i] = (addr, device[0], device[1], ndim, *dlpack_code(tensor_dtype(v["dtype"])), 1,
                    shapes[at:].ctypes.data, 0, 0)
        at += max(ndim, 1)
    return table, shapes


def alloc(tvm_ffi, nbytes: int, device) -> object:
    """`nbytes` of device memory as a TVM tensor (freed with it); its address is `.data_ptr()`."""
    fn = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
    return fn(tvm_ffi.Shape((max(nbytes, 1),)), tvm_ffi.dtype("uint8"), device, None)


def upload(tvm_ffi, api: CudaApi, host: np.ndarray, device) -> object:
    """A device copy of a host byte array (the weights, once at load)."""
    t = alloc(tvm_ffi, host.nbytes, device)
    if host.nbytes:
        stream = api.stream_create()
        try:
            api.copy(t.data_ptr(), host.ctypes.data, host.nbytes, H2D, stream)
            api.synchronize(stream)
        finally:
            api.stream_destroy(stream)
    return t


@dataclass
class DeviceInput:
    """An input already on the device (a DLPack producer such as a torch CUDA tensor), imported by tvm_ffi."""
    tensor: object  # the tvm_ffi.Tensor, which keeps the producer's memory alive
    ptr: int


def graphs_default() -> bool:
    return os.environ.get(GRAPHS_ENV, "1") != "0"


def device_inputs(inputs, args: tuple, named: dict, stream: int, check) -> list:
    """The inputs in the model's order, checked by `check` (runtime.model.check_inputs: names, dtypes, shapes):
    NumPy arrays as they are, DLPack device tensors as DeviceInput. A device tensor is exported for `stream`, so
    its producer orders its pending writes before our reads (DLPack's stream argument)."""
    import tvm_ffi

    found: dict[int, DeviceInput] = {}

    def stand_in(v):
        if isinstance(v, np.ndarray) or not hasattr(v, "__dlpack_device__"):
            return v
        if v.__dlpack_device__()[0] == KDL_CPU:
            return np.from_dlpack(v)
        try:
            capsule = v.__dlpack__(stream=stream)
        except TypeError:  # a producer without the stream argument
            capsule = v.__dlpack__()
        t = tvm_ffi.from_dlpack(capsule)
        if not t.is_contiguous():
            raise InputError(f"a device input of shape {list(t.shape)} is not contiguous; pass x.contiguous()")
        # a stand-in of its dtype and shape (no memory: zero strides) lets `check` match names, dtypes and shapes
        s = np.broadcast_to(np.zeros((), tensor_dtype(str(t.dtype))), tuple(t.shape))
        found[id(s)] = DeviceInput(t, t.data_ptr())
        return s

    checked = check(inputs, tuple(stand_in(v) for v in args), {k: stand_in(v) for k, v in named.items()})
    return [found.get(id(v), v) for v in checked]


class DeviceContext:
    """The device memory one run writes (activation blocks, inputs, outputs), the descriptor table that points
    the kernels at it and at the shared weights, the context's stream, and its run captured as a CUDA graph."""

    def __init__(self, model, tvm_ffi, api: CudaApi, weights_at: int, device, graphs: bool):
        meta = model.meta
        self.api, self.device, self._entry = api, device, model._entry
        self._tvm_ffi = tvm_ffi
        self.blocks = [alloc(tvm_ffi, n, device) for n in meta["blocks"]]
        self.inputs = [alloc(tvm_ffi, t.nbytes, device) for t in model.inputs]
        self.outputs = [alloc(tvm_ffi, t.nbytes, device) for t in model.outputs]
        self.in_nbytes = [t.nbytes for t in model.inputs]
        self.out_info = model.outputs
        self.staging_at = [t.data_ptr() for t in self.inputs]
        self.out_at = [t.data_ptr() for t in self.outputs]
        addresses = value_addresses(meta["values"], self.staging_at, self.out_at, weights_at,
                                    [t.data_ptr() for t in self.blocks])
        self.table, self._shapes = device_table(meta["values"], addresses, (device.dlpack_device_type(),
                                                                            device.index))
        self.table_tensor = tvm_ffi.from_dlpack(self.table.view(np.uint8))
        self.input_values = {v["index"]: i for i, v in enumerate(meta["values"]) if v["kind"] == "input"}
        self.bound = list(self.staging_at)  # where the table points each input now
        self.stream = api.stream_create()
        self.graph: int | None = None
        if graphs:
            # the first launch loads the module into the driver (not allowed while capturing): run once first
            self.launch()
            api.synchronize(self.stream)
            self.graph = api.capture(self.stream, self._launch_entry)

    def _launch_entry(self) -> None:
        with self._tvm_ffi.use_raw_stream(self.device, self.stream):  # TVM launches on the thread's env stream
            self._entry(self.table_tensor)

    def launch(self) -> None:
        """Enqueue every kernel on the context's stream: the graph's replay, or the entry's launches."""
        if self.graph is not None:
            self.api.graph_launch(self.graph, self.stream)
        else:
            self._launch_entry()

    def stage(self, checked: list) -> None:
        """Put the inputs where the kernels read them: copies into the planned buffers (host to device, or device
        to device), or, without a graph, the table pointed at an aligned device input itself."""
        table = self.table["data"]
        for k, v in enumerate(checked):
            at = self.staging_at[k]
            if isinstance(v, DeviceInput) and self.graph is None and v.ptr % DEVICE_ALIGN == 0:
                at = v.ptr  # zero-copy: a graph's pointers are fixed, the entry's are read from the table
            if at != self.bound[k]:
                table[self.input_values[k]] = self.bound[k] = at
            if at != self.staging_at[k]:
                continue
            if isinstance(v, DeviceInput):
                self.api.copy(at, v.ptr, self.in_nbytes[k], D2D, self.stream)
            else:
                v = np.ascontiguousarray(v)
                self.api.copy(at, v.ctypes.data, self.in_nbytes[k], H2D, self.stream)

    def run(self, checked: list) -> list[np.ndarray]:
        """One run: inputs in, every kernel, outputs copied out into fresh NumPy arrays."""
        self.stage(checked)
        self.launch()
        outs = [np.empty(t.shape, t.np_dtype) for t in self.out_info]
        for o, at in zip(outs, self.out_at):
            self.api.copy(o.ctypes.data, at, o.nbytes, D2H, self.stream)
        self.api.synchronize(self.stream)  # also keeps `checked` (device inputs) alive until read
        return outs

    def run_dlpack(self, checked: list) -> list:
        """One run whose outputs stay on the device: fresh TVM tensors (DLPack producers: torch.from_dlpack)."""
        self.stage(checked)
        self.launch()
        outs = []
        for t, at in zip(self.out_info, self.out_at):
            fn = self._tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
            o = fn(self._tvm_ffi.Shape(t.shape), self._tvm_ffi.dtype(t.dtype), self.device, None)
            self.api.copy(o.data_ptr(), at, t.nbytes, D2D, self.stream)
            outs.append(o)
        self.api.synchronize(self.stream)
        return outs

    def close(self) -> None:
        if self.graph is not None:
            self.api.graph_destroy(self.graph)
            self.graph = None
        if self.stream is not None:
            self.api.stream_destroy(self.stream)
            self.stream = None

    def __del__(self):
        if getattr(self, "api", None) is not None and getattr(self, "stream", None) is not None:
            self.close()


class CudaExecutor:
    """A loaded CUDA artifact's device side: the weights uploaded once, and the contexts' factory."""

    def __init__(self, model, tvm_ffi, api: CudaApi | None = None, device=None, graphs: bool | None = None):
        self.api = api or CudaApi()
        if device is None:
            count, why = self.api.device_count()
            if count == 0:
                raise ArtifactError(f"{model.path} was built for CUDA; no CUDA device is usable here ({why})")
            self.api.set_device(0)
            device = tvm_ffi.device("cuda", 0)
        self.device = device
        self.graphs = graphs_default() if graphs is None else graphs
        self.weights = upload(tvm_ffi, self.api, model._weights, device)
        self._model, self._tvm_ffi = model, tvm_ffi

    def new_context(self) -> DeviceContext:
        return DeviceContext(self._model, self._tvm_ffi, self.api, self.weights.data_ptr(), self.device,
                             self.graphs)


def launch_times_ms(model, repeat: int) -> list[float]:
    """Device time of each of `repeat` launches of a loaded CUDA model's kernels (its graph's replay, or the
    entry's launches), by CUDA events on one context's stream after a run on zeros: no copies in or out."""
    model.run(*[np.zeros(t.shape, t.np_dtype) for t in model.inputs])
    ctx = model._acquire()
    try:
        return ctx.api.time_ms(ctx.stream, ctx.launch, repeat)
    finally:
        model._release(ctx)
