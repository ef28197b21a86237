"""Compiled 1-D and 3-D convolutions (issue 12: ONNX's pytorch-converted Conv1d/Conv3d model tests). The direct
compute for nn.conv1d/nn.conv3d is checked against the op's reference through the default schedule for a pinned
x86 target, over groups, dilation, strides and asymmetric pads, and must be parallel and vectorized; whole
models (conv + bias + relu) are compared with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.ir.ops import conv as cv

tvm = pytest.importorskip("tvm")

RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def target():
    from kiln.codegen.target import resolve_target

    return resolve_target("x86-avx2")


def compile_conv(x, w, attrs, target):
    from tests.groups import lower, op_group, run_lowered

    g = lower(op_group(cv.CONV_BY_RANK[x.ndim - 2], [x, w], attrs), target)
    return run_lowered(g, target, [x, w]), g.schedule


CASES_1D = [  # (c, o, size, k, stride, pads, dilation, groups)
    (4, 6, 23, 3, 1, (0, 0), 1, 1),
    (4, 6, 23, 3, 2, (1, 2), 1, 1),
    (6, 9, 29, 5, 1, (2, 2), 2, 3),
    (8, 8, 17, 3, 3, (1, 0), 2, 8),  # depthwise
]
CASES_3D = [  # (c, o, (d, h, w), (kd, kh, kw), strides, pads, dilation, groups)
    (3, 5, (5, 7, 11), (3, 3, 3), (1, 1, 1), (0,) * 6, (1, 1, 1), 1),
    (4, 6, (6, 7, 9), (2, 3, 3), (2, 1, 2), (1, 0, 1, 0, 2, 1), (1, 2, 1), 2),
    (4, 4, (5, 5, 13), (1, 3, 3), (1, 2, 1), (0, 1, 1, 0, 1, 1), (1, 1, 2), 4),
]


@pytest.mark.parametrize("case", CASES_1D)
def test_conv1d_matches_reference(case, target):
    c, o, size, k, stride, pads, dil, g = case
    x = RNG.standard_normal((2, c, size)).astype(np.float32)
    w = RNG.standard_normal((o, c // g, k)).astype(np.float32)
    a = cv.ConvAttrs((stride,), pads, (dil,), g)
    got, how = compile_conv(x, w, a, target)
    np.testing.assert_allclose(got, cv.conv_reference(x, w, a), rtol=1e-4, atol=1e-5)
    assert "parallel" in how and "vectoriz" in how, how


@pytest.mark.parametrize("case", CASES_3D)
def test_conv3d_matches_reference(case, target):
    c, o, sp, ks, strides, pads, dil, g = case
    x = RNG.standard_normal((1, c) + sp).astype(np.float32)
    w = RNG.standard_normal((o, c // g) + ks).astype(np.float32)
    a = cv.ConvAttrs(strides, pads, dil, g)
    got, how = compile_conv(x, w, a, target)
    np.testing.assert_allclose(got, cv.conv_reference(x, w, a), rtol=1e-4, atol=1e-5)
    assert "parallel" in how and "vectoriz" in how, how


def _model(x_shape, w, b, strides, pads, dilations, group):
    nd = len(x_shape) - 2
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=list(strides), pads=list(pads),
                            dilations=list(dilations), group=group)
    relu = helper.make_node("Relu", ["c"], ["y"])
    graph = helper.make_graph(
        [conv, relu], f"conv{nd}d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("x_shape,w_shape,strides,pads,dilations,group", [
    ((2, 6, 31), (8, 3, 3), (2,), (1, 1), (1,), 2),
    ((1, 4, 6, 8, 10), (6, 2, 3, 3, 3), (1, 2, 1), (1, 1, 1, 1, 1, 1), (2, 1, 1), 2),
])
def test_models_match_onnxruntime(x_shape, w_shape, strides, pads, dilations, group, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import kiln
    from kiln.config import Options

    x = RNG.standard_normal(x_shape).astype(np.float32)
    w = RNG.standard_normal(w_shape).astype(np.float32)
    b = RNG.standard_normal(w_shape[0]).astype(np.float32)
    model = _model(x_shape, w, b, strides, pads, dilations, group)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = kiln.load(kiln.compile(model, tmp_path / "m.so", Options(target="x86-avx2")).path).run(x=x)
    np.testing.assert_allclose(np.asarray(got[0]), want[0], rtol=1e-4, atol=1e-4)
