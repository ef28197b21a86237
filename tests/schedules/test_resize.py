"""image.resize: the table-and-gather compute and the x86 template against the NumPy reference over modes,
coordinate transforms, nearest rounding, cubic options, crops and downsampling; a bilinear 2x resize compiled
end to end on a pinned AVX2 target against ONNX Runtime; the template at random configs of its space."""

import random

import numpy as np
import onnx
import pytest
from kiln.codegen.target import resolve_target
from kiln.ir import Call
from kiln.ir.ops.blocked import LAYOUT_TRANSFORM, LayoutTransformAttrs
from kiln.ir.ops.elementwise import ADD, EXP, RELU
from kiln.ir.ops.image import COORDINATE_MODES, NEAREST_MODES, RESIZE, ResizeAttrs, _resize, output_size
from kiln.ir.ops.reduce import SUM, ReduceAttrs
from kiln.ir.ops.transform import RESHAPE, ReshapeAttrs
from kiln.schedules.dispatch import task_of
from kiln.schedules.target_info import target_info
from kiln.schedules.workload import Group
from kiln.schedules.x86 import resize
from onnx import helper

import kiln

from ..groups import group, lower, op_group, params, run_lowered
from ..tolerances import assert_close

AVX2 = "x86-avx2"


def _attrs(shape, scales, **kw) -> ResizeAttrs:
    size = tuple(output_size(n, s) for n, s in zip(shape, scales))
    if kw.get("coordinate_mode") == "tf_crop_and_resize" and "roi" not in kw:
        kw["roi"] = (0.0,) * (len(shape) - 2) + (0.1, 0.2) + (1.0,) * (len(shape) - 2) + (0.8, 0.9)
    return ResizeAttrs(size=size, scales=tuple(float(s) for s in scales), **kw)


def _check(x: np.ndarray, attrs: ResizeAttrs, cfg=None) -> str:
    """Lower resize(x) alone as a group (at `cfg` when given), run it, compare; the schedule steps."""
    target = resolve_target(AVX2)
    fn = op_group(RESIZE, [x], attrs)
    template, wl = task_of(fn, target)
    assert template is resize.TEMPLATE  # the template, not the generic fallback
    g = lower(fn, target, {wl.key: cfg} if cfg is not None else None)
    assert g.config_source == ("given" if cfg is not None else "default"), g.config_source
    assert_close(run_lowered(g, target, [x]), _resize(x, attrs), rtol=1e-5, atol=1e-5,
                 what=f"{attrs} schedule={g.schedule} config={g.config}")
    assert g.schedule.startswith("resize("), g.schedule
    return g.schedule


X4 = np.random.default_rng(0).standard_normal((2, 3, 7, 9)).astype(np.float32)


@pytest.mark.parametrize("coordinate_mode", COORDINATE_MODES)
@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("scales", [(1, 1, 2, 2), (1, 1, 0.6, 1.7), (1, 1, 3, 0.5)])
def test_modes_match_reference(mode, coordinate_mode, scales):
    how = _check(X4, _attrs(X4.shape, scales, mode=mode, coordinate_mode=coordinate_mode,
                            extrapolation_value=-7.0))
    if mode != "nearest":
        assert "rows+" in how, how  # outer axes first into a row buffer, then the innermost


@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_input_rows_of_width_one(mode):
    # a 1x1 map upsampled (after a global pool): the row buffer has no inner loop of its own; the template used
    # to split the output's loop in its place and fall back to the generic schedule (found by fuzzing)
    for shape in [(1, 3, 1, 1), (2, 5, 3, 1)]:
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        assert "rows+" in _check(x, _attrs(x.shape, (1, 1, 2, 2), mode=mode))


@pytest.mark.parametrize("nearest_mode", NEAREST_MODES)
@pytest.mark.parametrize("coordinate_mode", ["half_pixel", "asymmetric", "align_corners"])
def test_nearest_rounding(nearest_mode, coordinate_mode):
    # scale 2 and 4 put source coordinates exactly on .5, where the four modes differ
    for scales in [(1, 1, 2, 4), (1, 1, 0.5, 0.25)]:
        x = np.arange(2 * 8 * 8, dtype=np.float32).reshape(1, 2, 8, 8)
        _check(x, _attrs(x.shape, scales, mode="nearest", coordinate_mode=coordinate_mode, nearest_mode=nearest_mode))


@pytest.mark.parametrize("exclude_outside", [False, True])
@pytest.mark.parametrize("coeff", [-0.75, -0.5])
def test_cubic_options(exclude_outside, coeff):
    _check(X4, _attrs(X4.shape, (1, 1, 1.5, 2.5), mode="cubic", cubic_coeff_a=coeff, exclude_outside=exclude_outside))


