"""The fused depthwise + 1x1 kernel (MobileNet's inverted residual) against the NumPy reference, over a sweep of
shapes; and the fusion rule: which depthwise convs join their 1x1 consumer and which stay alone."""

import numpy as np
import onnx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kiln.frontend import from_onnx
from kiln.ir.interpreter import run_module
from kiln.passes import O2, run
from kiln.passes.fuse_ops import group_ops
from onnx import TensorProto, helper

import kiln
from kiln.model_builders import GraphBuilder

from ..tolerances import assert_close


def block(c: int, co: int, h: int, w: int, k: int = 3, stride: int = 1, act: str | None = "relu6",
          residual: bool = False, expand: bool = True, seed: int = 0) -> onnx.ModelProto:
    """[1x1 expand →] depthwise kxk → 1x1 project [+ input]: the shapes of MobileNetV2's blocks."""
    g = GraphBuilder("dw_block", seed)
    x = g.conv_bn("x", c, c, 1, act="relu6") if expand else "x"
    y = g.conv_bn(x, c, c, k, stride, groups=c, act=act)
    y = g.conv_bn(y, c, co, 1, act=None)
    if residual:
        y = g.op("Add", ["x", y])
    oh, ow = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    return g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w])],
                   [(y, TensorProto.FLOAT, [1, co, oh, ow])])


def fused_groups(model: onnx.ModelProto, fuse: bool = True) -> list[list[str]]:
    mod = from_onnx(model).with_attrs(layout_block=16, fuse_depthwise=fuse)
    return group_ops(run(mod, O2))


def n_convs(ops: list[str]) -> int:
    return sum(op == "nn.conv2d_nchwc" for op in ops)


def test_depthwise_joins_the_1x1_conv_after_it():
    groups = fused_groups(block(32, 24, 20, 20))
    assert sorted(n_convs(g) for g in groups if n_convs(g)) == [1, 2]  # expand alone; dw + project together
    assert all(n_convs(g) <= 1 for g in fused_groups(block(32, 24, 20, 20), fuse=False))


@pytest.mark.parametrize("case", ["few_rows", "two_readers", "strided_1x1"])
def test_depthwise_stays_alone(case):
    if case == "few_rows":  # 5 output rows split badly over cores
        model = block(32, 24, 5, 5)
    elif case == "two_readers":  # the depthwise output is also a model output
        model = block(32, 24, 16, 16)
        dw_out = model.graph.node[-3].output[0]  # the depthwise block's activation
        model.graph.output.append(helper.make_tensor_value_info(dw_out, TensorProto.FLOAT, [1, 32, 16, 16]))
    else:
        model = block(32, 24, 32, 32)
        project = next(n for n in reversed(model.graph.node) if n.op_type == "Conv")
        project.attribute.append(helper.make_attribute("strides", [2, 2]))
        del model.graph.output[0].type.tensor_type.shape.dim[:]
    assert all(n_convs(g) <= 1 for g in fused_groups(model))


@pytest.mark.parametrize("target_name,rows,fused", [
    ("x86-avx512", 7, True), ("x86-avx2", 7, False), ("x86-avx2", 14, True)])
def test_the_target_sets_the_fewest_rows_fused(target_name, rows, fused):
    """AVX2 keeps a 7-row stage unfused (its 1x1 conv then takes the flat 3 × 4 tile); 14 rows and AVX-512 fuse."""
    from kiln.codegen.target import resolve_target
    from kiln.config import Options
    from kiln.driver import prepare

    mod = prepare(from_onnx(block(32, 24, rows, rows)), resolve_target(target_name), Options())
    assert mod.attrs["fuse_depthwise_min_rows"] == (8 if target_name == "x86-avx2" else 7)
    groups = group_ops(run(mod, O2))
    assert max(n_convs(g) for g in groups) == (2 if fused else 1)


@settings(max_examples=10, deadline=None)
@given(
    c=st.sampled_from([8, 16, 24, 48]),
    co=st.sampled_from([8, 16, 40]),
    h=st.integers(7, 31),
    w=st.integers(5, 31),
    k=st.sampled_from([3, 5]),
    stride=st.integers(1, 2),
    act=st.sampled_from(["relu6", "relu", None]),
    residual=st.booleans(),
    expand=st.booleans(),
    target=st.sampled_from(["native", "x86-avx2"]),
    seed=st.integers(0, 10**6),
)
@example(c=48, co=16, h=28, w=28, k=3, stride=2, act="relu6", residual=False, expand=True, target="native", seed=0)
@example(c=24, co=24, h=14, w=14, k=3, stride=1, act=None, residual=True, expand=False, target="native", seed=1)
def test_fused_kernel_matches_reference(tmp_path_factory, c, co, h, w, k, stride, act, residual, expand, target,
                                        seed):
    from kiln.codegen.target import resolve_target
    from kiln.schedules.target_info import vector_lanes
    from kiln.schedules.x86.depthwise_pointwise import min_fused_rows

    oh = (h + 2 * (k // 2) - k) // stride + 1
    if oh < min_fused_rows(vector_lanes(resolve_target(target), 32)):
        return  # not fused (see test_depthwise_stays_alone and test_the_target_sets_the_fewest_rows_fused)
    model = block(c, co, h, w, k, stride, act, residual=residual and stride == 1 and c == co, expand=expand,
                  seed=seed)
    path = tmp_path_factory.mktemp("dw") / "m.so"
    kiln.compile(model, path, kiln.Options(target=target))  # blocks of 16 (AVX-512 here) or 8 (AVX2)
    m = kiln.load(path)
    schedules = [s.get("schedule", "") for s in m.meta["steps"]]
    assert sum(s.startswith("dw+1x1") for s in schedules) == 1, schedules  # the template, not a fallback
    x = np.random.default_rng(seed).standard_normal((1, c, h, w)).astype(np.float32)
    assert_close(m.run(x)[0], run_module(from_onnx(model), x)[0], rtol=1e-4, atol=1e-4)
