"""The runtime under hostile use: one Model shared by threads, artifacts with flipped bits, garbage files, files
edited in place while loaded, and models loaded and dropped in a loop. Each test failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.errors import ArtifactError, InputError
from kiln import model_builders
from kiln.model_builders import GraphBuilder
from kiln.runtime.artifact import SEAL, validate_metadata


def small_cnn(seed: int):
    return model_builders.small_cnn(seed)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> tuple[Path, Path]:
    """Two artifacts of one architecture with different weights."""
    root = tmp_path_factory.mktemp("runtime")
    return tuple(kiln.compile(small_cnn(seed), root / f"cnn{seed}.so").path for seed in (0, 1))


def inputs(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(n)]


def test_one_model_shared_by_eight_threads_answers_right(artifacts):
    """Each run used to share one set of activation buffers: 8 threads got 120 of 120 answers wrong."""
    m = kiln.load(artifacts[0], max_concurrency=3)
    xs = inputs(8)
    want = [m.run(x)[0] for x in xs]
    wrong, errors = [], []

    def work(i: int) -> None:
        try:
            for k in range(15):
                got = m.run(xs[(i + k) % 8])[0]
                if not np.array_equal(got, want[(i + k) % 8]):
                    wrong.append((i, k))
        except Exception as err:  # noqa: BLE001  (reported below, with the thread that raised)
            errors.append(f"thread {i}: {err!r}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert wrong == [], f"{len(wrong)} of 120 concurrent runs gave another answer than the same run alone"
    assert 1 <= m._contexts <= 3  # contexts are capped, not one per caller


def test_max_concurrency_must_be_positive(artifacts):
    with pytest.raises(InputError, match="max_concurrency"):
        kiln.load(artifacts[0], max_concurrency=0)


def _flip_bits_and_load(path: Path, offsets: list[int], tmp: Path) -> list[str]:
    """Load `path` with one bit flipped at each offset, in a child process: a flip that slips through may
    crash the loader, and must not take the test run with it."""
    script = f"""
import json, sys
from pathlib import Path
import kiln
from kiln.errors import ArtifactError
data = Path({str(path)!r}).read_bytes()
out = []
for i, at in enumerate({offsets!r}):
    bad = bytearray(data); bad[at] ^= 1 << (i % 8)
    p = Path({str(tmp)!r}) / f"flip{{i}}.so"; p.write_bytes(bytes(bad))
    try:
        kiln.load(p); out.append("loaded")
    except ArtifactError as err:
        out.append("refused: " + str(err))
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the loader died (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_flipped_bit_is_refused_before_anything_runs(artifacts, tmp_path):
    """8 single-bit flips in the code gave 3 silently wrong outputs and 1 SIGSEGV; the seal's CRC-32 sees each."""
    path = artifacts[0]
    size = path.stat().st_size
    data = path.read_bytes()
    meta_at = data.index(b'{"magic": "kiln"')
    offsets = sorted({*np.random.default_rng(0).integers(64, size - SEAL.size, 20).tolist(),
                      20, meta_at + 30, meta_at + 200, size - 1, size - SEAL.size - 1})
    results = _flip_bits_and_load(path, offsets, tmp_path)
    assert [r for r in results if not r.startswith("refused")] == []
    assert all("corrupted" in r or "seal" in r for r in results), results


def test_a_cut_off_seal_is_refused(artifacts, tmp_path):
    data = artifacts[0].read_bytes()
    (tmp_path / "unsealed.so").write_bytes(data[:-SEAL.size])
    with pytest.raises(ArtifactError, match="lost its seal"):
        kiln.load(tmp_path / "unsealed.so")


def _elf_with(data: bytes, **fields) -> bytes:
    at = {"phoff": (32, "<Q"), "shoff": (40, "<Q"), "phentsize": (54, "<H"), "phnum": (56, "<H")}
    out = bytearray(data[:-SEAL.size])
    for name, value in fields.items():
        struct.pack_into(at[name][1], out, at[name][0], value)
    return bytes(out) + SEAL.pack(b"KILNSEAL", 1, zlib.crc32(bytes(out)), len(out))  # resealed: only headers lie


@pytest.mark.parametrize("fields", [{"phoff": 2**63 + 5}, {"phoff": 2**64 - 1}, {"shoff": 2**63},
                                    {"phentsize": 0}, {"phnum": 65535}],
                         ids=["phoff_2^63", "phoff_max", "shoff_2^63", "phentsize_0", "phnum_max"])
def test_garbage_elf_headers_are_refused_cleanly(artifacts, tmp_path, fields):
    """Random bytes whose program-header offset is ≥ 2^63 raised a raw ValueError out of the ELF check."""
    (tmp_path / "bad.so").write_bytes(_elf_with(artifacts[0].read_bytes(), **fields))
    with pytest.raises(ArtifactError, match="truncated or corrupted"):
        kiln.load(tmp_path / "bad.so")


@pytest.mark.parametrize("kind", ["random", "random_elf", "text", "empty", "directory", "half"])
def test_files_that_are_no_artifact_are_refused(artifacts, tmp_path, kind):
    path = tmp_path / "model.so"
    rng = np.random.default_rng(1)
    if kind == "random":
        path.write_bytes(rng.bytes(100_000))
    elif kind == "random_elf":
        path.write_bytes(b"\x7fELF\x02\x01" + rng.bytes(100_000))
    elif kind == "text":
        path.write_text("model weights go here\n" * 100)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    else:
        data = artifacts[0].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError) as err:
        kiln.load(path)
    assert str(path) in str(err.value) or path.name in str(err.value)


