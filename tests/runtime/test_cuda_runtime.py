"""The CUDA executor (runtime/cuda.py) on a machine without a GPU: the no-driver error, the ctypes signatures
against the local libcudart, the device table, and the whole executor (staging, zero-copy binding, graph capture
and replay, threads) run end to end on host memory with a fake CUDA API and a CPU artifact. The last test runs a
CUDA artifact on a real GPU and is skipped where there is none."""

from __future__ import annotations

import ctypes
import threading
import time

import numpy as np
import pytest
import tvm_ffi
from onnx import TensorProto, helper

import kiln
from kiln.config import Options
from kiln.errors import ArtifactError, InputError
from kiln.model_builders import GraphBuilder
from kiln.runtime import cuda
from kiln.runtime import model as runtime_model
from kiln.runtime.cuda import D2D, D2H, H2D, CudaApi, CudaExecutor, DeviceInput


def dense_relu(seed: int = 0):
    """y = relu(x @ w.T + b): a NumPy reference in one line."""
    g = GraphBuilder("dense_relu", seed)
    w = g.weight((48, 64), 64, "w")
    y = g.op("Relu", [g.op("Gemm", ["x", w, g.const(np.linspace(-1, 1, 48, dtype=np.float32), "b")], transB=1)])
    return g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                   [(y, TensorProto.FLOAT, [4, 48])])


def reference(onnx_model, x: np.ndarray) -> np.ndarray:
    inits = {i.name: np.frombuffer(i.raw_data, np.float32).reshape(i.dims) if i.raw_data else
             np.array(i.float_data, np.float32).reshape(i.dims) for i in onnx_model.graph.initializer}
    w, b = (inits[n] for n in onnx_model.graph.node[0].input[1:])
    return np.maximum(x.astype(np.float64) @ w.T.astype(np.float64) + b, 0)


@pytest.fixture(scope="module")
def cpu_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda_fake")
    onnx_model = dense_relu()
    return kiln.compile(onnx_model, root / "dense.so", Options(target="x86-avx2")).path, onnx_model


@pytest.fixture(scope="module")
def cuda_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda_art")
    onnx_model = dense_relu()
    return kiln.compile(onnx_model, root / "dense_cuda.so", Options(target="cuda-sm90")).path, onnx_model


# --- no GPU here -------------------------------------------------------------------------------------------

def _gpu_usable() -> bool:
    if cuda.load_cuda_runtime() is not None:
        return False
    try:
        return CudaApi().device_count()[0] > 0
    except ArtifactError:
        return False


GPU = _gpu_usable()


@pytest.mark.skipif(GPU, reason="this machine has a CUDA driver and device")
def test_cuda_artifact_without_a_driver_fails_clearly(cuda_artifact):
    path, _ = cuda_artifact
    with pytest.raises(ArtifactError, match=r"built for CUDA; no CUDA driver on this machine .*libcuda") as err:
        kiln.load(path)
    assert "dense_cuda.ptx" in str(err.value)


def test_cuda_runtime_signatures_match_the_local_libcudart():
    """Every declared call exists in libcudart (found by soname, as on the GPU machine), with its types set."""
    try:
        api = CudaApi()
    except ArtifactError as err:
        pytest.skip(f"no libcudart here: {err}")
    for name, (restype, argtypes) in cuda.SIGNATURES.items():
        fn = getattr(api.lib, name)
        assert (fn.restype, fn.argtypes) == (restype, argtypes), name
    count, why = api.device_count()
    assert (count > 0) == GPU and (GPU or why), why  # no device: a reason (driver missing), never a crash


def test_device_table_points_at_the_given_addresses_on_the_device():
    values = [{"kind": "input", "index": 0, "shape": [2, 3], "dtype": "float32"},
              {"kind": "const", "offset": 128, "shape": [3], "dtype": "float16"},
              {"kind": "block", "block": 1, "offset": 64, "shape": [], "dtype": "int8"},
              {"kind": "output", "index": 0, "shape": [2, 3, 4], "dtype": "bfloat16"}]
    at = cuda.value_addresses(values, inputs=[0x1000], outputs=[0x2000], weights=0x3000, blocks=[0x4000, 0x5000])
    assert at == [0x1000, 0x3080, 0x5040, 0x2000]
    table, shapes = cuda.device_table(values, at, (cuda.KDL_CUDA, 0))
    assert table.dtype == runtime_model._DLTENSOR and table.itemsize == 48  # what codegen/entry.py reads
    assert list(table["data"]) == at
    assert set(table["device_type"]) == {2} and set(table["device_id"]) == {0}
    assert list(table["ndim"]) == [2, 1, 0, 3]
    assert [(c, b) for c, b in zip(table["code"], table["bits"])] == [(2, 32), (2, 16), (0, 8), (4, 16)]
    for row, v in zip(table, values):
        dims = np.ctypeslib.as_array((ctypes.c_int64 * max(len(v["shape"]), 1)).from_address(int(row["shape"])))
        assert list(dims[:len(v["shape"])]) == v["shape"]
    assert shapes.size == 2 + 1 + 1 + 3


