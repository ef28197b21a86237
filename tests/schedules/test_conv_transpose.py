"""Transposed convolution: the gather compute against the NumPy reference over ranks, strides, pads,
output padding, dilation and groups; the x86 template at several configs; a 2x-upsampling ConvTranspose
compiled end to end on a pinned AVX2 target against ONNX Runtime."""

import numpy as np
import onnx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kiln.codegen.target import resolve_target
from kiln.ir.ops.conv import CONV_TRANSPOSE_BY_RANK, ConvTransposeAttrs, conv_transpose_reference
from kiln.schedules.default import schedule_group
from onnx import helper

import kiln

from ..tolerances import assert_close

AVX2 = "x86-avx2"


def _run(prim, args, out_shape):
    import tvm

    f = tvm.compile(tvm.IRModule({"main": prim}), target=resolve_target(AVX2))
    y = tvm.runtime.empty(out_shape, "float32")
    f(*[tvm.runtime.tensor(a) for a in args], y)
    return y.numpy()


@settings(max_examples=15, deadline=None)
@given(nd=st.sampled_from([1, 2, 2, 3]), groups=st.sampled_from([1, 2, 3]), cpg=st.integers(1, 3),
       opg=st.integers(1, 4), size=st.integers(1, 6), k=st.integers(1, 4), s=st.integers(1, 3),
       d=st.integers(1, 2), pad=st.integers(0, 2), out_pad=st.integers(0, 2), seed=st.integers(0, 10**6))
@example(nd=2, groups=1, cpg=4, opg=3, size=5, k=3, s=2, d=1, pad=1, out_pad=1, seed=0)
@example(nd=2, groups=2, cpg=2, opg=2, size=4, k=3, s=3, d=2, pad=2, out_pad=2, seed=1)
def test_conv_transpose_matches_reference(nd, groups, cpg, opg, size, k, s, d, pad, out_pad, seed):
    from tvm import te

    out_pad = min(out_pad, max(s, d) - 1)  # ONNX: output_padding < stride or dilation
    attrs = ConvTransposeAttrs((s,) * nd, (pad,) * nd + (max(pad - 1, 0),) * nd, (d,) * nd, (out_pad,) * nd, groups)
    full = s * (size - 1) + out_pad + (k - 1) * d + 1
    if full - pad - max(pad - 1, 0) < 1:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, groups * cpg) + (size,) * nd).astype(np.float32)
    w = rng.standard_normal((groups * cpg, opg) + (k,) * nd).astype(np.float32)
    op = CONV_TRANSPOSE_BY_RANK[nd]
    X, W = te.placeholder(x.shape, name="x"), te.placeholder(w.shape, name="w")
    out = op.compute(X, W, attrs)
    prim, how = schedule_group(te.create_prim_func([X, W, out]), resolve_target(AVX2), (op.name, attrs))
    got = _run(prim, [x, w], [int(v) for v in out.shape])
    assert_close(got, conv_transpose_reference(x, w, attrs), rtol=1e-4, atol=1e-4,
                 what=f"seed={seed} {attrs} schedule={how}")
    if nd == 2:
        assert how.startswith("conv2d_transpose("), how  # the template, not the generic fallback


@pytest.mark.parametrize("tile_oc,tile_ow", [(1, 1), (3, 7), (12, 2), (24, 14)])
def test_template_at_configs(tile_oc, tile_ow):
    from kiln.schedules.x86 import conv2d_transpose
    from tvm import s_tir, te

    attrs = ConvTransposeAttrs((2, 2), (1, 0, 0, 1), (1, 1), (1, 0), 1)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 5, 7, 7)).astype(np.float32)
    w = rng.standard_normal((5, 24, 3, 3)).astype(np.float32)  # out [1, 24, 15, 14]
    X, W = te.placeholder(x.shape, name="x"), te.placeholder(w.shape, name="w")
    out = CONV_TRANSPOSE_BY_RANK[2].compute(X, W, attrs)
    sch = s_tir.Schedule(te.create_prim_func([X, W, out]))
    cfg = conv2d_transpose.Config(tile_oc=tile_oc, tile_ow=tile_ow)
    assert tile_oc in conv2d_transpose.space(24, 14, 8)["tile_oc"]
    assert tile_ow in conv2d_transpose.space(24, 14, 8)["tile_ow"]
    conv2d_transpose.schedule(sch, cfg)
    assert_close(_run(sch.mod["main"], [x, w], [1, 24, 15, 14]), conv_transpose_reference(x, w, attrs),
                 rtol=1e-4, atol=1e-4, what=str(cfg))


def test_default_lies_in_the_space():
    from kiln.schedules.x86 import conv2d_transpose

    for oc, ow, lanes in [(32, 56, 8), (3, 13, 16), (512, 7, 16), (7, 1, 8)]:
        cfg, space = conv2d_transpose.default(oc, ow, lanes), conv2d_transpose.space(oc, ow, lanes)
        assert cfg.tile_oc in space["tile_oc"] and cfg.tile_ow in space["tile_ow"]


def upsampling_model(c_in=64, c_out=32, size=28, seed=0) -> tuple[onnx.ModelProto, np.ndarray]:
    """A 2x-upsampling decoder step: ConvTranspose(k=4, s=2, p=1) + bias + Relu."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((c_in, c_out, 4, 4)) * 0.1).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], kernel_shape=[4, 4], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y"], ["out"])]
    graph = helper.make_graph(nodes, "upsample", [helper.make_tensor_value_info("x", 1, [1, c_in, size, size])],
                              [helper.make_tensor_value_info("out", 1, [1, c_out, 2 * size, 2 * size])],
                              [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, rng.standard_normal((1, c_in, size, size)).astype(np.float32)


def test_upsampling_conv_transpose_matches_onnxruntime(tmp_path):
    import onnxruntime as ort

    model, x = upsampling_model()
    kiln.compile(model, tmp_path / "m.so", kiln.Options(target=AVX2))
    m = kiln.load(tmp_path / "m.so")
    schedules = [s.get("schedule", "") for s in m.meta["steps"]]
    assert any(s.startswith("conv2d_transpose(") for s in schedules), schedules
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert_close(m.run(x)[0], want[0], rtol=1e-4, atol=1e-4)
