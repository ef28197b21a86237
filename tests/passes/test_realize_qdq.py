"""QDQ convs on their integers (passes/realize_qdq.py, ir/ops/qconv.py, schedules/x86/qconv2d_nchwc.py): the
int8 weights recovered from the folded float ones, the rewrite's arithmetic against float64, the blocked
kernel against its reference, and compiled models against ONNX Runtime on a host with AVX-512 VNNI."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.codegen.target import required_cpu_features, resolve_target
from kiln.frontend import from_onnx
from kiln.ir import run_module
from kiln.ir.ops.blocked import block_array
from kiln.ir.ops.conv import ConvAttrs, conv_reference
from kiln.ir.ops.qconv import (
    QCONV2D_NCHWC, QConvAttrs, QConvNCHWcAttrs, _qconv_reference, pack_qconv_weight, unpack_qconv_weight,
)
from kiln.passes.realize_qdq import int8_weights

from ..frontend.unrolled import make_model, tensor

VNNI = "x86-avx512-vnni"
HOST_VNNI = "avx512vnni" in required_cpu_features(resolve_target("native"))
needs_vnni = pytest.mark.skipif(not HOST_VNNI, reason="this host has no AVX-512 VNNI to run the kernels on")
rng = np.random.default_rng(7)


def test_int8_weights_found_per_tensor_and_per_channel_else_none():
    for shape in [(8, 4, 3, 3), (96, 16, 1, 1), (4, 200, 1, 1)]:
        q = rng.integers(-127, 128, shape).astype(np.int8)
        q[:2] //= 3  # channels far from the range's ends: a per-tensor scale leaves them there
        for scale in (np.full(shape[0], 0.0123), rng.uniform(0.001, 0.1, shape[0])):
            w = (q.astype(np.float32) * scale.astype(np.float32)[:, None, None, None]).astype(np.float32)
            wq, s = int8_weights(w)
            # any int8 grid that gives W back is as good as the one it was made on
            np.testing.assert_allclose(wq * s[:, None, None, None], w, rtol=1e-6, atol=0)
    q = rng.integers(-127, 128, (8, 4, 3, 3)).astype(np.int8)
    q[:, 0, 0, 0] = -128  # the range's other end
    q[:, 0, 0, 1] = 64  # and its positive peak half that: 128 steps would put it at 128
    wq, _ = int8_weights(q.astype(np.float32) * np.float32(0.5))
    np.testing.assert_array_equal(wq, q)
    assert int8_weights(rng.standard_normal((8, 4, 3, 3)).astype(np.float32)) is None  # a float model's
    assert int8_weights(np.zeros((4, 4, 1, 1), np.float32))[0].sum() == 0


def test_packed_weights_round_trip_and_blocked_reference_matches_plain():
    w = rng.integers(-128, 128, (32, 16, 3, 3)).astype(np.int8)
    np.testing.assert_array_equal(unpack_qconv_weight(pack_qconv_weight(w, 8, 16)), w)
    x = rng.integers(0, 256, (1, 16, 9, 9)).astype(np.uint8)
    conv = ConvAttrs((2, 2), (1, 1, 1, 1), (1, 1))
    plain = _qconv_reference(x, w, QConvAttrs(conv, 37))
    blocked = QCONV2D_NCHWC.reference(block_array(x, 8), pack_qconv_weight(w, 8, 16), QConvNCHWcAttrs(conv, 37, 16))
    np.testing.assert_array_equal(blocked, block_array(plain, 16))
    # the padding holds the zero point: centred, it is a zero-padded conv of x - zp
    centred = conv_reference(x.astype(np.int64) - 37, w.astype(np.int64), ConvAttrs((2, 2), (1, 1, 1, 1), (1, 1)))
    wsum = w.astype(np.int64).sum(axis=(1, 2, 3)).reshape(1, -1, 1, 1)
    np.testing.assert_array_equal(plain.astype(np.int64) - 37 * wsum, centred)


def qdq_conv_model(c=16, oc=32, k=3, stride=1, zp=131, per_channel=True, requantize=True, oc2=24, expose_y=True,
                   out_q=False, signed=False, clip=None, wmax=127, gen=None):
    """input → Q → DQ → Conv(DQ(int8 W)) + bias [→ Q → DQ] → Relu → Q → DQ → 1x1 Conv(DQ(int8 W2)) → output:
    ONNX Runtime's QDQ format, with a zero point that is not 0 and padding that must hold it. `gen`: another
    generator than this module's, for callers elsewhere, so the tests here see the same numbers in any order."""
    rng = gen or globals()["rng"]
    w = rng.integers(-wmax, wmax + 1, (oc, c, k, k)).astype(np.int8)
    ws = (rng.uniform(0.002, 0.01, oc) if per_channel else np.array(0.004)).astype(np.float32)
    w2 = rng.integers(-wmax, wmax + 1, (oc2, oc, 1, 1)).astype(np.int8)
    ws2 = rng.uniform(0.002, 0.01, oc2).astype(np.float32)
    inits = [numpy_helper.from_array(v, n) for n, v in [
        ("xs", np.float32(0.03)), ("xz", np.int8(zp) if signed else np.uint8(zp)), ("w", w), ("ws", ws), ("wz", np.zeros(ws.shape, np.int8)),
        ("b", rng.standard_normal(oc).astype(np.float32)), ("ys", np.float32(0.2)),
        ("yz", np.int8(-128) if signed else np.uint8(0)),
        ("w2", w2), ("ws2", ws2), ("wz2", np.zeros(oc2, np.int8))]]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["y"], pads=[k // 2] * 4, strides=[stride] * 2),
             helper.make_node("Relu", ["y"], ["r"]) if clip is None else
             helper.make_node("Clip", ["y", "lo", "hi"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "ys", "yz"], ["rq"]),
             helper.make_node("DequantizeLinear", ["rq", "ys", "yz"], ["rd"]),
             helper.make_node("DequantizeLinear", ["w2", "ws2", "wz2"], ["w2d"], axis=0),
             helper.make_node("Conv", ["rd", "w2d"], ["o" if out_q else "out"])]
    if clip is not None:
        inits += [numpy_helper.from_array(np.float32(v), n) for n, v in zip(("lo", "hi"), clip)]
    if out_q:  # the second conv requantized too, to uint8 around 100
        inits += [numpy_helper.from_array(np.float32(0.5), "os"), numpy_helper.from_array(np.uint8(100), "oz")]
        nodes += [helper.make_node("QuantizeLinear", ["o", "os", "oz"], ["oq"]),
                  helper.make_node("DequantizeLinear", ["oq", "os", "oz"], ["out"])]
    outputs = [tensor("out", None), tensor("y", None)]
    if not requantize:
        outputs = outputs[1:]
    elif not expose_y:
        outputs = outputs[:1]
    return make_model(nodes, [tensor("x", [1, c, 14, 14])], outputs, inits, opset=21)