def test_other_ranks_and_dtypes():
    rng = np.random.default_rng(1)
    _check(rng.standard_normal((2, 3, 5)).astype(np.float32), _attrs((2, 3, 5), (1, 1, 2.5), mode="linear"))
    _check(rng.standard_normal((1, 2, 3, 4, 5)).astype(np.float32),
           _attrs((1, 2, 3, 4, 5), (1, 1, 2, 1.5, 0.8), mode="linear", coordinate_mode="align_corners"))
    _check(rng.integers(0, 255, (1, 3, 6, 6)).astype(np.uint8), _attrs((1, 3, 6, 6), (1, 1, 2, 2)))
    _check(rng.standard_normal((4, 6)).astype(np.float32), _attrs((4, 6), (2, 3), mode="cubic"))
    _check(rng.standard_normal((1, 2, 6, 6)).astype(np.float32),  # only the height resized
           _attrs((1, 2, 6, 6), (1, 1, 2, 1), mode="linear"))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape,scales,mode", [((2, 3, 7, 9), (1, 1, 2, 1.7), "cubic"),
                                               ((1, 2, 5, 13), (1, 1, 0.6, 2), "nearest"),
                                               ((3, 17), (1.5, 1.3), "linear")])
def test_template_at_random_configs(shape, scales, mode, seed):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    attrs = _attrs(shape, scales, mode=mode)
    target = resolve_target(AVX2)
    _, wl = task_of(op_group(RESIZE, [x], attrs), target)
    cfg = resize.space(wl, target_info(target)).sample(random.Random(seed))
    _check(x, attrs, cfg)


@pytest.mark.parametrize("target_name,lanes", [("x86-avx512", 16), ("x86-avx2", 8)])
def test_workload_space_and_default(target_name, lanes):
    info = target_info(resolve_target(target_name))
    x = np.zeros((2, 3, 7, 9), np.float32)
    rows = resize.TEMPLATE.workload(Group(op_group(RESIZE, [x], _attrs(x.shape, (1, 1, 2, 2), mode="linear"))), info)
    assert (rows["lanes"], rows["out_w"], rows["rows"]) == (lanes, 18, True)
    assert resize.default(rows, info) == {"tile_w": 1, "rows_tile": lanes}
    assert resize.default(rows, info) in resize.space(rows, info)
    assert resize.space(rows, info).tunable() == {"tile_w": 3 if lanes == 16 else 4, "rows_tile": 3}
    # nearest has no row buffer, so no row tile; a 3-wide output has no vector tile wider than 3
    ps = params(x)
    flat = Call(RESHAPE, (Call(RESIZE, (ps[0],), _attrs(x.shape, (1, 1, 2, 2), mode="linear")),),
                ReshapeAttrs((2 * 3 * 14 * 18,)))
    flat_wl = resize.TEMPLATE.workload(Group(group(ps, flat)), info)
    assert resize.space(flat_wl, info).tunable() == {"rows_tile": 3}  # the row buffer sits in the only loop
    near = resize.TEMPLATE.workload(Group(op_group(RESIZE, [x], _attrs(x.shape, (1, 1, 2, 1 / 3)))), info)
    assert (near["rows"], near["out_w"]) == (False, 3)
    assert resize.default(near, info) == {"tile_w": 1}
    assert list(resize.space(near, info)) == [{"tile_w": 1}, *([{"tile_w": 2}] if lanes == 4 else [])]


@pytest.mark.parametrize("seed", range(4))
def test_layout_transform_after_it_at_random_configs(seed):
    """relu, then a resize, then NCHW → NCHW8c into the conv after it: the group O2 makes of a decoder's upsample."""
    x = np.random.default_rng(seed).standard_normal((1, 16, 5, 7)).astype(np.float32)
    attrs = _attrs(x.shape, (1, 1, 2, 2), mode="linear")
    ps = params(x)
    blocked = Call(LAYOUT_TRANSFORM, (Call(RESIZE, (Call(RELU, (ps[0],)),), attrs),), LayoutTransformAttrs(0, 8))
    fn = group(ps, blocked)
    target = resolve_target(AVX2)
    template, wl = task_of(fn, target)
    assert template is resize.TEMPLATE and wl["out_w"] == 8 and wl["rows"]
    cfg = resize.space(wl, target_info(target)).sample(random.Random(seed))
    g = lower(fn, target, {wl.key: cfg})
    assert g.config_source == "given" and g.schedule.startswith("resize(rows+"), (g.config_source, g.schedule)
    want = _resize(np.maximum(x, 0), attrs).reshape(1, 2, 8, 10, 14).transpose(0, 1, 3, 4, 2)
    assert_close(run_lowered(g, target, [x]), want, rtol=1e-5, atol=1e-5, what=str(cfg))


