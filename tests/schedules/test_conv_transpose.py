"""Transposed convolution: the gather compute against the NumPy reference over ranks, strides, pads,
output padding, dilation and groups; the x86 template at several configs; a 2x-upsampling ConvTranspose
compiled end to end on a pinned AVX2 target against ONNX Runtime."""

import random

import numpy as np
import onnx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kiln.codegen.target import resolve_target
from kiln.ir import Call
from kiln.ir.ops.conv import (
    CONV2D_TRANSPOSE,
    CONV_TRANSPOSE_BY_RANK,
    ConvTransposeAttrs,
    conv_transpose_reference,
)
from kiln.ir.ops.elementwise import ADD, RELU
from kiln.schedules.dispatch import task_of
from kiln.schedules.target_info import target_info
from kiln.schedules.workload import Group
from kiln.schedules.x86 import conv2d_transpose
from onnx import helper

import kiln

from ..groups import group, lower, op_group, params, run_lowered
from ..tolerances import assert_close

AVX2 = "x86-avx2"


@settings(max_examples=15, deadline=None)
@given(nd=st.sampled_from([1, 2, 2, 3]), groups=st.sampled_from([1, 2, 3]), cpg=st.integers(1, 3),
       opg=st.integers(1, 4), size=st.integers(1, 6), k=st.integers(1, 4), s=st.integers(1, 3),
       d=st.integers(1, 2), pad=st.integers(0, 2), out_pad=st.integers(0, 2), seed=st.integers(0, 10**6))
@example(nd=2, groups=1, cpg=4, opg=3, size=5, k=3, s=2, d=1, pad=1, out_pad=1, seed=0)
@example(nd=2, groups=2, cpg=2, opg=2, size=4, k=3, s=3, d=2, pad=2, out_pad=2, seed=1)
def test_conv_transpose_matches_reference(nd, groups, cpg, opg, size, k, s, d, pad, out_pad, seed):
    out_pad = min(out_pad, max(s, d) - 1)  # ONNX: output_padding < stride or dilation
    attrs = ConvTransposeAttrs((s,) * nd, (pad,) * nd + (max(pad - 1, 0),) * nd, (d,) * nd, (out_pad,) * nd, groups)
    full = s * (size - 1) + out_pad + (k - 1) * d + 1
    if full - pad - max(pad - 1, 0) < 1:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, groups * cpg) + (size,) * nd).astype(np.float32)
    w = rng.standard_normal((groups * cpg, opg) + (k,) * nd).astype(np.float32)
    target = resolve_target(AVX2)
    g = lower(op_group(CONV_TRANSPOSE_BY_RANK[nd], [x, w], attrs), target)
    assert_close(run_lowered(g, target, [x, w]), conv_transpose_reference(x, w, attrs), rtol=1e-4, atol=1e-4,
                 what=f"seed={seed} {attrs} schedule={g.schedule}")
    if nd == 2:  # the template, not the generic fallback
        assert g.template == conv2d_transpose.TEMPLATE.key and g.schedule.startswith("conv2d_transpose("), g.schedule


def bias_relu_group(x, w, attrs):
    """relu(conv_transpose(x, w) + b), b one value per output channel, as fuse_ops makes it."""
    out_channels = w.shape[1] * attrs.groups
    ps = params(x, w, ((1, out_channels, 1, 1), "float32"))
    return group(ps, Call(RELU, (Call(ADD, (Call(CONV2D_TRANSPOSE, tuple(ps[:2]), attrs), ps[2])),)))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("c,o,size,k,s,pad,out_pad,groups", [(5, 24, 7, 3, 2, 1, 1, 1), (4, 6, 5, 3, 3, 2, 2, 2),
                                                              (3, 7, 6, 4, 2, 1, 0, 1)])
def test_template_at_random_configs(c, o, size, k, s, pad, out_pad, groups, seed):
    attrs = ConvTransposeAttrs((s, s), (pad, 0, 0, pad), (1, 1), (out_pad, 0), groups)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, c, size, size + 1)).astype(np.float32)
    w = rng.standard_normal((c, o // groups, k, k)).astype(np.float32)
    fn = bias_relu_group(x, w, attrs)
    target = resolve_target(AVX2)
    template, wl = task_of(fn, target)
    assert template is conv2d_transpose.TEMPLATE
    cfg = template.space(wl, target_info(target)).sample(random.Random(seed))
    g = lower(fn, target, {wl.key: cfg})
    assert g.config_source == "given" and g.config == cfg
    b = rng.standard_normal((1, o, 1, 1)).astype(np.float32)
    want = np.maximum(conv_transpose_reference(x, w, attrs) + b, 0)
    assert_close(run_lowered(g, target, [x, w, b]), want, rtol=1e-4, atol=1e-4, what=f"seed={seed} {cfg}")


@pytest.mark.parametrize("target_name,lanes", [("x86-avx512", 16), ("x86-avx2", 8)])
def test_workload_space_and_default(target_name, lanes):
    info = target_info(resolve_target(target_name))
    for oc, ow in [(32, 56), (3, 13), (512, 7), (7, 1)]:
        attrs = ConvTransposeAttrs((1, 1), (0,) * 4, (1, 1), (0, 0))
        fn = op_group(CONV2D_TRANSPOSE, [((1, 4, 5, ow), "float32"), ((4, oc, 1, 1), "float32")], attrs)
        wl = conv2d_transpose.TEMPLATE.workload(Group(fn), info)
        assert (wl["lanes"], wl["out_channels"], wl["out_w"]) == (lanes, oc, ow)
        cfg = conv2d_transpose.default(wl, info)
        assert cfg in conv2d_transpose.space(wl, info)
        # the widest channel tile of at most two vectors, then as many columns as leave ≤ 12 accumulators
        assert cfg["tile_oc"] == max(d for d in range(1, min(oc, 2 * lanes) + 1) if oc % d == 0)
        vectors = -(-cfg["tile_oc"] // lanes)
        assert cfg["tile_ow"] == max(d for d in range(1, min(ow, 12 // vectors) + 1) if ow % d == 0)


def test_claims_only_2d_transposed_convs():
    attrs1 = ConvTransposeAttrs((2,), (0, 0), (1,), (0,))
    fn = op_group(CONV_TRANSPOSE_BY_RANK[1], [((1, 3, 5), "float32"), ((3, 4, 3), "float32")], attrs1)
    assert not conv2d_transpose.applies(Group(fn))
    x, w = np.zeros((1, 3, 5, 5), np.float32), np.zeros((3, 4, 3, 3), np.float32)
    assert conv2d_transpose.applies(Group(bias_relu_group(x, w, ConvTransposeAttrs((2, 2), (0,) * 4, (1, 1), (0, 0)))))


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