def test_compiles_to_vnni_kernels_for_a_vnni_target(tmp_path):
    """Cross-compiled for a VNNI CPU (any build host): both convs take the int8 template."""
    report = kiln.compile(qdq_conv_model(), tmp_path / "m.so", kiln.Options(target=VNNI))
    templates = [s["template"] for s in report.steps]
    assert sum(t.startswith("x86.qconv2d_nchwc") for t in templates) == 2, templates
    plain = kiln.compile(qdq_conv_model(), tmp_path / "p.so", kiln.Options(target="x86-avx512"))
    assert not any(s["template"].startswith("x86.qconv2d") for s in plain.steps)  # no VNNI: float convs


def test_without_vnni_7_bit_weights_take_the_madd_kernels(tmp_path):
    """AVX2 (and AVX-512 without VNNI): vpmaddubsw's int16 pair sums are exact for |w| ≤ 64 only, so a model
    of 7-bit weights (ONNX Runtime's reduce_range, Kiln's own int8 on such targets) runs on integers and one of
    full-range weights stays float. The AVX2 build runs here (any x86 host has AVX2) and follows the
    interpreter of its QDQ graph to one output step."""
    model = qdq_conv_model(expose_y=False, out_q=True, wmax=63)  # reduce_range: [-64, 63]
    for target, lanes in (("x86-avx2", 8), ("x86-avx512", 16)):
        report = kiln.compile(model, tmp_path / f"{target}.so", kiln.Options(target=target))
        assert [s for s in report.schedules if "madd" in s] and not [s for s in report.schedules if "vnni" in s]
        assert sum(s["template"].startswith("x86.qconv2d_nchwc") for s in report.steps) == 2
        assert any(f"madd{lanes}" in s for s in report.schedules), report.schedules
    full = kiln.compile(qdq_conv_model(expose_y=False, out_q=True), tmp_path / "f.so", kiln.Options(target="x86-avx2"))
    assert not any(s["template"].startswith("x86.qconv2d") for s in full.steps)
    x = rng.standard_normal((1, 16, 14, 14)).astype(np.float32) * 2
    (out,) = kiln.load(tmp_path / "x86-avx2.so").run(x=x)
    (want,) = run_module(from_onnx(model), x=x)
    steps = np.abs(out - want) / 0.5
    assert steps.max() <= 1 and np.mean(steps > 0) < 0.01, (steps.max(), np.mean(steps > 0))


