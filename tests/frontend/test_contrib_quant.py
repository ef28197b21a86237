"""ONNX Runtime's quantized contrib ops (com.microsoft: QLinearAdd, QLinearMul, QLinearSigmoid, QLinearLeakyRelu,
QGemm, QLinearConcat, QLinearAveragePool, QLinearGlobalAveragePool), imported as dequantize → float op →
quantize (frontend/onnx/contrib_quant.py), against ONNX Runtime's own kernels: at most one quantization step
apart (ONNX Runtime folds scale ratios or works in fixed point for some)."""

import numpy as np
import onnxruntime as ort
import pytest

from tests.host import ort_int8_saturates
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.frontend import from_onnx
from kiln.ir import run_module

rng = np.random.default_rng(0)
U8 = TensorProto.UINT8


def c(name, v):
    return numpy_helper.from_array(np.asarray(v), name)


def model_of(node, inputs, out_shape, inits, out_type=U8):
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", out_type, out_shape)], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    return m


def assert_within_a_step(model, feeds, tmp_path):
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got_i = run_module(from_onnx(model), **feeds)[0]
    got_c = kiln.load(kiln.compile(model, tmp_path / "m.so").path).run(**feeds)[0]
    for got in (got_i, got_c):
        assert got.dtype == want.dtype and got.shape == want.shape
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        step = 1 if want.dtype == np.uint8 else 0.02 * max(1.0, float(np.abs(want).max()))
        assert diff.max() <= step, f"max diff {diff.max()}"


def xq(*shape):
    return rng.integers(0, 256, shape, dtype=np.uint8)


SCALES = [c("sa", np.float32(0.05)), c("za", np.uint8(120)), c("sb", np.float32(0.03)), c("zb", np.uint8(130)),
          c("sy", np.float32(0.07)), c("zy", np.uint8(125))]


@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
def test_binary(tmp_path, op):
    node = helper.make_node(op, ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"], domain="com.microsoft")
    vi = [helper.make_tensor_value_info(n, U8, [2, 8, 5, 5]) for n in "ab"]
    assert_within_a_step(model_of(node, vi, [2, 8, 5, 5], SCALES), {"a": xq(2, 8, 5, 5), "b": xq(2, 8, 5, 5)},
                         tmp_path)


@pytest.mark.parametrize("op,attrs", [("QLinearSigmoid", {}), ("QLinearLeakyRelu", {"alpha": 0.1}),
                                      ("QLinearGlobalAveragePool", {}),
                                      ("QLinearAveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                                              "strides": [2, 2]})])
def test_unary(tmp_path, op, attrs):
    node = helper.make_node(op, ["x", "sa", "za", "sy", "zy"], ["y"], domain="com.microsoft", **attrs)
    out = {"QLinearGlobalAveragePool": [1, 8, 1, 1], "QLinearAveragePool": [1, 8, 4, 4]}.get(op, [1, 8, 7, 7])
    inits = [SCALES[0], SCALES[1], SCALES[4], SCALES[5]]
    assert_within_a_step(model_of(node, [helper.make_tensor_value_info("x", U8, [1, 8, 7, 7])], out, inits),
                         {"x": xq(1, 8, 7, 7)}, tmp_path)


def test_concat(tmp_path):
    node = helper.make_node("QLinearConcat", ["sy", "zy", "a", "sa", "za", "b", "sb", "zb"], ["y"], axis=1,
                            domain="com.microsoft")
    vi = [helper.make_tensor_value_info("a", U8, [1, 3, 4]), helper.make_tensor_value_info("b", U8, [1, 5, 4])]
    assert_within_a_step(model_of(node, vi, [1, 8, 4], SCALES), {"a": xq(1, 3, 4), "b": xq(1, 5, 4)}, tmp_path)


@pytest.mark.parametrize("quantized_out", [True, False])
def test_qgemm_with_bias_and_per_column_weights(tmp_path, quantized_out):
    lo, hi = (-64, 64) if ort_int8_saturates() else (-127, 128)  # see tests/host.py
    w = rng.integers(lo, hi, (10, 16), dtype=np.int8)  # [N, K], transB
    inits = [SCALES[0], SCALES[1], c("w", w), c("sw", rng.uniform(0.002, 0.01, 10).astype(np.float32)),
             c("zw", np.zeros(10, np.int8)), c("bias", rng.integers(-2000, 2000, 10, dtype=np.int32))]
    names = ["a", "sa", "za", "w", "sw", "zw", "bias"]
    if quantized_out:
        inits += [SCALES[4], SCALES[5]]
        names += ["sy", "zy"]
    node = helper.make_node("QGemm", names, ["y"], domain="com.microsoft", transB=1, alpha=0.5)
    model = model_of(node, [helper.make_tensor_value_info("a", U8, [4, 16])], [4, 10], inits,
                     U8 if quantized_out else TensorProto.FLOAT)
    assert_within_a_step(model, {"a": xq(4, 16)}, tmp_path)


@pytest.mark.parametrize("fmt", ["QOperator", "QDQ"])
def test_onnx_runtime_static_quantization_of_a_mobilenet(tmp_path, fmt):
    """A MobileNetV2 (at 64x64) through onnxruntime.quantization.quantize_static in both formats: QOperator's
    QLinearConv, QLinearAdd and QGemm, or QDQ pairs. Same top class as ONNX Runtime, and logits within a few
    quantization steps (a value a rounding error apart crosses a step in one engine and not the other)."""
    import onnx
    from onnxruntime import quantization as q

    from kiln import model_builders

    model = model_builders.mobilenet_v2(size=64)
    onnx.save(model, tmp_path / "f.onnx")
    feeds = [model_builders.random_feeds(model, seed=s) for s in range(3)]

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    q.quantize_static(tmp_path / "f.onnx", tmp_path / "q.onnx", Reader(), quant_format=getattr(q.QuantFormat, fmt),
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                      reduce_range=ort_int8_saturates())  # 7-bit weights where ONNX Runtime's sums saturate
    qm = onnx.load(tmp_path / "q.onnx")
    if fmt == "QOperator":
        assert {"QLinearConv", "QLinearAdd"} <= {n.op_type for n in qm.graph.node}
    x = model_builders.random_feeds(model, seed=7)
    want = ort.InferenceSession(qm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = kiln.load(kiln.compile(qm, tmp_path / "q.so").path).run(**x)[0]
    assert np.argmax(got) == np.argmax(want)
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()


def test_microsoft_quantize_dequantize_16_bit(tmp_path):
    """ONNX Runtime's quantizer writes com.microsoft QuantizeLinear/DequantizeLinear for uint16 activations."""
    inits = [c("s", np.float32(0.001)), c("z", np.uint16(30000))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], domain="com.microsoft"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], domain="com.microsoft")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 50])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 50])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    x = (rng.standard_normal((4, 50)) * 20).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = kiln.load(kiln.compile(m, tmp_path / "m.so").path).run(x)[0]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(run_module(from_onnx(m), x=x)[0], want)
