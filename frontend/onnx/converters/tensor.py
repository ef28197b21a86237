"""ONNX shape and tensor-manipulation ops → Kiln transform ops, with every shape-like input resolved statically.

Shape, Size, ConstantOfShape, Range and EyeLike produce constants: with static shapes, the shape arithmetic that
exporters emit folds away entirely at import.
"""

from __future__ import annotations

import math

import numpy as np

from kiln.errors import TypeCheckError
from kiln.ir import Constant, Expr, TupleGetItem
from kiln.ir.ops import image
from kiln.ir.ops import transform as tf

from ..registry import Node, converter
from .elementwise import onnx_dtype

_INT_MAX = 2**63 - 1


def _static_shape(node: Node, x: Expr) -> tuple[int, ...]:
    t = x.ttype
    if not t.is_static:
        raise node.unsupported(f"input shape {t} has symbolic dims; bind them with --input-shape")
    return t.shape  # type: ignore[return-value]


def _norm_axes(node: Node, axes, ndim: int) -> tuple[int, ...]:
    out = []
    for a in axes:
        a = int(a)
        if not -ndim <= a < ndim:
            raise node.invalid(f"axis {a} out of range for rank {ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise node.invalid(f"repeated axes {list(axes)}")
    return tuple(out)


def reshape(node: Node, x: Expr, shape: tuple[int, ...]) -> Expr:
    if tuple(x.ttype.shape) == tuple(shape):
        return x
    return node.make(tf.RESHAPE, x, newshape=tuple(int(d) for d in shape))


@converter("Reshape")
def convert_reshape(node: Node):
    x = node.input(0)
    if node.opset < 5:
        target = node.attr_ints("shape")
    else:
        target = tuple(int(d) for d in node.constant(1, "the target shape"))
    shape = _static_shape(node, x)
    try:
        new = tf.resolve_reshape(shape, target, allowzero=bool(node.attr_int("allowzero", 0)))
    except TypeCheckError as err:
        raise TypeCheckError(f"{node}: {err}") from None
    return reshape(node, x, new)


@converter("Flatten")
def convert_flatten(node: Node):
    x = node.input(0)
    shape = _static_shape(node, x)
    axis = node.attr_int("axis", 1)
    if not -len(shape) <= axis <= len(shape):
        raise node.invalid(f"axis {axis} out of range for rank {len(shape)}")
    if axis < 0:
        axis += len(shape)
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    return reshape(node, x, (outer, int(np.prod(shape[axis:], dtype=np.int64))))


@converter("Squeeze")
def convert_squeeze(node: Node):
    x = node.input(0)
    shape = _static_shape(node, x)
    axes = node.attr_ints("axes", None) if node.opset < 13 else (
        None if node.input(1, required=False) is None else node.constant(1, "axes"))
    if axes is None:
        axes = [i for i, d in enumerate(shape) if d == 1]
    axes = _norm_axes(node, axes, len(shape))
    for a in axes:
        if shape[a] != 1:
            raise node.invalid(f"cannot squeeze axis {a} of size {shape[a]}")
    return reshape(node, x, tuple(d for i, d in enumerate(shape) if i not in axes))


@converter("Unsqueeze")
def convert_unsqueeze(node: Node):
    x = node.input(0)
    shape = list(_static_shape(node, x))
    axes = node.attr_ints("axes") if node.opset < 13 else node.constant(1, "axes")
    axes = sorted(_norm_axes(node, axes, len(shape) + len(axes)))
    for a in axes:
        shape.insert(a, 1)
    return reshape(node, x, tuple(shape))


@converter("Transpose")
def convert_transpose(node: Node):
    x = node.input(0)
    perm = node.attr_ints("perm", None)
    perm = tuple(reversed(range(x.ttype.ndim))) if perm is None else _norm_axes(node, perm, x.ttype.ndim)
    if perm == tuple(range(x.ttype.ndim)):
        return x
    return node.make(tf.TRANSPOSE, x, axes=perm)


@converter("Concat")
def convert_concat(node: Node):
    xs = [x for x in node.inputs if x is not None]
    axis = _norm_axes(node, [node.attr_int("axis", 0 if node.opset < 4 else None)], xs[0].ttype.ndim)[0]
    xs = [x for x in xs if not (x.ttype.is_static and x.ttype.shape[axis] == 0)] or xs[:1]
    return xs[0] if len(xs) == 1 else node.make(tf.CONCATENATE, *xs, axis=axis)


@converter("Split")
def convert_split(node: Node):
    x = node.input(0)
    shape = _static_shape(node, x)
    axis = _norm_axes(node, [node.attr_int("axis", 0)], len(shape))[0]
    n_out = len(node.proto.output)
    if node.opset < 13:
        split = node.attr_ints("split", None)
    else:
        split = node.constant(1, "split sizes", required=False)
    if split is None or len(split) == 0:
        n = node.attr_int("num_outputs", n_out) if node.opset >= 18 else n_out
        size = -(-shape[axis] // n)  # ceil: the last chunk is smaller (opset 18)
        split = [min(size, shape[axis] - i * size) for i in range(n)]
    split = tuple(int(s) for s in split)
    if sum(split) != shape[axis]:
        raise node.invalid(f"split sizes {list(split)} do not add up to {shape[axis]} (axis {axis})")
    out = node.make(tf.SPLIT, x, axis=axis, sizes=split)
    return [TupleGetItem(out, i) for i in range(len(split))]


def _clamp_slice(start: int, end: int, step: int, n: int) -> tuple[int, int | None]:
    """ONNX Slice bounds → Python slice bounds: negative counts from the end, out of range clamps."""
    if start < 0:
        start += n
    if end < 0:
        end += n
    if step > 0:
        return min(max(start, 0), n), min(max(end, 0), n)
    start = min(max(start, -1), n - 1)
    end = min(max(end, -1), n - 1)
    if start < 0:  # nothing left to take; Python would read -1 as the last element
        return 0, 0
    return start, (None if end < 0 else end)


@converter("Slice")
def convert_slice(node: Node):
    x = node.input(0)
    shape = _static_shape(node, x)
    if node.opset < 10:
        starts, ends = node.attr_ints("starts"), node.attr_ints("ends")
        axes = node.attr_ints("axes", None)
        steps = None
    else:
        starts = node.constant(1, "starts")
        ends = node.constant(2, "ends")
        axes = node.constant(3, "axes", required=False)
        steps = node.constant(4, "steps", required=False)
    starts, ends = [int(s) for s in starts], [int(e) for e in ends]
    axes = list(range(len(starts))) if axes is None else _norm_axes(node, axes, len(shape))
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise node.invalid("starts, ends, axes and steps differ in length")
    begin, end, strides = [0] * len(shape), [None] * len(shape), [1] * len(shape)
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st == 0:
            raise node.invalid("a step of 0")
        begin[a], end[a] = _clamp_slice(s, e, st, shape[a])
        strides[a] = st
    if all(b == 0 and e in (None, n) and st == 1 for b, e, st, n in zip(begin, end, strides, shape)):
        return x
    return node.make(tf.STRIDED_SLICE, x, begin=tuple(begin), end=tuple(end), strides=tuple(strides))


@converter("Gather")
def convert_gather(node: Node):
    x, i = node.input(0), node.input(1)
    axis = _norm_axes(node, [node.attr_int("axis", 0)], x.ttype.ndim)[0]
    return node.make(tf.TAKE, x, i, axis=axis)


@converter("GatherElements")
def convert_gather_elements(node: Node):
    x = node.input(0)
    axis = _norm_axes(node, [node.attr_int("axis", 0)], x.ttype.ndim)[0]
    return node.make(tf.GATHER_ELEMENTS, x, node.input(1), axis=axis)


@converter("GatherND")
def convert_gather_nd(node: Node):
    return node.make(tf.GATHER_ND, node.input(0), node.input(1), batch_dims=node.attr_int("batch_dims", 0))


@converter("ScatterElements", "Scatter")
def convert_scatter_elements(node: Node):
    x = node.input(0)
    axis = _norm_axes(node, [node.attr_int("axis", 0)], x.ttype.ndim)[0]
    return node.make(tf.SCATTER_ELEMENTS, x, node.input(1), node.input(2), axis=axis,
                     reduction=node.attr_string("reduction", "none"))


@converter("ScatterND")
def convert_scatter_nd(node: Node):
    return node.make(tf.SCATTER_ND, node.input(0), node.input(1), node.input(2),
                     reduction=node.attr_string("reduction", "none"))


@converter("Expand")
def convert_expand(node: Node):
    x = node.input(0)
    target = tuple(int(d) for d in node.constant(1, "the target shape"))
    out = np.broadcast_shapes(_static_shape(node, x), target) if x.ttype.is_static else target
    if tuple(out) == tuple(x.ttype.shape):
        return x
    return node.make(tf.BROADCAST_TO, x, shape=target)


@converter("Tile")
def convert_tile(node: Node):
    reps = tuple(int(r) for r in node.constant(1, "repeats"))
    return node.make(tf.TILE, node.input(0), reps=reps)


@converter("Pad")
def convert_pad(node: Node):
    x = node.input(0)
    ndim = x.ttype.ndim
    mode = node.attr_string("mode", "constant")
    if node.opset < 11:
        pads = node.attr_ints("pads" if node.opset >= 2 else "paddings")
        value = node.attr_float("value", 0.0)
        axes = list(range(ndim))
    else:
        pads = [int(p) for p in node.constant(1, "pads")]
        v = node.constant(2, "constant value", required=False)
        value = 0 if v is None or v.size == 0 else v.item()
        a = node.constant(3, "axes", required=False)
        axes = list(range(ndim)) if a is None else list(_norm_axes(node, a, ndim))
    if len(pads) != 2 * len(axes):
        raise node.invalid(f"{len(pads)} pads for {len(axes)} axes")
    pairs = [(0, 0)] * ndim
    for k, a in enumerate(axes):
        pairs[a] = (int(pads[k]), int(pads[k + len(axes)]))
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise node.invalid(f"unknown mode {mode!r}")
    if isinstance(value, float) and value.is_integer() and x.ttype.dtype not in ("float32", "float64", "float16"):
        value = int(value)
    return node.make(tf.PAD, x, pads=tuple(pairs), mode=mode, value=value)


@converter("Shape")
def convert_shape(node: Node):
    shape = _static_shape(node, node.input(0))
    start, end = node.attr_int("start", 0), node.attr_int("end", None)
    return Constant(np.array(shape[slice(start, end)], dtype=np.int64))


@converter("Size")
def convert_size(node: Node):
    return Constant(np.array(int(np.prod(_static_shape(node, node.input(0)), dtype=np.int64)), dtype=np.int64))


@converter("ConstantOfShape")
def convert_constant_of_shape(node: Node):
    shape = tuple(int(d) for d in node.constant(0, "the shape"))
    value = node.attr_tensor("value", None)
    fill = np.zeros(1, np.float32) if value is None else value.reshape(-1)
    return Constant(np.full(shape, fill[0], dtype=fill.dtype))


@converter("Constant")
def convert_constant(node: Node):
    for name, kind in [("value", "tensor"), ("value_float", "float"), ("value_floats", "floats"),
                       ("value_int", "int"), ("value_ints", "ints")]:
        if node.has_attr(name):
            v = getattr(node, f"attr_{kind}")(name)
            dtype = np.float32 if "float" in kind else np.int64
            return Constant(np.asarray(v) if kind == "tensor" else np.asarray(v, dtype=dtype))
    if node.has_attr("sparse_value") or node.has_attr("value_string") or node.has_attr("value_strings"):
        raise node.unsupported("sparse or string constants")
    raise node.invalid("no value attribute")


@converter("Range")
def convert_range(node: Node):
    start, limit, delta = (node.constant(i, name) for i, name in enumerate(("start", "limit", "delta")))
    if delta.item() == 0:
        raise node.invalid("delta is 0")
    n = max(int(np.ceil((limit.item() - start.item()) / delta.item())), 0)
    return Constant((start + np.arange(n) * delta).astype(start.dtype))


@converter("EyeLike")
def convert_eye_like(node: Node):
    x = node.input(0)
    shape = _static_shape(node, x)
    if len(shape) != 2:
        raise node.invalid(f"input must be 2-D, got {x.ttype}")
    dt = node.attr_int("dtype", None)
    dtype = x.ttype.dtype if dt is None else onnx_dtype(node, dt)
    return Constant(np.eye(shape[0], shape[1], k=node.attr_int("k", 0), dtype=dtype))


@converter("DepthToSpace")
def convert_depth_to_space(node: Node):
    return node.make(tf.DEPTH_TO_SPACE, node.input(0), block_size=node.attr_int("blocksize"),
                     mode=node.attr_string("mode", "DCR"))


@converter("SpaceToDepth")
def convert_space_to_depth(node: Node):
    return node.make(tf.SPACE_TO_DEPTH, node.input(0), block_size=node.attr_int("blocksize"),
                     mode=node.attr_string("mode", "DCR"))


@converter("CumSum")
def convert_cumsum(node: Node):
    x = node.input(0)
    axis = _norm_axes(node, [int(node.constant(1, "axis").item())], x.ttype.ndim)[0]
    return node.make(tf.CUMSUM, x, axis=axis, exclusive=bool(node.attr_int("exclusive", 0)),
                     reverse=bool(node.attr_int("reverse", 0)))


@converter("OneHot")
def convert_one_hot(node: Node):
    depth = int(node.constant(1, "depth").item())
    return node.make(tf.ONE_HOT, node.input(0), node.input(2), depth=depth, axis=node.attr_int("axis", -1))


@converter("Trilu")
def convert_trilu(node: Node):
    k = node.constant(1, "k", required=False)
    return node.make(tf.TRILU, node.input(0), upper=bool(node.attr_int("upper", 1)),
                     k=0 if k is None else int(k.item()))


@converter("TopK")
def convert_topk(node: Node):
    x = node.input(0)
    k = node.attr_int("k") if node.opset < 10 else int(node.constant(1, "k").item())
    axis = _norm_axes(node, [node.attr_int("axis", -1)], x.ttype.ndim)[0]
    out = node.make(tf.TOPK, x, k=k, axis=axis, largest=bool(node.attr_int("largest", 1)),
                    sorted=bool(node.attr_int("sorted", 1)))
    return [TupleGetItem(out, 0), TupleGetItem(out, 1)]


@converter("ReverseSequence")
def convert_reverse_sequence(node: Node):
    return node.make(tf.REVERSE_SEQUENCE, node.input(0), node.input(1), batch_axis=node.attr_int("batch_axis", 1),
                     time_axis=node.attr_int("time_axis", 0))


@converter("GridSample")
def convert_grid_sample(node: Node):
    from kiln.ir.ops import grid_sample as gs

    mode = node.attr_string("mode", "linear" if node.opset >= 20 else "bilinear")
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    padding = node.attr_string("padding_mode", "zeros")
    if mode not in gs.MODES or padding not in gs.PADDINGS:
        raise node.invalid(f"mode {mode!r} / padding_mode {padding!r} (GridSample takes {gs.MODES} and {gs.PADDINGS})")
    return node.make(gs.GRID_SAMPLE, node.input(0), node.input(1), mode=mode, padding_mode=padding,
                     align_corners=bool(node.attr_int("align_corners", 0)))


@converter("Resize", "Upsample")
def convert_resize(node: Node):
    x = node.input(0)
    shape = _static_shape(node, x)
    ndim = len(shape)
    if node.op_type == "Upsample" or node.opset < 11:
        # Upsample and Resize-10: scales only, asymmetric coordinates, nearest rounds down
        scales = node.attr_floats("scales") if node.op_type == "Upsample" and node.opset < 9 else tuple(
            float(s) for s in node.constant(1, "scales"))
        mode = node.attr_string("mode", "nearest")
        mode = "linear" if mode in ("linear", "bilinear") else mode
        size = tuple(image.output_size(n, s) for n, s in zip(shape, scales))
        return node.make(image.RESIZE, x, size=size, scales=tuple(scales), mode=mode, coordinate_mode="asymmetric",
                         nearest_mode="floor")
    if node.attr_int("antialias", 0):
        raise node.unsupported("antialias=1")
    axes = node.attr_ints("axes", None)
    axes = list(range(ndim)) if axes is None else list(_norm_axes(node, axes, ndim))
    roi_v = node.constant(1, "roi", required=False)
    scales_v = node.constant(2, "scales", required=False)
    sizes_v = node.constant(3, "sizes", required=False)
    scales, size = [1.0] * ndim, list(shape)
    if sizes_v is not None and sizes_v.size:
        sizes = [int(s) for s in sizes_v]
        policy = node.attr_string("keep_aspect_ratio_policy", "stretch")
        ratios = [sizes[k] / shape[a] for k, a in enumerate(axes)]
        if policy in ("not_larger", "not_smaller"):
            r = min(ratios) if policy == "not_larger" else max(ratios)
            ratios = [r] * len(axes)
            sizes = [int(math.floor(r * shape[a] + 0.5)) for a in axes]
        for k, a in enumerate(axes):
            size[a], scales[a] = sizes[k], ratios[k]
    elif scales_v is not None and scales_v.size:
        for k, a in enumerate(axes):
            scales[a] = float(scales_v[k])
            size[a] = image.output_size(shape[a], scales[a])
    else:
        raise node.invalid("needs scales or sizes")
    roi: tuple[float, ...] = ()
    coordinate_mode = node.attr_string("coordinate_transformation_mode", "half_pixel")
    if coordinate_mode == "tf_crop_and_resize":
        starts, ends = [0.0] * ndim, [1.0] * ndim
        if roi_v is not None and roi_v.size:
            for k, a in enumerate(axes):
                starts[a], ends[a] = float(roi_v[k]), float(roi_v[k + len(axes)])
        roi = tuple(starts + ends)
    return node.make(image.RESIZE, x, size=tuple(size), scales=tuple(scales), mode=node.attr_string("mode", "nearest"),
                     coordinate_mode=coordinate_mode,
                     nearest_mode=node.attr_string("nearest_mode", "round_prefer_floor"),
                     cubic_coeff_a=node.attr_float("cubic_coeff_a", -0.75),
                     exclude_outside=bool(node.attr_int("exclude_outside", 0)),
                     extrapolation_value=node.attr_float("extrapolation_value", 0.0), roi=roi)


@converter("CumProd")
def convert_cumprod(node: Node):
    x = node.input(0)
    axis = _norm_axes(node, [int(node.constant(1, "axis").item())], x.ttype.ndim)[0]
    return node.make(tf.CUMPROD, x, axis=axis, exclusive=bool(node.attr_int("exclusive", 0)),
                     reverse=bool(node.attr_int("reverse", 0)))
