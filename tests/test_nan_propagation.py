"""NaN and Inf through compiled kernels, against ONNX Runtime: a NaN in must come out as NaN wherever ONNX Runtime
gives NaN (issue 13). Single ops are compiled together, one output each, for a pinned x86 target; a small CNN
checks the blocked layout's convs, epilogues and pooling; the benchmark models run in the slow test.

Elementwise ops and softmax must match ONNX Runtime's NaN positions exactly. Max pooling and ReduceMax/Min keep
every NaN (as np.max and the ONNX reference do); ONNX Runtime skips a NaN depending on where it sits in the
window, so there its NaNs must be a subset of Kiln's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper

import kiln
from kiln.config import Options
from tests.bench_scripts import load_bench

ort = pytest.importorskip("onnxruntime")

IMAGE = (1, 16, 6, 6)
ROWS = (8, 37)


def image_input(seed: int = 0) -> np.ndarray:
    """Channels with NaN first and last in a window, all NaN, ±inf, all ∓inf, ±3e38 and NaN beside inf."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(IMAGE).astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    x[0, 1, 5, 5] = np.nan
    x[0, 2] = np.nan
    x[0, 3, 2, 3] = np.inf
    x[0, 4, 3, 2] = -np.inf
    x[0, 5] = -np.inf
    x[0, 6] = np.inf
    x[0, 7, ::2] = 3e38
    x[0, 7, 1::2] = -3e38
    x[0, 8, 1, 1], x[0, 8, 1, 2] = np.nan, np.inf
    x[0, 9, 4, 1], x[0, 9, 4, 2] = np.nan, -np.inf
    flat = x[0, 10:].reshape(-1)
    flat[rng.choice(flat.size, 12, replace=False)] = np.nan
    return x


def rows_input() -> np.ndarray:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(ROWS).astype(np.float32)
    x[0, 5] = np.nan
    x[1] = np.nan
    x[2, 36] = np.inf
    x[3, 0] = -np.inf
    x[4] = -np.inf
    x[5] = 1e38
    x[6, 3] = np.nan
    x[6, 4] = np.inf
    return x