# --- the executor on host memory ---------------------------------------------------------------------------

class FakeCuda:
    """Host memory stands in for the device: a copy is a memmove; a capture records the launch without running
    it, and a replay runs the recorded launch, so a run that skips staging before a replay reads stale inputs."""

    def __init__(self):
        self.copies: list[int] = []
        self.graphs: dict[int, object] = {}
        self.launches = self.streams = 0

    def stream_create(self) -> int:
        self.streams += 1
        return 0x100 + self.streams

    def stream_destroy(self, stream: int) -> None:
        self.streams -= 1

    def synchronize(self, stream: int) -> None:
        pass

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self.copies.append(kind)
        ctypes.memmove(dst, src, nbytes)

    def capture(self, stream: int, launch) -> int:
        handle = 0x900 + len(self.graphs)
        self.graphs[handle] = launch
        return handle

    def graph_launch(self, graph: int, stream: int) -> None:
        self.launches += 1
        self.graphs[graph]()

    def graph_destroy(self, graph: int) -> None:
        del self.graphs[graph]

    def time_ms(self, stream: int, fn, repeat: int) -> list[float]:
        out = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out


class HostTensor:
    """A DLPack producer claiming to be on a CUDA device while its memory is host memory (the fake's device)."""

    def __init__(self, a: np.ndarray):
        self.a = a

    def __dlpack_device__(self):
        return (cuda.KDL_CUDA, 0)

    def __dlpack__(self, stream=None):
        self.stream = stream
        return self.a.__dlpack__()


def _fake_model(path, graphs: bool):
    m = kiln.load(path)
    api = FakeCuda()
    m._cuda = CudaExecutor(m, tvm_ffi, api=api, device=tvm_ffi.device("cpu", 0), graphs=graphs)
    m._idle = [m._new_context(tvm_ffi)]
    return m, api


@pytest.mark.parametrize("graphs", [True, False], ids=["graph", "no_graph"])
def test_executor_on_host_memory_matches_numpy(cpu_artifact, graphs):
    path, onnx_model = cpu_artifact
    m, api = _fake_model(path, graphs)
    ctx = m._idle[0]
    assert (ctx.graph is not None) == graphs and len(api.graphs) == int(graphs)
    rng = np.random.default_rng(3)
    for seed in range(3):  # a graph replays with the inputs staged before it, not those it was captured with
        x = rng.standard_normal((4, 64)).astype(np.float32)
        (got,) = m.run(x)
        np.testing.assert_allclose(got, reference(onnx_model, x), rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
    assert api.launches == (3 if graphs else 0)
    assert api.copies.count(H2D) == 1 + 3 and api.copies.count(D2H) == 3  # the weights once, then per run
    # the weights live in the executor's upload, the table points there
    assert m._weights is None or m._cuda.weights.data_ptr() != m._weights.ctypes.data


def test_device_input_is_bound_without_a_graph_and_copied_with_one(cpu_artifact):
    path, onnx_model = cpu_artifact
    x = runtime_model.aligned_empty((4, 64), "float32")  # 64-byte aligned: may be bound in place
    x[:] = np.random.default_rng(5).standard_normal((4, 64))
    want = reference(onnx_model, x)
    for graphs in (False, True):
        m, api = _fake_model(path, graphs)
        ctx = m._idle[0]
        before = ctx.table["data"].copy()
        dev = HostTensor(x)
        (got,) = m.run(dev)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"graphs={graphs}")
        assert dev.stream == ctx.stream  # exported for our stream, so the producer orders its writes first
        bound = ctx.table["data"][m._input_values[0]]
        if graphs:  # the graph's pointers are fixed: one device-to-device copy into the planned buffer
            assert api.copies.count(D2D) == 1 and (ctx.table["data"] == before).all()
        else:  # the table points at the caller's memory: no copy at all
            assert D2D not in api.copies and bound == x.ctypes.data
            (again,) = m.run(x)  # a NumPy input later: the table points back at the planned buffer
            np.testing.assert_allclose(again, want, rtol=1e-5, atol=1e-5)
            assert ctx.table["data"][m._input_values[0]] == ctx.staging_at[0]
            raw = np.empty(4 * 64 + 2, np.float32)
            off = raw[1:] if raw[1:].ctypes.data % cuda.DEVICE_ALIGN else raw[2:]  # misaligned for a vector load
            off = off[:256].reshape(4, 64)
            off[:] = x
            (again,) = m.run(HostTensor(off))  # a misaligned device input is copied, never bound
            np.testing.assert_allclose(again, want, rtol=1e-5, atol=1e-5)
            assert api.copies.count(D2D) == 1 and ctx.table["data"][m._input_values[0]] == ctx.staging_at[0]