def test_editing_a_loaded_file_in_place_changes_nothing(artifacts, tmp_path):
    """`truncate` on a loaded artifact killed the process with SIGBUS, `cp` over it with SIGSEGV: the model
    now runs from a private copy, so the file may change under it."""
    script = f"""
import os, shutil, sys
import numpy as np
import kiln
path = {str(tmp_path / "live.so")!r}
shutil.copyfile({str(artifacts[0])!r}, path)
m = kiln.load(path)
x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
want = m.run(x)[0]
os.truncate(path, 4096)
assert np.array_equal(m.run(x)[0], want), "truncate changed the answer"
with open({str(artifacts[1])!r}, "rb") as src, open(path, "r+b") as dst:  # cp: the same inode, rewritten
    dst.write(src.read())
assert np.array_equal(m.run(x)[0], want), "cp over the file changed the answer"
os.unlink(path)
assert np.array_equal(m.run(x)[0], want), "rm changed the answer"
other = kiln.load({str(artifacts[1])!r}).run(x)[0]
assert not np.array_equal(other, want)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


def _mapped_copies() -> int:
    with open("/proc/self/maps") as f:
        return len({line.split()[-1] for line in f if "/kiln-" in line and ".so" in line})


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_dropped_models_unload_their_code(artifacts):
    """TVM-FFI keeps every loaded library for the life of the process by default: 50 loads kept 824 MB."""
    x = inputs(1)[0]
    before = _mapped_copies()
    for _ in range(20):
        m = kiln.load(artifacts[0])
        m.run(x)
        del m
    assert _mapped_copies() == before


def test_private_copies_leave_no_files_behind(artifacts, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    m = kiln.load(artifacts[0])
    assert os.listdir(tmp_path) == []
    assert m.run(inputs(1)[0])[0].shape == (1, 10)


def _meta() -> dict:
    t = {"name": "x", "shape": [1, 4], "dtype": "float32"}
    return {"magic": "kiln", "format": 2, "inputs": [t], "outputs": [{**t, "name": "y"}], "blocks": [16],
            "weights_nbytes": 16,
            "values": [{"kind": "input", "index": 0, **t}, {"kind": "const", "offset": 0, **t},
                       {"kind": "block", "block": 0, "offset": 0, **t}, {"kind": "output", "index": 0, **t}],
            "steps": [{"kernel": "k0", "args": [0, 1, 2]}, {"kernel": "k1", "args": [2, 3]}]}


@pytest.mark.parametrize("edit,field", [
    (lambda m: m["values"][1].update(offset=8), "values[1]"),  # a constant reaching past the weights
    (lambda m: m["values"][2].update(block=3), "values[2].block"),
    (lambda m: m["values"][2].update(offset=4), "values[2]"),
    (lambda m: m["values"][0].update(shape=[1, -4]), "values[0].shape[1]"),
    (lambda m: m["values"][0].update(dtype="float31"), "values[0].dtype"),
    (lambda m: m["steps"][0].update(args=[0, 9]), "steps[0].args[1]"),
    (lambda m: m["inputs"][0].update(shape="1x4"), "inputs[0]"),
    (lambda m: m.update(blocks={"0": 16}), "blocks"),
    (lambda m: m["values"][3].update(kind="weights"), "values[3].kind"),
], ids=["const_past_weights", "block_index", "block_offset", "negative_dim", "dtype", "step_arg", "shape_type",
        "blocks_type", "kind"])
def test_metadata_out_of_bounds_is_refused_naming_the_field(edit, field):
    meta = _meta()
    validate_metadata(meta, Path("m.so"))  # the unedited one is fine
    edit(meta)
    with pytest.raises(ArtifactError, match=field.replace("[", r"\[").replace("]", r"\]")):
        validate_metadata(meta, Path("m.so"))


def test_an_artifact_copied_while_loaded_elsewhere_loads_its_own_code(artifacts, tmp_path):
    """A second load of one path after the file changed must run the new kernels and weights."""
    path = tmp_path / "m.so"
    shutil.copyfile(artifacts[0], path)
    x = inputs(1)[0]
    first = kiln.load(path)
    shutil.copyfile(artifacts[1], path)
    second = kiln.load(path)
    assert np.array_equal(first.run(x)[0], kiln.load(artifacts[0]).run(x)[0])
    assert np.array_equal(second.run(x)[0], kiln.load(artifacts[1]).run(x)[0])


@pytest.mark.parametrize("pool", ["kiln", "tvm"])
def test_callers_on_ever_new_threads_leave_a_bounded_number_of_workers(artifacts, pool):
    """TVM keeps a worker pool per calling thread until the process exits: 50 short-lived callers left 150
    spinning workers behind. Past MAX_POOL_OWNERS threads, runs go to long-lived lanes instead. The artifact's
    own pool (codegen/pool.py) is one per Model, whichever thread calls: no lanes at all."""
    script = f"""