@needs_vnni
@pytest.mark.parametrize("zp,stride,per_channel", [(131, 1, True), (0, 2, True), (77, 1, False)])
def test_int8_conv_equals_the_float64_sum(tmp_path, zp, stride, per_channel):
    """The conv's float output `y` (before any rounding to int8) is the exact sum times the scales."""
    model = qdq_conv_model(zp=zp, stride=stride, per_channel=per_channel, requantize=False)
    x = rng.standard_normal((1, 16, 14, 14)).astype(np.float32) * 2
    m = kiln.load(kiln.compile(model, tmp_path / "m.so", kiln.Options(target=VNNI)).path)
    (y,) = m.run(x=x)
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    xq = np.clip(np.rint(x / init["xs"]) + zp, 0, 255)
    wd = init["w"].astype(np.float64) * init["ws"].astype(np.float64).reshape(-1, 1, 1, 1)
    want = conv_reference((xq - zp) * np.float64(init["xs"]), wd, ConvAttrs((stride,) * 2, (1,) * 4, (1, 1)))
    want += init["b"].reshape(1, -1, 1, 1)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@needs_vnni
def test_quantized_chain_matches_onnx_runtime(tmp_path):
    """Two realized convs with a requantization between them, against ONNX Runtime's own int8 kernels: one
    quantization step apart at most, where the exact value sits next to a .5."""
    model = qdq_conv_model()
    x = rng.standard_normal((1, 16, 14, 14)).astype(np.float32) * 2
    out, y = kiln.load(kiln.compile(model, tmp_path / "m.so", kiln.Options(target=VNNI)).path).run(x=x)
    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    want_out, want_y = ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})
    # ONNX Runtime rounds the float bias to int32 in steps of xs·ws (its QLinearConv): half a step apart at most
    np.testing.assert_allclose(y, want_y, rtol=0, atol=0.5 * 0.03 * 0.01 + 1e-5)
    interpreted = run_module(from_onnx(model), x=x)[0]  # the float path, rounding where ONNX does
    step = 0.2 * 0.01 * 24  # output scale bound: a flip of one requantized value moves `out` by ys·|w2|·ws2
    assert np.abs(out - interpreted).max() <= step
    assert np.abs(out - want_out).max() <= step


def test_requantization_folds_into_one_epilogue_op(tmp_path):
    """quantize(relu(conv · s + b)) of a conv whose sum nothing else reads becomes one qnn.requantize fused
    after the conv; an intermediate that is also a model output keeps the plain ops (no conv computed twice)."""
    report = kiln.compile(qdq_conv_model(expose_y=False, out_q=True), tmp_path / "m.so", kiln.Options(target=VNNI))
    fused = [s["ops"] for s in report.steps if "qnn.conv2d_nchwc" in s["ops"]]
    assert len(fused) == 2 and all("qnn.requantize" in ops for ops in fused), fused
    report = kiln.compile(qdq_conv_model(out_q=True), tmp_path / "y.so", kiln.Options(target=VNNI))
    fused = [s["ops"] for s in report.steps if "qnn.conv2d_nchwc" in s["ops"]]
    assert sum("qnn.requantize" in ops for ops in fused) == 1, fused  # the second conv only: y is an output


