"""nn ops (through their ONNX converters) against onnx's ReferenceEvaluator over sweeps of shapes and attributes."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kiln.errors import TypeCheckError
from kiln.ir import call, var
from kiln.ir.ops.conv import CONV2D
from kiln.ir.ops.dense import DENSE

from ..onnx_check import check_node

RTOL, ATOL = 1e-4, 1e-4


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 2), groups=st.sampled_from([1, 2, 3]), cpg=st.integers(1, 3), opg=st.integers(1, 3),
       h=st.integers(3, 11), w=st.integers(3, 11), k=st.sampled_from([1, 2, 3, 5]), stride=st.integers(1, 3),
       dilation=st.integers(1, 2), pad=st.integers(0, 2), seed=st.integers(0, 1000))
@example(n=1, groups=3, cpg=1, opg=1, h=7, w=7, k=3, stride=1, dilation=1, pad=1, seed=0)  # depthwise
@example(n=1, groups=1, cpg=3, opg=2, h=11, w=5, k=5, stride=3, dilation=2, pad=2, seed=1)  # primes, dilated
def test_conv2d_matches_onnx(n, groups, cpg, opg, h, w, k, stride, dilation, pad, seed):
    extent = (k - 1) * dilation + 1
    if h + 2 * pad < extent or w + 2 * pad < extent:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, groups * cpg, h, w)).astype(np.float32)
    wt = rng.standard_normal((groups * opg, cpg, k, k)).astype(np.float32)
    b = rng.standard_normal(groups * opg).astype(np.float32)
    check_node("Conv", {"x": x}, {"w": wt, "b": b}, rtol=RTOL, atol=ATOL, group=groups, strides=[stride, stride],
               dilations=[dilation, dilation], pads=[pad, pad, pad, pad])


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_auto_pad(auto_pad, stride):
    rng = np.random.default_rng(0)
    check_node("Conv", {"x": rng.standard_normal((1, 2, 7, 6)).astype(np.float32)},
               {"w": rng.standard_normal((3, 2, 3, 2)).astype(np.float32)}, rtol=RTOL, atol=ATOL,
               auto_pad=auto_pad, strides=[stride, stride])


@pytest.mark.parametrize("nd", [1, 3])
def test_conv_1d_and_3d(nd):
    rng = np.random.default_rng(nd)
    x = rng.standard_normal((1, 2) + (6,) * nd).astype(np.float32)
    check_node("Conv", {"x": x}, {"w": rng.standard_normal((4, 2) + (3,) * nd).astype(np.float32)}, rtol=RTOL,
               atol=ATOL, pads=[1] * (2 * nd))


@settings(max_examples=25, deadline=None)
@given(h=st.integers(2, 9), w=st.integers(2, 9), k=st.integers(1, 3), stride=st.integers(1, 3), pad=st.integers(0, 1),
       ceil=st.booleans(), op=st.sampled_from(["MaxPool", "AveragePool"]), include_pad=st.booleans())
def test_pool2d_matches_onnx(h, w, k, stride, pad, ceil, op, include_pad):
    if pad >= k or h + 2 * pad < k or w + 2 * pad < k:
        return
    x = np.random.default_rng(h * w).standard_normal((1, 3, h, w)).astype(np.float32)
    extra = {"count_include_pad": int(include_pad)} if op == "AveragePool" else {}
    # onnx's reference evaluator averages ceil-mode tails wrongly; ONNX Runtime is the oracle here
    check_node(op, {"x": x}, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, ceil_mode=int(ceil),
               rtol=RTOL, atol=ATOL, oracle="onnxruntime", **extra)


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm(trans_a, trans_b):
    rng = np.random.default_rng(trans_a * 2 + trans_b)
    a = rng.standard_normal((5, 7) if not trans_a else (7, 5)).astype(np.float32)
    b = rng.standard_normal((7, 3) if not trans_b else (3, 7)).astype(np.float32)
    c = rng.standard_normal((3,)).astype(np.float32)
    check_node("Gemm", {"a": a}, {"b": b, "c": c}, transA=trans_a, transB=trans_b, alpha=0.5, beta=2.0,
               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("a_shape,b_shape", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (5, 4, 2)),
                                             ((4,), (4, 3)), ((2, 3, 4), (4,))])
def test_matmul_broadcasting(a_shape, b_shape):
    rng = np.random.default_rng(len(a_shape))
    check_node("MatMul", {"a": rng.standard_normal(a_shape).astype(np.float32),
                          "b": rng.standard_normal(b_shape).astype(np.float32)}, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax(axis, op):
    x = np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32) * 5
    check_node(op, {"x": x}, axis=axis, rtol=RTOL, atol=ATOL)


def test_batch_norm_layer_norm_lrn():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    params = {k: rng.random(4).astype(np.float32) + 0.5 for k in ("s", "b", "m", "v")}
    check_node("BatchNormalization", {"x": x}, params, epsilon=1e-3, rtol=RTOL, atol=ATOL)
    check_node("LayerNormalization", {"x": x}, {"s": rng.random((5, 5)).astype(np.float32),
                                                "b": rng.random((5, 5)).astype(np.float32)}, axis=-2, rtol=RTOL,
               atol=ATOL)
    check_node("LRN", {"x": x}, size=3, alpha=1e-3, beta=0.75, bias=2.0, rtol=RTOL, atol=ATOL, oracle="onnxruntime")


def test_type_errors_name_the_problem():
    with pytest.raises(TypeCheckError, match="groups"):
        call(CONV2D, var("x", "f32[1, 4, 8, 8]"), var("w", "f32[6, 4, 3, 3]"), strides=(1, 1), padding=(0,) * 4,
             dilation=(1, 1), groups=4)
    with pytest.raises(TypeCheckError, match=r"w must be \[units, 8\]"):
        call(DENSE, var("x", "f32[2, 8]"), var("w", "f32[3, 7]"))