def test_claims_only_resize_groups_it_can_schedule():
    x = np.zeros((1, 2, 4, 4), np.float32)
    attrs = _attrs(x.shape, (1, 1, 2, 2), mode="linear")
    ps = params(x)
    summed = group(ps, Call(SUM, (Call(RESIZE, (ps[0],), attrs),), ReduceAttrs((3,), keepdims=False)))
    assert not resize.applies(Group(summed))  # a reduction after it: the generic schedule's job
    twice = group(ps, Call(RESIZE, (Call(RESIZE, (ps[0],), attrs),), _attrs((1, 2, 8, 8), (1, 1, 0.5, 0.5))))
    assert not resize.applies(Group(twice))
    assert resize.applies(Group(op_group(RESIZE, [x], attrs)))


def bilinear_model(shape=(1, 64, 37, 41)) -> onnx.ModelProto:
    """Relu then a 2x bilinear Resize (half_pixel), as in a segmentation decoder."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Resize", ["r", "", "scales"], ["out"], mode="linear")]
    graph = helper.make_graph(nodes, "bilinear", [helper.make_tensor_value_info("x", 1, list(shape))],
                              [helper.make_tensor_value_info("out", 1, None)],
                              [onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_bilinear_resize_matches_onnxruntime(tmp_path):
    import onnxruntime as ort

    model = bilinear_model()
    x = np.random.default_rng(0).standard_normal((1, 64, 37, 41)).astype(np.float32)
    kiln.compile(model, tmp_path / "m.so", kiln.Options(target=AVX2))
    m = kiln.load(tmp_path / "m.so")
    schedules = [s.get("schedule", "") for s in m.meta["steps"]]
    assert any(s.startswith("resize(rows+") for s in schedules), schedules
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert_close(m.run(x)[0], want[0], rtol=1e-4, atol=1e-5)


def test_prologue_and_epilogue_fuse_around_the_template():
    rng = np.random.default_rng(2)
    x, b = rng.standard_normal((1, 3, 7, 9)).astype(np.float32), rng.standard_normal((1, 3, 14, 18)).astype(np.float32)
    attrs = _attrs(x.shape, (1, 1, 2, 2), mode="cubic")
    ps = params(x, b)
    fn = group(ps, Call(RELU, (Call(ADD, (Call(RESIZE, (Call(EXP, (ps[0],)),), attrs), ps[1])),)))
    target = resolve_target(AVX2)
    g = lower(fn, target)
    assert g.template == resize.TEMPLATE.key and g.schedule.startswith("resize(rows+"), g.schedule
    assert_close(run_lowered(g, target, [x, b]), np.maximum(_resize(np.exp(x), attrs) + b, 0), rtol=1e-5, atol=1e-5)


def test_a_gather_after_a_bilinear_resize_leaves_it_to_the_generic_schedule(tmp_path):
    # found by fuzzing: the row buffer is computed at the output's loops, and a gather's rows (data, negative
    # indices) cannot be bounded there; the template used to fail on it and warn (an error in these tests)
    import onnxruntime as ort
    from onnx import TensorProto

    from kiln.model_builders import GraphBuilder

    g = GraphBuilder("resize_gather")
    y = g.op("Resize", ["x", "", g.const(np.array([1, 1, 2, 2], np.float32))], mode="linear")
    y = g.op("Gather", [y, g.const(np.array([-1, 3, -6, 0], np.int64))], axis=1)
    y = g.op("Unsqueeze", [g.op("Squeeze", [y, g.const(np.array([0], np.int64))]), g.const(np.array([2], np.int64))])
    y = g.op("Sub", [y, g.const(np.linspace(-1, 1, 14, dtype=np.float32).reshape(1, 1, 1, 14))])
    model = g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 5, 7])],
                    [(y, TensorProto.FLOAT, [4, 10, 1, 14])])
    x = np.random.default_rng(0).standard_normal((1, 6, 5, 7)).astype(np.float32)
    got = kiln.load(kiln.compile(model, tmp_path / "m.so").path).run(x)[0]
    assert_close(got, ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_a_reflect_pad_after_a_constant_pad_keeps_the_resize_template(tmp_path):
    # found by fuzzing: the reflect pad's index was int64 and the resize tables' int32; inlining both into one
    # kernel failed the template (a warning, an error in these tests) and the group fell back
    import onnxruntime as ort
    from onnx import TensorProto

    from kiln.model_builders import GraphBuilder

    g = GraphBuilder("resize_pads")
    y = g.op("Resize", ["x", "", g.const(np.array([1, 1, 2, 2], np.float32))], mode="linear")
    y = g.op("Pad", [y, g.const(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))], mode="constant")
    y = g.op("Pad", [y, g.const(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))], mode="reflect")
    model = g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 7])],
                    [(y, TensorProto.FLOAT, [1, 4, 18, 20])])
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 7)).astype(np.float32)
    got = kiln.load(kiln.compile(model, tmp_path / "m.so").path).run(x)[0]
    assert_close(got, ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