@pytest.mark.parametrize("clip", [(0.0, 6.0), (0.5, 4.0)])
def test_a_clip_before_the_quantize_bounds_the_requantization(tmp_path, clip):
    """A ReLU6 (a clip) between a conv and its quantize becomes the requantization's bounds, the quantized
    clip values: the kernel ends in one requantize, and its bytes are the interpreter's to one step."""
    model = qdq_conv_model(expose_y=False, clip=clip)
    report = kiln.compile(model, tmp_path / "m.so", kiln.Options(target=VNNI))
    first = next(s["ops"] for s in report.steps if "qnn.conv2d_nchwc" in s["ops"])
    assert first == ["qnn.conv2d_nchwc", "qnn.requantize"], first
    if not HOST_VNNI:
        return
    x = rng.standard_normal((1, 16, 14, 14)).astype(np.float32) * 2
    (out,) = kiln.load(report.path).run(x=x)
    (want,) = run_module(from_onnx(model), x=x)
    diff = np.abs(out - want)
    assert diff.max() <= 0.2 * 127 * 0.01 * 1.01 and np.mean(diff > 1e-4) < 0.01  # one step of 0.2, at most


@needs_vnni
def test_requantized_chain_matches_onnx_runtime_and_the_float_path(tmp_path):
    model = qdq_conv_model(expose_y=False, out_q=True, zp=90)
    x = rng.standard_normal((1, 16, 14, 14)).astype(np.float32) * 2
    (out,) = kiln.load(kiln.compile(model, tmp_path / "m.so", kiln.Options(target=VNNI)).path).run(x=x)
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    (interpreted,) = run_module(from_onnx(model), x=x)
    # seen: equal to the interpreter, and 4 of 4,704 values one step from ONNX Runtime (its own sum rounds
    # differently); a flip in the first requantization moves a second-conv value by at most 0.2 · 127 · 0.01
    for other in (want, interpreted):
        steps = np.abs(out - other) / 0.5
        assert steps.max() <= 1 and np.mean(steps > 0) < 0.01, (steps.max(), np.mean(steps > 0))


def qdq_matmul_model(k=32, n=48, zp=117):
    """input [2, 8, k] → Q → DQ → MatMul(DQ(int8 W [k, n], per-tensor)) → Add(bias) → output, and its
    requantization as a second output."""
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    inits = [numpy_helper.from_array(v, name) for name, v in [
        ("xs", np.float32(0.04)), ("xz", np.uint8(zp)), ("w", w), ("ws", np.float32(0.003)), ("wz", np.int8(0)),
        ("b", rng.standard_normal(n).astype(np.float32)), ("ys", np.float32(0.1)), ("yz", np.uint8(128))]]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
    return make_model(nodes, [tensor("x", [2, 8, k])], [tensor("y", None), tensor("out", None)], inits, opset=21)


def test_matmul_compiles_to_the_vnni_dense(tmp_path):
    report = kiln.compile(qdq_matmul_model(), tmp_path / "m.so", kiln.Options(target=VNNI))
    assert any(s["template"].startswith("x86.qdense_packed") for s in report.steps), report.steps


@needs_vnni
def test_int8_matmul_equals_the_float64_sum_and_onnx_runtime(tmp_path):
    model = qdq_matmul_model()
    x = rng.standard_normal((2, 8, 32)).astype(np.float32) * 2
    y, out = kiln.load(kiln.compile(model, tmp_path / "m.so", kiln.Options(target=VNNI)).path).run(x=x)
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    xq = np.clip(np.rint(x / init["xs"]) + 117, 0, 255)
    want = ((xq - 117) * np.float64(init["xs"])) @ (init["w"] * np.float64(init["ws"])) + init["b"]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    want_y, want_out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})
    np.testing.assert_allclose(y, want_y, rtol=0, atol=0.5 * 0.04 * 0.003 + 1e-5)  # ORT's int32 bias rounding
    assert np.abs(out - want_out).max() <= 0.1 + 1e-6 and np.mean(out != want_out) < 0.02