# output name: (op, inputs, attrs); "x" is IMAGE, "r" is ROWS, "y" a second IMAGE for the binary ops
ELEMENTWISE = {
    "relu": ("Relu", ["x"], {}),
    "clip": ("Clip", ["x", "clip_lo", "clip_hi"], {}),
    "clip_min_only": ("Clip", ["x", "clip_lo"], {}),
    "sigmoid": ("Sigmoid", ["x"], {}),
    "tanh": ("Tanh", ["x"], {}),
    "exp": ("Exp", ["x"], {}),
    "erf": ("Erf", ["x"], {}),
    "hard_sigmoid": ("HardSigmoid", ["x"], {"alpha": 0.2, "beta": 0.5}),
    "hard_swish": ("HardSwish", ["x"], {}),
    "leaky_relu": ("LeakyRelu", ["x"], {"alpha": 0.1}),
    "elu": ("Elu", ["x"], {"alpha": 1.0}),
    "sign": ("Sign", ["x"], {}),
    "softplus": ("Softplus", ["x"], {}),
    "max": ("Max", ["x", "y"], {}),
    "min": ("Min", ["x", "y"], {}),
    "max_const": ("Max", ["x", "half"], {}),
    "min_const": ("Min", ["half", "x"], {}),
    "softmax": ("Softmax", ["r"], {"axis": -1}),
    "log_softmax": ("LogSoftmax", ["r"], {"axis": -1}),
    "softmax_axis0": ("Softmax", ["r"], {"axis": 0}),
    "average_pool": ("AveragePool", ["x"], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
}
MAX_REDUCTIONS = {
    "max_pool": ("MaxPool", ["x"], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "max_pool_2x2": ("MaxPool", ["x"], {"kernel_shape": [2, 2], "strides": [2, 2]}),
    "global_max_pool": ("GlobalMaxPool", ["x"], {}),
    "reduce_max": ("ReduceMax", ["x"], {"axes": [2, 3], "keepdims": 1}),
    "reduce_min": ("ReduceMin", ["x"], {"axes": [3], "keepdims": 0}),
    "reduce_max_rows": ("ReduceMax", ["r"], {"axes": [1], "keepdims": 1}),
}
CONSTANTS = {"clip_lo": np.float32(-1.0), "clip_hi": np.float32(6.0), "half": np.full((1, 16, 1, 1), 0.5, np.float32)}


def ops_model() -> onnx.ModelProto:
    ops = {**ELEMENTWISE, **MAX_REDUCTIONS}
    nodes = [helper.make_node(op, ins, [name], name=name, **attrs) for name, (op, ins, attrs) in ops.items()]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, IMAGE),
              helper.make_tensor_value_info("y", TensorProto.FLOAT, IMAGE),
              helper.make_tensor_value_info("r", TensorProto.FLOAT, ROWS)]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ops]
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in CONSTANTS.items()]
    graph = helper.make_graph(nodes, "nan_ops", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


TARGETS = ["x86-avx2", pytest.param("x86-avx512", marks=pytest.mark.skipif(
    "avx512f" not in (Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""),
    reason="this host has no AVX-512"))]


@pytest.fixture(scope="module", params=TARGETS)
def ops_outputs(request, tmp_path_factory):
    """ONNX Runtime's and Kiln's output for every op, from one compile per target."""
    model = ops_model()
    feeds = {"x": image_input(0), "y": image_input(1)[:, ::-1].copy(), "r": rows_input()}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    path = tmp_path_factory.mktemp(request.param) / "ops.so"
    got = kiln.load(kiln.compile(model, path, Options(target=request.param)).path).run(**feeds)
    names = [o.name for o in model.graph.output]
    return {n: (w, g) for n, w, g in zip(names, want, got)}, feeds


def assert_same_values(got: np.ndarray, want: np.ndarray, where: np.ndarray, what: str) -> None:
    """Equal infinities, close finite values, at `where`."""
    np.testing.assert_allclose(got[where], want[where], rtol=1e-4, atol=1e-5, err_msg=what)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_nan_and_inf_match_onnxruntime(ops_outputs, name):
    outputs, _ = ops_outputs
    want, got = outputs[name]
    assert want.shape == got.shape
    wrong = np.argwhere(np.isnan(want) != np.isnan(got))
    assert not wrong.size, f"{name}: NaN differs at {len(wrong)} places, first {wrong[0].tolist()} " \
                           f"(ONNX Runtime {want[tuple(wrong[0])]}, Kiln {got[tuple(wrong[0])]})"
    assert_same_values(got, want, ~np.isnan(want), name)


def reference_nan(name: str, feeds: dict) -> np.ndarray:
    """Where a window or reduced row holds a NaN, from the input alone."""
    nan = np.isnan(feeds["r" if name.endswith("rows") else "x"])
    if name == "max_pool":
        padded = np.pad(nan, [(0, 0), (0, 0), (1, 1), (1, 1)])
        return sliding_window_view(padded, (3, 3), axis=(2, 3))[:, :, ::2, ::2].any(axis=(-2, -1))
    if name == "max_pool_2x2":
        return sliding_window_view(nan, (2, 2), axis=(2, 3))[:, :, ::2, ::2].any(axis=(-2, -1))
    if name in ("global_max_pool", "reduce_max"):
        return nan.any(axis=(2, 3), keepdims=True)
    if name == "reduce_min":
        return nan.any(axis=3)
    return nan.any(axis=1, keepdims=True)


@pytest.mark.parametrize("name", MAX_REDUCTIONS)
def test_max_reductions_keep_every_nan(ops_outputs, name):
    outputs, feeds = ops_outputs
    want, got = outputs[name]
    expected = reference_nan(name, feeds)
    np.testing.assert_array_equal(np.isnan(got), expected, err_msg=f"{name}: NaN positions")
    assert not (np.isnan(want) & ~np.isnan(got)).any(), f"{name}: ONNX Runtime has a NaN that Kiln lost"
    assert_same_values(got, want, ~np.isnan(want) & ~np.isnan(got), name)


@pytest.mark.parametrize("target", ["x86-avx2", "x86-avx512"])  # compiled, not run: no AVX-512 needed
def test_nan_aware_max_pool_stays_vectorized(target):
    """The blocked max pool reads its padding in place (an if_then_else); `tir.isnan` around it made TVM scalarize
    the whole loop (vmaxss, ucomiss, a branch per element), float_math.is_nan's integer test does not."""
    import re

    import tvm
    from kiln.codegen.target import resolve_target
    from kiln.ir.ops.blocked import POOL2D_NCHWC, PoolNCHWcAttrs
    from kiln.ir.ops.pool import PoolAttrs

    from tests.groups import lower, op_group

    attrs = PoolNCHWcAttrs(kind="max", pool=PoolAttrs(kernel=(3, 3), strides=(2, 2), padding=(0, 0, 1, 1),
                                                      dilation=(1, 1), ceil_mode=True))
    g = lower(op_group(POOL2D_NCHWC, [((1, 4, 56, 56, 16), "float32")], attrs), resolve_target(target))
    assert g.template.startswith("x86.pool_nchwc")
    asm = tvm.compile(tvm.IRModule({"main": g.prim_func}), target=resolve_target(target)).mod.inspect_source("asm")
    scalar = re.findall(r"^\s+(vmaxss|vucomiss|vcmpunordss)\b", asm, re.MULTILINE)
    assert not scalar, f"{target}: {len(scalar)} scalar max/compare instructions in the pooling loop"
    assert re.search(r"^\s+vblendvps|^\s+vblendmps|^\s+vmaxps", asm, re.MULTILINE), f"{target}: no vector max or blend"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA toolkit) is not on PATH")