import os, threading
import numpy as np
import kiln
from kiln.runtime import threads
threads.MAX_POOL_OWNERS = 2
m = kiln.load({str(artifacts[0])!r})
x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
want = m.run(x)[0]
wrong = []
def call():
    if not np.array_equal(m.run(x)[0], want):
        wrong.append(1)
for _ in range(40):
    t = threading.Thread(target=call); t.start(); t.join()
names = [t.name for t in threading.enumerate()]
print(len(wrong), len(os.listdir("/proc/self/task")), sum(n.startswith("kiln-lane") for n in names),
      threads.usable_cpus(), threads.pool_limit())
"""
    env = {**os.environ, "KILN_THREAD_POOL": pool}
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wrong, tasks, lanes, cpus, workers = map(int, proc.stdout.split())
    assert wrong == 0
    if pool == "tvm":
        assert lanes == cpus
        # the main thread, 2 pool owners and the lanes, each with its workers; 40 callers would leave 40 pools
        assert tasks <= 1 + (2 + lanes) * (workers + 1) + 2, tasks
    else:
        assert lanes == 0
        assert tasks <= 1 + workers + 2, tasks  # the main thread and the Model's pool


def test_a_run_on_a_lane_raises_in_its_caller(artifacts):
    from kiln.runtime import threads

    def boom():
        raise ValueError("kernel failed")

    lanes = threads._Lanes(1)
    with pytest.raises(ValueError, match="kernel failed"):
        lanes.run(boom, None)
    assert lanes.run(lambda: 41 + 1, None) == 42


def test_inputs_are_rebound_between_zero_copy_and_staging(tmp_path):
    """Large aligned inputs are read in place and everything else through a staging copy; a run after either
    kind must read its own input, never the one the table pointed at before."""
    from kiln.runtime.model import ZERO_COPY_MIN_BYTES, aligned_empty

    g = GraphBuilder("big_input", 0)
    x = g.op("Relu", [g.op("Conv", ["data", g.weight((4, 3, 3, 3), 27, "conv.w")], kernel_shape=[3, 3])])
    y = g.op("GlobalAveragePool", [x])
    model = g.model([helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 96, 96])],
                    [(y, TensorProto.FLOAT, [1, 4, 1, 1])])
    m = kiln.load(kiln.compile(model, tmp_path / "big.so").path)
    assert m.inputs[0].nbytes >= ZERO_COPY_MIN_BYTES
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 3, 96, 96)).astype(np.float32) for _ in range(4)]
    want = [m.run(x.copy())[0] for x in xs]
    aligned = aligned_empty((1, 3, 96, 96), "float32")
    unaligned = np.frombuffer(np.empty(aligned.nbytes + 4, np.uint8)[4:].data, np.float32).reshape(1, 3, 96, 96)
    strided = np.empty((1, 3, 96, 192), np.float32)[..., ::2]
    for k, buf in enumerate([aligned, unaligned, aligned, strided, unaligned, aligned]):
        buf[...] = xs[k % 4]
        np.testing.assert_array_equal(m.run(buf)[0], want[k % 4], err_msg=f"run {k}")


def test_an_array_passed_again_is_read_as_it_is_now(tmp_path):
    """The array read in place last run is not looked at again when passed again (its address is kept): each run
    must still read what it holds now, and one whose strides were set in place (deprecated, still possible)
    must be staged, not read as the contiguous array it was."""
    import warnings

    from kiln.runtime.model import aligned_empty

    g = GraphBuilder("big_input", 0)
    y = g.op("Relu", [g.op("Conv", ["data", g.weight((4, 3, 3, 3), 27, "conv.w")], kernel_shape=[3, 3])])
    model = g.model([helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 96, 96])],
                    [(g.op("GlobalAveragePool", [y]), TensorProto.FLOAT, [1, 4, 1, 1])])
    m = kiln.load(kiln.compile(model, tmp_path / "big.so").path)
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((1, 3, 96, 96)).astype(np.float32) for _ in range(3)]
    want = [m.run(x.copy())[0] for x in xs]
    raw = aligned_empty((2 * 3 * 96 * 96,), "float32")
    x = np.ndarray((1, 3, 96, 96), np.float32, buffer=raw)
    for k in range(3):
        x[...] = xs[k]
        np.testing.assert_array_equal(m.run(x)[0], want[k], err_msg=f"run {k}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        x.strides = (8 * 3 * 96 * 96, 8 * 96 * 96, 8 * 96, 8)  # every other float of the same buffer
    assert not x.flags.c_contiguous
    x[...] = xs[1]
    np.testing.assert_array_equal(m.run(x)[0], want[1])


def test_run_into_writes_the_callers_buffers(artifacts, tmp_path):
    """The hot-loop call: outputs land in buffers the caller owns, small (copied) and large (written in place
    by the kernels), and a plain run afterwards still returns fresh arrays."""
    from kiln.runtime.model import aligned_empty

    m = kiln.load(artifacts[0])
    xs = inputs(3)
    y = np.empty((1, 10), np.float32)
    for x in xs:
        assert m.run_into([y], x)[0] is y
        np.testing.assert_array_equal(y, m.run(x)[0])
    g = GraphBuilder("big_output", 0)
    out = g.op("Relu", [g.op("Conv", ["data", g.weight((8, 3, 3, 3), 27, "conv.w")], kernel_shape=[3, 3],
                             pads=[1] * 4)])
    big = kiln.load(kiln.compile(g.model([helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 64, 64])],
                                         [(out, TensorProto.FLOAT, [1, 8, 64, 64])]), tmp_path / "big.so").path)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    want = big.run(x)[0]
    buf = aligned_empty((1, 8, 64, 64), "float32")
    big.run_into([buf], x)
    np.testing.assert_array_equal(buf, want)
    fresh = big.run(x * 2)[0]  # the table points back at the model's own buffer
    np.testing.assert_array_equal(buf, want)
    np.testing.assert_array_equal(fresh, big.run(x * 2)[0])


def test_run_into_refuses_wrong_buffers(artifacts):
    m = kiln.load(artifacts[0])
    x = inputs(1)[0]
    with pytest.raises(InputError, match="float32\\[1, 10\\]; its buffer is float64"):
        m.run_into([np.empty((1, 10), np.float64)], x)
    with pytest.raises(InputError, match="got 2 output buffers"):
        m.run_into([np.empty((1, 10), np.float32)] * 2, x)
    with pytest.raises(InputError, match="C-contiguous"):
        m.run_into([np.empty((1, 20), np.float32)[:, ::2]], x)


def test_bfloat16_tensors_load_and_run(tmp_path):
    """bfloat16 inputs and outputs (ml_dtypes' NumPy type) reach the kernels through the descriptor table:
    the loader refused them as 'not a tensor dtype'."""
    import ml_dtypes

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.BFLOAT16), helper.make_node("Relu", ["h"], ["y"])],
        "bf16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [3, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m = kiln.load(kiln.compile(model, tmp_path / "bf16.so").path)
    assert m.outputs[0].np_dtype == np.dtype(ml_dtypes.bfloat16)
    x = np.array([[1.0, -2.0, 0.1, np.nan, 3.3e38]] * 3, np.float32)
    got = m.run(x)[0]
    want = np.maximum(x.astype(ml_dtypes.bfloat16), ml_dtypes.bfloat16(0))
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    with pytest.raises(ArtifactError, match="bfloat16"):
        m.profile(1)


def pointwise_conv(cin: int, cout: int, size: int):
    """A 1x1 conv with ReLU on float32[1, cin, size, size]: tensors as large as wanted, compiled in a second."""
    g = GraphBuilder("pointwise", 0)
    y = g.op("Relu", [g.op("Conv", ["x", g.weight((cout, cin, 1, 1), cin, "w")], kernel_shape=[1, 1])])
    return g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])],
                   [(y, TensorProto.FLOAT, [1, cout, size, size])])


def test_large_outputs_are_fresh_arrays_the_kernels_wrote(tmp_path):
    """run() hands the kernels a new array for each large output (no copy out of the context): each run's
    arrays are its own, and a later run, or one on another thread, never changes them."""
    model = pointwise_conv(8, 16, 64)  # 256 KB out: over the in-place threshold
    m = kiln.load(kiln.compile(model, tmp_path / "wide.so").path)
    xs = [np.random.default_rng(s).standard_normal((1, 8, 64, 64)).astype(np.float32) for s in range(4)]
    from onnx import numpy_helper

    weights = numpy_helper.to_array(next(t for t in model.graph.initializer if t.dims[:2] == [16, 8]))[:, :, 0, 0]
    want = [np.maximum(np.einsum("oc,chw->ohw", weights, x[0]), 0)[None] for x in xs]
    got = [m.run(x)[0] for x in xs]
    assert len({a.ctypes.data for a in got}) == len(got)  # four arrays, not one reused
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    kept = [a.copy() for a in got]
    threads = [threading.Thread(target=lambda: [m.run(x) for x in xs for _ in range(5)]) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got, kept):
        np.testing.assert_array_equal(a, b)


def test_empty_inputs_are_aligned_and_read_in_place(tmp_path):
    from kiln.runtime.artifact import ALIGN

    model = pointwise_conv(16, 4, 64)  # 256 KB in: over the in-place threshold
    m = kiln.load(kiln.compile(model, tmp_path / "wide_in.so").path)
    x, = m.empty_inputs()
    assert (x.shape, x.dtype, x.ctypes.data % ALIGN, x.flags.c_contiguous) == ((1, 16, 64, 64), np.float32, 0, True)
    x[...] = np.random.default_rng(0).standard_normal(x.shape)
    want = m.run(x.copy(order="C"))[0]  # NumPy's own allocation: staged unless it happens to be aligned
    np.testing.assert_array_equal(m.run(x)[0], want)
    ctx = m._acquire()
    try:
        assert x.ctypes.data in ctx.bound  # the kernels read the caller's array: no staging copy
    finally:
        m._release(ctx)


def test_stamped_runs_time_each_kernel_in_whole_runs(artifacts):
    """`stamped_runs` gives one row per run and one column per kernel, read off the entry's clock stamps: every
    kernel took time, and no run's kernels sum to more than the wall time of all the runs together."""
    import time

    m = kiln.load(artifacts[0])
    t0 = time.perf_counter()
    rows = m.stamped_runs(5, inputs(1))
    wall_ms = (time.perf_counter() - t0) * 1e3
    assert rows.shape == (5, len(m.meta["steps"]))
    assert (rows > 0).all() and rows.sum() <= wall_ms
    with pytest.raises(InputError):
        m.stamped_runs(1, [np.zeros((1, 3, 8, 8), np.float32)])  # checked like a run's inputs
