"""Post-training int8 quantization (passes/quantize.py, kiln/calibrate.py): which tensors are calibrated, the
QDQ graph the pass writes, the range methods, the sample files, and a calibrated model compiled to int8
against the float32 model and against its own QDQ graph run by the NumPy interpreter."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.calibrate import (
    CalibrationTable, agreement, calibrate, entropy_threshold, load_samples, quantized_reference,
)
from kiln.config import Options
from kiln.errors import InputError, KilnError
from kiln.frontend import from_onnx
from kiln.ir import Call, Var, run_module
from kiln.ir.ops.conv import CONV2D
from kiln.ir.ops.elementwise import DEQUANTIZE, QUANTIZE
from kiln.ir.types import TensorType
from kiln.ir.visitor import post_order
from kiln.model_builders import GraphBuilder
from kiln.passes import LEVELS, run
from kiln.passes.quantize import activation_qparams, calibration_points, int8_per_channel, quantize
from kiln.passes.realize_qdq import int8_weights

from .test_realize_qdq import HOST_VNNI, VNNI

rng = np.random.default_rng(11)


def residual_net(seed: int = 0) -> onnx.ModelProto:
    """An RGB stem, a 3x3 conv, a depthwise conv after a ReLU, a 1x1 projection added to its block's input,
    and a Gemm classifier: every kind of point, and one tensor read by two convs' block."""
    g = GraphBuilder("residual_net", seed)
    x = g.conv_bn("data", 3, 16, 3)
    y = g.conv_bn(x, 16, 16, 3)
    y = g.conv_bn(y, 16, 16, 3, groups=16)
    y = g.conv_bn(y, 16, 16, 1, act=None)
    x = g.op("Relu", [g.op("Add", [x, y])])
    x = g.conv_bn(x, 16, 32, 1)
    return g.model([helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 12, 12])],
                   [(g.classifier(x, 32, 12), TensorProto.FLOAT, [1, 12])])


def graph_at_quantize(model, target: str = VNNI):
    from kiln.codegen.target import resolve_target
    from kiln.driver import prepare

    mod = prepare(from_onnx(model), resolve_target(target), Options(target=target))
    return run(mod, LEVELS[2][:LEVELS[2].index(quantize)])


def test_points_name_each_consumer_and_pad_the_rgb_stem():
    graph = graph_at_quantize(residual_net())
    points = calibration_points(graph)
    assert [p.kind for p in points] == ["padded", "conv", "depthwise", "conv", "conv", "dense"]
    assert len({p.key for p in points}) == len(points)
    table = {p.key: (-2.0, 3.0) for p in points}
    stem = next(e for e in post_order(quantize(graph.with_attrs(calibration=table)).main.body)
                if isinstance(e, Call) and e.op is CONV2D)
    x, w = stem.args  # 3 channels of bytes and one of the zero point, against a channel of zero weights
    assert x.op is DEQUANTIZE and x.args[0].op_name == "pad" and x.ttype.shape[1] == 4
    assert x.args[0].attrs.value == int(activation_qparams(-2.0, 3.0)[1])
    assert w.value.shape[1] == 4 and not w.value[:, 3].any()


def test_pass_writes_one_pair_per_tensor_and_int8_weights():
    graph = graph_at_quantize(residual_net())
    points = calibration_points(graph)
    table = {p.key: (-1.0 if p.kind == "depthwise" else 0.0, 4.0) for p in points}
    out = quantize(graph.with_attrs(calibration=table))
    qs = [e for e in post_order(out.main.body) if isinstance(e, Call) and e.op is QUANTIZE]
    assert len(qs) == len(points) - 1  # the depthwise saw a negative value: a zero point would buy nothing
    for p in calibration_points(out):
        x, w = p.consumer.args
        if p.kind == "depthwise":
            assert not (isinstance(x, Call) and x.op is DEQUANTIZE)
            continue
        assert isinstance(x, Call) and x.op is DEQUANTIZE
        assert int8_weights(w.value) is not None  # what realize_qdq recovers the integer weights from
    # the block's input, read by its first conv and by its add: the add reads the same pair
    add = next(e for e in post_order(out.main.body) if isinstance(e, Call) and e.op_name == "add"
               and any(isinstance(a, Call) and a.op is DEQUANTIZE for a in e.args))
    assert len([e for e in post_order(out.main.body) if isinstance(e, Call) and e.op is QUANTIZE]) == len(qs)
    assert add is not None
    assert quantize(graph) is graph  # no table: no change
    unknown = graph.with_attrs(calibration={"nothing": (0.0, 1.0)})
    assert quantize(unknown) is unknown


def test_qparams_hold_zero_and_weights_round_per_channel():
    for lo, hi in [(0.0, 6.0), (-1.5, 3.2), (0.5, 2.0), (-4.0, -1.0)]:
        s, z = activation_qparams(lo, hi)
        # codes 0..255 span [lo, hi] widened to hold 0, to half a step (the zero point is rounded to a code)
        assert (0 - int(z)) * s <= min(lo, 0) + s / 2 and (255 - int(z)) * s >= max(hi, 0) - s / 2
    assert activation_qparams(0.0, 0.0) == (np.float32(1.0), np.uint8(0))
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    w[2] = 0
    wq = int8_per_channel(w)
    step = np.abs(w).reshape(6, -1).max(axis=1) / 127
    err = np.abs(wq - w).reshape(6, -1).max(axis=1)
    assert (err <= step / 2 + 1e-7).all() and not wq[2].any()


