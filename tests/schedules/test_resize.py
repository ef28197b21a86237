"""image.resize: the table-and-gather compute and the x86 template against the NumPy reference over modes,
coordinate transforms, nearest rounding, cubic options, crops and downsampling; a bilinear 2x resize compiled
end to end on a pinned AVX2 target against ONNX Runtime."""

import numpy as np
import onnx
import pytest
from kiln.codegen.target import resolve_target
from kiln.ir.ops.image import COORDINATE_MODES, NEAREST_MODES, RESIZE, ResizeAttrs, _resize, output_size
from kiln.schedules.default import schedule_group
from onnx import helper

import kiln

from ..tolerances import assert_close

AVX2 = "x86-avx2"


def _attrs(shape, scales, **kw) -> ResizeAttrs:
    size = tuple(output_size(n, s) for n, s in zip(shape, scales))
    if kw.get("coordinate_mode") == "tf_crop_and_resize" and "roi" not in kw:
        kw["roi"] = (0.0,) * (len(shape) - 2) + (0.1, 0.2) + (1.0,) * (len(shape) - 2) + (0.8, 0.9)
    return ResizeAttrs(size=size, scales=tuple(float(s) for s in scales), **kw)


def _check(x: np.ndarray, attrs: ResizeAttrs) -> str:
    import tvm
    from tvm import te

    target = resolve_target(AVX2)
    X = te.placeholder(x.shape, x.dtype, name="x")
    out = RESIZE.compute(X, attrs)
    prim, how = schedule_group(te.create_prim_func([X, out]), target, None)
    f = tvm.compile(tvm.IRModule({"main": prim}), target=target)
    y = tvm.runtime.empty(attrs.size, x.dtype)
    f(tvm.runtime.tensor(x), y)
    assert_close(y.numpy(), _resize(x, attrs), rtol=1e-5, atol=1e-5, what=f"{attrs} schedule={how}")
    assert how.startswith("resize("), how  # the template, not the generic fallback
    return how


X4 = np.random.default_rng(0).standard_normal((2, 3, 7, 9)).astype(np.float32)


@pytest.mark.parametrize("coordinate_mode", COORDINATE_MODES)
@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("scales", [(1, 1, 2, 2), (1, 1, 0.6, 1.7), (1, 1, 3, 0.5)])
def test_modes_match_reference(mode, coordinate_mode, scales):
    how = _check(X4, _attrs(X4.shape, scales, mode=mode, coordinate_mode=coordinate_mode,
                            extrapolation_value=-7.0))
    if mode != "nearest":
        assert "rows+" in how, how  # outer axes first into a row buffer, then the innermost


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


@pytest.mark.parametrize("tile_w,rows_tile", [(1, 4), (4, 4), (8, 16), (8, 8)])
def test_template_at_configs(tile_w, rows_tile):
    import tvm
    from kiln.schedules.x86 import resize
    from tvm import s_tir, te

    attrs = _attrs(X4.shape, (1, 1, 2, 1.7), mode="cubic")
    assert tile_w in resize.space(attrs.size[-1], 8)["tile_w"] and rows_tile in resize.space(15, 8)["rows_tile"]
    X = te.placeholder(X4.shape, name="x")
    sch = s_tir.Schedule(te.create_prim_func([X, RESIZE.compute(X, attrs)]))
    resize.schedule(sch, resize.Config(tile_w=tile_w, rows_tile=rows_tile))
    f = tvm.compile(sch.mod, target=resolve_target(AVX2))
    y = tvm.runtime.empty(attrs.size, "float32")
    f(tvm.runtime.tensor(X4), y)
    assert_close(y.numpy(), _resize(X4, attrs), rtol=1e-5, atol=1e-5, what=f"tile_w={tile_w} rows_tile={rows_tile}")


def test_default_lies_in_the_space():
    from kiln.schedules.x86 import resize

    for w, lanes in [(82, 8), (3, 16), (1, 8)]:
        cfg, space = resize.default(w, lanes), resize.space(w, lanes)
        assert cfg.tile_w in space["tile_w"] and cfg.rows_tile in space["rows_tile"]


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
    import tvm
    from tvm import te, topi

    rng = np.random.default_rng(2)
    x, b = rng.standard_normal((1, 3, 7, 9)).astype(np.float32), rng.standard_normal((1, 3, 14, 18)).astype(np.float32)
    attrs = _attrs(x.shape, (1, 1, 2, 2), mode="cubic")
    X, B = te.placeholder(x.shape, name="x"), te.placeholder(b.shape, name="b")
    out = topi.nn.relu(topi.add(RESIZE.compute(topi.exp(X), attrs), B))
    target = resolve_target(AVX2)
    prim, how = schedule_group(te.create_prim_func([X, B, out]), target, None)
    assert how.startswith("resize(rows+"), how
    f = tvm.compile(tvm.IRModule({"main": prim}), target=target)
    y = tvm.runtime.empty(attrs.size, "float32")
    f(tvm.runtime.tensor(x), tvm.runtime.tensor(b), y)
    assert_close(y.numpy(), np.maximum(_resize(np.exp(x), attrs) + b, 0), rtol=1e-5, atol=1e-5)