def test_device_inputs_are_checked_like_numpy_ones(cpu_artifact):
    path, _ = cpu_artifact
    m, _ = _fake_model(path, True)
    with pytest.raises(InputError, match=r"input 'x' expects float32\[4, 64\], got shape \[4, 63\]"):
        m.run(HostTensor(np.zeros((4, 63), np.float32)))
    with pytest.raises(InputError, match="got float64"):
        m.run(x=HostTensor(np.zeros((4, 64))))
    with pytest.raises(InputError, match="not contiguous"):
        m.run(HostTensor(np.zeros((64, 4), np.float32).T))
    checked = cuda.device_inputs(m.inputs, (HostTensor(np.ones((4, 64), np.float32)),), {}, 7,
                                 runtime_model.check_inputs)
    assert isinstance(checked[0], DeviceInput)


def test_each_thread_gets_its_own_context_stream_and_graph(cpu_artifact):
    path, onnx_model = cpu_artifact
    m, api = _fake_model(path, True)
    m.max_concurrency = 4
    xs = [np.full((4, 64), k / 7, np.float32) for k in range(8)]
    wrong, barrier = [], threading.Barrier(4)

    def work(i: int) -> None:
        barrier.wait()
        for k in range(10):
            x = xs[(i + k) % 8]
            if not np.allclose(m.run(x)[0], reference(onnx_model, x), rtol=1e-5, atol=1e-5):
                wrong.append((i, k))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
    assert api.streams == m._contexts == len(api.graphs) >= 1  # one stream and one graph per context


def test_graphs_can_be_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv(cuda.GRAPHS_ENV, "0")
    assert cuda.graphs_default() is False
    monkeypatch.setenv(cuda.GRAPHS_ENV, "1")
    assert cuda.graphs_default() is True


def test_ptx_answers_the_compile_callback_only_for_its_own_kernels(tmp_path):
    ptx = tmp_path / "m.ptx"
    ptx.write_text(".version 8.0\n.target sm_90\n.visible .entry kiln_k0_kernel(\n)\n")
    source = 'extern "C" __global__ void __launch_bounds__(256) kiln_k0_kernel(float* a) {}'
    with cuda.ptx_for_source(ptx):
        fn = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
        assert bytes(fn(source, None)).startswith(b".version 8.0")
        with pytest.raises(Exception, match="lacks kernels"):
            fn(source.replace("kiln_k0", "kiln_k1"), None)


def test_runtime_dir_follows_the_bundle_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(cuda.RUNTIME_DIR_ENV, str(tmp_path))
    assert cuda.runtime_dir() == tmp_path
    monkeypatch.delenv(cuda.RUNTIME_DIR_ENV)
    assert (cuda.runtime_dir() / "libtvm_runtime.so").is_file()


# --- on a GPU ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not GPU, reason="needs a CUDA device and driver (none here)")
@pytest.mark.parametrize("graphs", [True, False], ids=["graph", "no_graph"])
def test_cuda_artifact_runs_on_the_gpu_against_numpy(cuda_artifact, graphs):
    path, onnx_model = cuda_artifact
    m = kiln.load(path, cuda_graphs=graphs)
    assert m.device == "cuda"
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    for _ in range(3):
        np.testing.assert_allclose(m.run(x)[0], reference(onnx_model, x), rtol=1e-3, atol=1e-4)
    (y,) = m.run_dlpack(x)
    assert y.device.dlpack_device_type() == cuda.KDL_CUDA


def test_external_weights_load_from_the_file_beside_the_artifact(tmp_path):
    """The executors' one weight access reads `model.weights` (format 3) as it reads the embedded blob."""
    onnx_model = dense_relu(seed=2)
    ext = kiln.compile(onnx_model, tmp_path / "ext.so", Options(target="x86-avx2"), weights="external").path
    assert (tmp_path / "ext.weights").is_file()
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_allclose(kiln.load(ext).run(x)[0], reference(onnx_model, x), rtol=1e-5, atol=1e-5)
    (tmp_path / "ext.weights").write_bytes(b"\0" * (tmp_path / "ext.weights").stat().st_size)
    with pytest.raises(ArtifactError, match="does not belong to ext.so"):
        kiln.load(ext)
