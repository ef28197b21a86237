"""Quantized ONNX models: the integer and QOperator ops (MatMulInteger, ConvInteger, QLinearMatMul, QLinearConv),
QDQ chains (QuantizeLinear/DequantizeLinear pairs, as ONNX Runtime's quantizer writes them) and models quantized
by ONNX Runtime's own tools, interpreted and compiled, against ONNX Runtime and ONNX's reference evaluator."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.host import ort_int8_saturates
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import kiln
from kiln.frontend import from_onnx
from kiln.ir import run_module
from kiln.passes import O2, run
from kiln.passes.alter_layout import count_layout_transforms

from .unrolled import make_model, tensor

rng = np.random.default_rng(0)


def both(model, feeds, tmp_path):
    """Kiln's interpreter and a compiled artifact, each as a list of outputs."""
    interpreted = run_module(from_onnx(model), **feeds)
    compiled = kiln.load(kiln.compile(model, tmp_path / "m.so").path).run(**feeds)
    return interpreted, compiled


def assert_exact(model, feeds, tmp_path, want):
    for got in both(model, feeds, tmp_path):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def const(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def test_matmul_integer_with_per_row_and_per_column_zero_points(tmp_path):
    a = rng.integers(0, 256, (2, 5, 7), dtype=np.uint8)
    b = rng.integers(-128, 128, (7, 6), dtype=np.int8)
    az, bz = rng.integers(0, 256, 5, dtype=np.uint8), rng.integers(-128, 128, 6, dtype=np.int8)
    node = helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["y"])
    model = make_model([node], [tensor("a", [2, 5, 7], TensorProto.UINT8)], [tensor("y", [2, 5, 6], TensorProto.INT32)],
                       [const("b", b), const("az", az), const("bz", bz)], opset=21)
    # ONNX's reference evaluator cannot broadcast a per-row zero point; the spec's arithmetic, written out:
    want = (a.astype(np.int32) - az.astype(np.int32)[:, None]) @ (b.astype(np.int32) - bz.astype(np.int32))
    assert_exact(model, {"a": a}, tmp_path, [want])


@pytest.mark.parametrize("per_channel", [False, True])
def test_qlinear_conv_matches_onnx_runtime(tmp_path, per_channel):
    """Per-tensor and per-output-channel weight scales, an int32 bias, uint8 activations: as ONNX Runtime's
    QLinearConv kernel, at most one quantization step apart where a product lands next to a .5."""
    x = rng.integers(0, 256, (1, 8, 10, 10), dtype=np.uint8)
    # full-range weights where ONNX Runtime sums them exactly; 7-bit ones where its int16 pair sums saturate
    w = rng.integers(*((-64, 64) if ort_int8_saturates() else (-128, 128)), (16, 8, 3, 3), dtype=np.int8)
    w_scale = (rng.uniform(0.001, 0.01, 16) if per_channel else np.array(0.004)).astype(np.float32)
    inits = [const("xs", np.float32(0.02)), const("xz", np.uint8(128)), const("w", w), const("ws", w_scale),
             const("wz", np.zeros(16 if per_channel else (), np.int8)), const("ys", np.float32(0.05)),
             const("yz", np.uint8(100)), const("B", rng.integers(-500, 500, 16, dtype=np.int32))]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "B"], ["y"],
                            pads=[1, 1, 1, 1], strides=[2, 2])
    model = make_model([node], [tensor("x", [1, 8, 10, 10], TensorProto.UINT8)],
                       [tensor("y", [1, 16, 5, 5], TensorProto.UINT8)], inits, opset=21)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    exact = ReferenceEvaluator(model).run(None, {"x": x})[0]
    for got in both(model, {"x": x}, tmp_path):
        np.testing.assert_array_equal(got[0], exact)
        assert np.abs(got[0].astype(np.int32) - want.astype(np.int32)).max() <= 1