def test_nan_aware_ops_compile_for_cuda(tmp_path):
    """The NaN-keeping reducers go through TVM's cross-thread reductions on CUDA (rows of ReduceMax, softmax)."""
    report = kiln.compile(ops_model(), tmp_path / "ops_cuda.so", Options(target="cuda-sm80"))
    assert report.kernels >= len(ELEMENTWISE) + len(MAX_REDUCTIONS) - 2  # Max/Min with a constant may fuse


def small_cnn() -> onnx.ModelProto:
    """conv (bias) → relu → max pool → conv → relu → global avg pool → flatten → gemm → clip → softmax, and the
    second relu as an output too; 40 channels block unevenly, so the blocked layout pads some."""
    rng = np.random.default_rng(3)

    def const(name, shape, scale=0.2):
        return onnx.numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1),
        helper.make_node("Clip", ["logits", "lo", "hi"], ["clipped"]),
        helper.make_node("Softmax", ["clipped"], ["out"], axis=-1),
    ]
    inits = [const("w1", (32, 3, 3, 3)), const("b1", (32,)), const("w2", (40, 32, 3, 3)), const("b2", (40,)),
             const("w3", (10, 40)), const("b3", (10,)),
             onnx.numpy_helper.from_array(np.float32(-10), "lo"), onnx.numpy_helper.from_array(np.float32(10), "hi")]
    graph = helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 3, 16, 16))],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("r2", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("poison", ["one_nan", "all_nan", "pos_inf", "big_1e38"])
def test_small_cnn_with_a_poisoned_input_gives_nan_where_onnxruntime_does(poison, tmp_path):
    model = small_cnn()
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    if poison == "one_nan":
        x[0, 1, 7, 9] = np.nan
    else:
        x[...] = {"all_nan": np.nan, "pos_inf": np.inf, "big_1e38": 1e38}[poison]
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = kiln.load(kiln.compile(model, tmp_path / "cnn.so", Options(target="x86-avx2")).path).run(x=x)
    assert np.isnan(want[0]).all(), f"{poison}: ONNX Runtime's output is not all NaN; the test proves nothing"
    np.testing.assert_array_equal(np.isnan(got[0]), np.isnan(want[0]), err_msg=f"{poison}: softmax NaN positions")
    if poison in ("one_nan", "all_nan"):  # 1e38 overflows to inf, and where inf - inf happens depends on the order
        # of the conv's sums; one NaN pixel's spread does not
        lost = np.isnan(want[1]) & ~np.isnan(got[1])
        assert np.isnan(want[1]).any() and not lost.any(), f"{poison}: the second relu lost NaNs: {np.argwhere(lost)[:4]}"


def _sweep_module():
    return load_bench("nan_propagation")


@pytest.mark.slow
@pytest.mark.parametrize("name", _sweep_module().MODELS)
def test_benchmark_model_nan_agrees_with_onnxruntime(name, tmp_path):
    """`python bench/nan_propagation.py` prints the same sweep as a table."""
    rows = _sweep_module().sweep(name, target="native", workdir=tmp_path)
    missing = [r for r in rows if r["missing"]]
    assert not missing, f"{name}: Kiln misses NaNs that ONNX Runtime gives: {missing}"