@needs_vnni
def test_int8_tasks_tune_with_the_reference_check():
    """Every config of the int8 conv's and matmul's spaces builds and passes the tuner's reference check (the
    requantized uint8 output one step off on at most 1 in 1,000 values) on a VNNI host."""
    from kiln.autotune.builder import LocalBuilder, MeasureInput
    from kiln.autotune.runner import LocalRunner
    from kiln.driver import model_tasks

    tasks = [t for m in (qdq_conv_model(expose_y=False, out_q=True), qdq_matmul_model())
             for t in model_tasks(m, kiln.Options(target=VNNI))
             if t.template.name in ("x86.qconv2d_nchwc", "x86.qdense_packed")]
    assert {t.template.name for t in tasks} == {"x86.qconv2d_nchwc", "x86.qdense_packed"}
    inputs = [MeasureInput(t, cfg, check=True) for t in tasks for cfg in list(t.space())[::2]]
    with LocalBuilder(workers=2) as builder:
        builds = builder.build(inputs)
        assert [b.error for b in builds] == [None] * len(inputs)
        results = LocalRunner(repeat=2, timeout_s=30).run(inputs, builds)
    assert [r.error for r in results] == [None] * len(inputs), [(i.config, r.error) for i, r in zip(inputs, results)
                                                                if r.error]


@needs_vnni
@pytest.mark.parametrize("zp", [0, -7])
def test_int8_activations_run_as_uint8(tmp_path, zp):
    """Signed (int8) activation pairs become uint8 ones with zero point + 128: the same values, the VNNI
    kernels, the same output as the float path of Kiln's interpreter."""
    model = qdq_conv_model(zp=zp, signed=True, expose_y=False, out_q=True)
    report = kiln.compile(model, tmp_path / "m.so", kiln.Options(target=VNNI))
    assert sum("qnn.conv2d_nchwc" in s["ops"] for s in report.steps) == 2, [s["ops"] for s in report.steps]
    x = rng.standard_normal((1, 16, 14, 14)).astype(np.float32) * 2
    (out,) = kiln.load(report.path).run(x=x)
    (interpreted,) = run_module(from_onnx(model), x=x)
    steps = np.abs(out - interpreted) / 0.5
    assert steps.max() <= 1 and np.mean(steps > 0) < 0.01


@needs_vnni
def test_dynamic_quantization_runs_matmul_integer_on_vnni(tmp_path):
    """ONNX Runtime's `quantize_dynamic` (DynamicQuantizeLinear, whose zero point is computed at run time, then
    MatMulInteger): the int8 dense with the run-time zero point's correction, equal to the int32 path."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    w1 = rng.standard_normal((64, 128)).astype(np.float32) * 0.1
    w2 = rng.standard_normal((128, 32)).astype(np.float32) * 0.1
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    model = make_model(nodes, [tensor("x", [4, 16, 64])], [tensor("y", None)],
                       [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")], opset=17)
    import onnx
    onnx.save(model, tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    q = onnx.load(tmp_path / "q.onnx")
    report = kiln.compile(q, tmp_path / "m.so", kiln.Options(target=VNNI))
    assert sum(s["template"].startswith("x86.qdense_packed") for s in report.steps) == 2
    x = rng.standard_normal((4, 16, 64)).astype(np.float32)
    (got,) = kiln.load(report.path).run(x=x)
    (interpreted,) = run_module(from_onnx(q), x=x)  # the int32 path, as the spec computes it
    (want,) = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got, interpreted, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-3)


@needs_vnni
def test_depthwise_conv_reads_the_bytes_of_a_zero_point_0_activation(tmp_path):
    """A depthwise conv stays float, but of a zero-point-0 dequantize it reads the uint8 tensor with the scale in
    its weights: the quantize before it ends the producer's kernel, with a quarter of the bytes."""
    c = 32
    w = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(v, n) for n, v in [("xs", np.float32(0.05)), ("xz", np.uint8(0)), ("w", w),
                                                        ("b", rng.standard_normal(c).astype(np.float32))]]
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("Conv", ["xd", "w", "b"], ["y"], pads=[1] * 4, group=c)]
    model = make_model(nodes, [tensor("x", [1, c, 15, 15])], [tensor("y", None)], inits, opset=21)
    report = kiln.compile(model, tmp_path / "m.so", kiln.Options(target=VNNI))
    conv = [s for s in report.steps if "nn.conv2d_nchwc" in s["ops"]]
    assert len(conv) == 1 and "qnn.dequantize" not in conv[0]["ops"], [s["ops"] for s in report.steps]
    x = rng.standard_normal((1, c, 15, 15)).astype(np.float32) * 3
    (y,) = kiln.load(report.path).run(x=x)
    xq = np.clip(np.rint(np.maximum(x, 0) / np.float32(0.05)), 0, 255) * 0.05
    want = conv_reference(xq, w.astype(np.float64), ConvAttrs((1, 1), (1, 1, 1, 1), (1, 1), c))
    want += numpy_helper.to_array(inits[3]).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["x86-avx2", "aarch64-dotprod"])