def test_qlinear_matmul_and_conv_integer(tmp_path):
    a = rng.integers(-128, 128, (4, 9), dtype=np.int8)
    inits = [const("as", np.float32(0.03)), const("az", np.int8(3)),
             const("b", rng.integers(-128, 128, (9, 5), np.int8)), const("bs", rng.uniform(0.001, 0.01, 5).astype(np.float32)), const("bz", np.zeros(5, np.int8)),
             const("ys", np.float32(0.01)), const("yz", np.int8(-4))]
    node = helper.make_node("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"])
    model = make_model([node], [tensor("a", [4, 9], TensorProto.INT8)], [tensor("y", [4, 5], TensorProto.INT8)],
                       inits, opset=21)
    assert_exact(model, {"a": a}, tmp_path, ReferenceEvaluator(model).run(None, {"a": a}))

    x = rng.integers(0, 256, (1, 3, 6, 6), dtype=np.uint8)
    node = helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], pads=[0, 0, 1, 1])
    model = make_model([node], [tensor("x", [1, 3, 6, 6], TensorProto.UINT8)], [tensor("y", None, TensorProto.INT32)],
                       [const("w", rng.integers(0, 256, (4, 3, 2, 2), np.uint8)), const("xz", np.uint8(7)),
                        const("wz", rng.integers(0, 256, 4, np.uint8))], opset=21)
    (tmp_path / "conv").mkdir()
    assert_exact(model, {"x": x}, tmp_path / "conv", ReferenceEvaluator(model).run(None, {"x": x}))


def _qdq(name, x, scale, zero):
    return [helper.make_node("QuantizeLinear", [x, scale, zero], [name + "_q"]),
            helper.make_node("DequantizeLinear", [name + "_q", scale, zero], [name])]


def test_qdq_chains_in_one_kernel_compile_and_match(tmp_path):
    """Q→DQ→Relu→Q→DQ fuses into one kernel; its two quantizes once made tvm.compile fail (a Let bound twice).
    Inputs include exact halves of a quantization step, where rounding half to even decides."""
    inits = [const("s1", np.float32(0.0676)), const("z1", np.uint8(123)), const("s2", np.float32(0.0645)),
             const("z2", np.uint8(131))]
    nodes = _qdq("a", "x", "s1", "z1") + [helper.make_node("Relu", ["a"], ["r"])] + _qdq("y", "r", "s2", "z2")
    model = make_model(nodes, [tensor("x", [1, 24, 8, 64])], [tensor("y", [1, 24, 8, 64])], inits, opset=21)
    x = (rng.standard_normal((1, 24, 8, 64)) * 5).astype(np.float32)
    x.flat[:200] = (np.arange(200) - 100 + 0.5).astype(np.float32) * np.float32(0.0676)  # ties
    assert_exact(model, {"x": x}, tmp_path, ReferenceEvaluator(model).run(None, {"x": x}))


def test_qdq_activations_stay_blocked_between_convs(tmp_path):
    """Per-tensor QDQ pairs between convs are elementwise in any layout: no transform back to NCHW between the
    convs, and each pair fuses into the conv before it."""
    w1 = (rng.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((32, 32, 1, 1)) * 0.1).astype(np.float32)
    inits = [const("w1", w1), const("w2", w2), const("s", np.float32(0.05)), const("z", np.uint8(128))]
    nodes = (_qdq("xq", "x", "s", "z") + [helper.make_node("Conv", ["xq", "w1"], ["c1"], pads=[1, 1, 1, 1])]
             + _qdq("c1q", "c1", "s", "z") + [helper.make_node("Relu", ["c1q"], ["r"])]
             + [helper.make_node("Conv", ["r", "w2"], ["c2"])] + _qdq("y", "c2", "s", "z"))
    model = make_model(nodes, [tensor("x", [1, 16, 14, 14])], [tensor("y", [1, 32, 14, 14])], inits, opset=21)
    assert count_layout_transforms(run(from_onnx(model), O2)) <= 2  # into NCHWc once, out once
    x = rng.standard_normal((1, 16, 14, 14)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = kiln.load(kiln.compile(model, tmp_path / "m.so").path).run(x)[0]
    # float32 convs summed in another order may put a value on the other side of a rounding boundary
    assert np.mean(got == want) > 0.99 and np.abs(got - want).max() <= 0.05 * 1.0001


def test_onnx_runtime_dynamic_quantization_imports(tmp_path):
    """A two-layer MLP through onnxruntime.quantization.quantize_dynamic: DynamicQuantizeLinear (inlined from its
    ONNX function) and MatMulInteger, as ONNX Runtime runs it."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    w1 = (rng.standard_normal((64, 128)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((128, 10)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    model = make_model(nodes, [tensor("x", [8, 64])], [tensor("y", [8, 10])], [const("w1", w1), const("w2", w2)],
                       opset=17)
    onnx.save(model, tmp_path / "f.onnx")
    quantization.quantize_dynamic(tmp_path / "f.onnx", tmp_path / "q.onnx", weight_type=quantization.QuantType.QInt8)
    q = onnx.load(tmp_path / "q.onnx")
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in q.graph.node}
    x = rng.standard_normal((8, 64)).astype(np.float32)
    want = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for got in both(q, {"x": x}, tmp_path):
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)