def test_entropy_clips_a_thin_tail_and_keeps_a_full_range():
    flat = np.full(2048, 100)
    assert entropy_threshold(flat, 255) == 2048
    tail = np.zeros(2048, np.int64)
    tail[:200] = rng.integers(1000, 2000, 200)
    tail[2000] = 1  # one outlier far out
    assert 200 <= entropy_threshold(tail, 255) < 1000


def test_samples_from_npy_npz_and_folders(tmp_path):
    mod = from_onnx(residual_net())
    params = mod.main.params
    x = rng.standard_normal((5, 3, 12, 12)).astype(np.float32)
    np.save(tmp_path / "batch.npy", x)  # along the batch axis of a batch-1 model
    assert [s[0].shape for s in load_samples(tmp_path / "batch.npy", params)] == [(1, 3, 12, 12)] * 5
    np.save(tmp_path / "stack.npy", x[:, None].astype(np.float64))  # a new first axis; float64 converted
    got = load_samples(tmp_path / "stack.npy", params)
    assert len(got) == 5 and got[3][0].dtype == np.float32 and np.array_equal(got[3][0][0], x[3])
    np.savez(tmp_path / "named.npz", data=x[:2])
    assert len(load_samples(tmp_path / "named.npz", params)) == 2
    folder = tmp_path / "dir"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"{i}.npy", x[i:i + 1])
    assert len(load_samples(folder, params)) == 3
    batch2 = residual_net()
    for v in (batch2.graph.input[0], batch2.graph.output[0]):
        v.type.tensor_type.shape.dim[0].dim_value = 2
    two = from_onnx(batch2).main.params
    np.save(tmp_path / "four.npy", x[:4])
    assert [s[0].shape for s in load_samples(tmp_path / "four.npy", two)] == [(2, 3, 12, 12)] * 2
    with pytest.raises(InputError, match="in batches of the model's"):
        load_samples(tmp_path / "batch.npy", two)  # 5 rows do not split in twos
    np.save(tmp_path / "bad.npy", x[:, :2])
    with pytest.raises(InputError, match="input 'data' has shape"):
        load_samples(tmp_path / "bad.npy", params)
    np.savez(tmp_path / "wrong.npz", image=x)
    with pytest.raises(InputError, match=r"no array for input\(s\) \['data'\]"):
        load_samples(tmp_path / "wrong.npz", params)
    np.save(tmp_path / "ints.npy", x.astype(np.int32))
    with pytest.raises(InputError, match="expects float32"):
        load_samples(tmp_path / "ints.npy", params)


def test_int8_precision_needs_a_calibration():
    with pytest.raises(KilnError, match="needs a calibration"):
        Options(precision="int8")
    with pytest.raises(KilnError, match="opt level 2"):
        Options(precision="int8", calibration={}, opt_level=1)


@pytest.mark.parametrize("method, target", [("percentile", VNNI), ("minmax", VNNI), ("entropy", VNNI),
                                            ("percentile", "x86-avx2")])
def test_calibrated_int8_model_follows_its_qdq_graph_and_the_float_model(tmp_path, method, target):
    """The artifact computes the quantized graph the pass wrote (the interpreter's numbers, to a code of
    rounding where the int32 sum and the float one land on different sides of a .5) and stays near float32.
    On AVX2 (no VNNI) the kernels are vpmaddubsw's, with 7-bit weights."""
    if target == VNNI and not HOST_VNNI:
        pytest.skip("this host has no AVX-512 VNNI to run the kernels on")
    model = residual_net()
    samples = [[rng.standard_normal((1, 3, 12, 12)).astype(np.float32)] for _ in range(6)]
    cal = calibrate(model, samples, Options(target=target), method=method)
    assert cal.table.samples == 6 and len(cal.table) == 6
    lo, hi = cal.table.observed[next(iter(cal.table))]
    assert np.isfinite([lo, hi]).all()
    path = tmp_path / "t.json"
    table = CalibrationTable.load(cal.table.save(path))
    assert table.ranges == cal.table.ranges and table.method == method
    options = Options(target=target, precision="int8", calibration=table)
    report = kiln.compile(model, tmp_path / "q.so", options)
    assert sum("qnn.conv2d_nchwc" in s["ops"] for s in report.steps) == 4
    assert sum("qnn.dense_packed" in s["ops"] for s in report.steps) == 1
    kinds = {"vnni" if "vnni" in s else "madd" for s in report.schedules if "vnni" in s or "madd" in s}
    assert kinds == {"vnni" if target == VNNI else "madd"}
    m = kiln.load(report.path)
    got = [m.run(*s) for s in samples]
    qdq = quantized_reference(model, table, Options(target=target))
    for s, g in zip(samples, got):
        want = run_module(qdq, *s)[0]
        np.testing.assert_allclose(g[0], want, rtol=0, atol=0.05 * np.abs(want).max())
    (a,) = agreement(["logits"], cal.outputs, got)
    assert a.sqnr_db > 30 and a.top1 == (6, 6)  # 43-44 dB by each method on VNNI, 41 with AVX2's 7-bit weights


def test_table_files_are_checked(tmp_path):
    (tmp_path / "x.json").write_text('{"ranges": {}}')
    with pytest.raises(KilnError, match="not a Kiln calibration table"):
        CalibrationTable.load(tmp_path / "x.json")
    with pytest.raises(KilnError, match="cannot read"):
        CalibrationTable.load(tmp_path / "missing.json")


def test_a_qdq_models_convs_are_not_quantized_twice():
    from .test_realize_qdq import qdq_conv_model

    graph = graph_at_quantize(qdq_conv_model(expose_y=False, gen=np.random.default_rng(0)))
    assert calibration_points(graph) == []