def test_matmul_integer_of_7_bit_weights_without_vnni(tmp_path, target):
    """`quantize_dynamic(..., reduce_range=True)`: on AVX2 the 7-bit MatMulInteger takes the madd dense and
    equals the int32 path; on sdot, which multiplies int8 bytes, its uint8 operand keeps the int32 path (it
    had reached the int8 template and failed to compile)."""
    import shutil

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if target.startswith("aarch64") and shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64-linux-gnu-gcc not installed")
    gen = np.random.default_rng(4)
    w = gen.standard_normal((64, 128)).astype(np.float32) * 0.1
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", [4, 16, 64])],
                       [tensor("y", None)], [numpy_helper.from_array(w, "w")], opset=17)
    onnx.save(model, tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8,
                     reduce_range=True)
    q = onnx.load(tmp_path / "q.onnx")
    report = kiln.compile(q, tmp_path / "m.so", kiln.Options(target=target))
    dense = [s["template"] for s in report.steps if "dense" in s["template"]]
    assert dense == (["x86.qdense_packed@1"] if target == "x86-avx2" else ["x86.dense_packed@2"]), dense
    if target == "x86-avx2":
        x = gen.standard_normal((4, 16, 64)).astype(np.float32)
        np.testing.assert_array_equal(kiln.load(report.path).run(x=x)[0], run_module(from_onnx(q), x=x)[0])


def test_a_failing_int8_template_falls_back_to_the_generic_schedule(tmp_path, monkeypatch):
    """A template that raises costs speed, not the compile: the generic schedule gets a workload of its own
    (it had been handed the int8 template's, without the `lanes` it reads, and the compile failed)."""
    from kiln.errors import TemplateFallbackWarning
    from kiln.schedules.x86 import qdense_packed

    def broken(sch, wl, cfg):
        raise RuntimeError("injected")

    monkeypatch.setitem(qdense_packed.TEMPLATE.__dict__, "schedule", broken)
    with pytest.warns(TemplateFallbackWarning, match="injected"):
        report = kiln.compile(qdq_matmul_model(), tmp_path / "m.so", kiln.Options(target=VNNI))
    assert any(str(s["config_source"]).startswith("fallback: RuntimeError: injected") for s in report.steps)


def test_modules_of_two_kinds_realized_in_two_threads_keep_their_own_kind():
    """The kind of integer kernel travels with each rewrite: with it in a module global, a server building a VNNI
    and an AVX2 model at once realized one with the other's weight limit (or, with sdot, its byte type)."""
    import threading

    from kiln.ir.ops.qconv import QCONV2D
    from kiln.ir.visitor import post_order
    from kiln.passes.realize_qdq import realize_qdq

    mod = from_onnx(qdq_conv_model(expose_y=False, out_q=True))  # full-range weights: vnni only, not madd
    want = {"vnni": 2, "madd": 0}
    seen: dict[str, set[int]] = {k: set() for k in want}
    start = threading.Barrier(len(want))

    def realize(kind: str) -> None:
        start.wait()
        for _ in range(15):
            out = realize_qdq(mod.with_attrs(int8_dot=kind))
            seen[kind].add(sum(1 for n in post_order(out.main.body) if getattr(n, "op", None) is QCONV2D))

    threads = [threading.Thread(target=realize, args=(k,)) for k in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {k: {n} for k, n in want.items()}
