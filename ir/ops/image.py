"""image.resize: N-d nearest, linear and cubic resampling with ONNX's coordinate-transformation modes.

The resampling is separable, so the reference resizes one axis at a time with a precomputed (indices, weights)
table per axis; a kernel can use the same tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kiln.errors import TypeCheckError

from ..op import OpDef, OpPattern, define_compute, register_op
from ..types import TensorType, is_float

COORDINATE_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
                    "tf_crop_and_resize")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


@dataclass(frozen=True)
class ResizeAttrs:
    size: tuple[int, ...]  # the output shape, every axis
    scales: tuple[float, ...]  # per axis, as the coordinate transform uses them
    mode: str = "nearest"  # nearest, linear, cubic
    coordinate_mode: str = "half_pixel"
    nearest_mode: str = "round_prefer_floor"
    cubic_coeff_a: float = -0.75
    exclude_outside: bool = False
    extrapolation_value: float = 0.0
    roi: tuple[float, ...] = ()  # starts then ends, every axis (tf_crop_and_resize only)


def _resize_type(x: TensorType, a: ResizeAttrs) -> TensorType:
    if len(a.size) != x.ndim or len(a.scales) != x.ndim:
        raise TypeCheckError(f"image.resize: size {list(a.size)} does not fit {x}")
    if a.mode not in ("nearest", "linear", "cubic") or a.coordinate_mode not in COORDINATE_MODES \
            or a.nearest_mode not in NEAREST_MODES:
        raise TypeCheckError(f"image.resize: unknown mode in {a}")
    if a.mode != "nearest" and not is_float(x.dtype):
        raise TypeCheckError(f"image.resize: {a.mode} interpolation needs a float tensor, got {x}")
    return TensorType(a.size, x.dtype)


def source_coordinates(axis: int, n_in: int, a: ResizeAttrs) -> np.ndarray:
    """For each output index along `axis`, the (fractional) input coordinate it samples."""
    n_out, scale = a.size[axis], a.scales[axis]
    i = np.arange(n_out, dtype=np.float64)
    mode = a.coordinate_mode
    if mode == "half_pixel":
        return (i + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        adjustment = n_out / (scale * n_in)
        center = n_in / 2
        return center * (1 - adjustment) + (i + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (i + 0.5) / scale - 0.5 if n_out > 1 else np.zeros(n_out)
    if mode == "align_corners":
        length = n_in * scale  # unrounded, as ONNX's reference uses it with downsampling scales
        return i * (n_in - 1) / (length - 1) if length > 1 else np.zeros(n_out)
    if mode == "asymmetric":
        return i / scale
    start, end = a.roi[axis], a.roi[axis + len(a.size)]
    if n_out > 1:
        return start * (n_in - 1) + i * (end - start) * (n_in - 1) / (n_out - 1)
    return np.full(n_out, 0.5 * (start + end) * (n_in - 1))


def _nearest(x: np.ndarray, mode: str) -> np.ndarray:
    if mode == "floor":
        return np.floor(x)
    if mode == "ceil":
        return np.ceil(x)
    frac = x - np.floor(x)
    if mode == "round_prefer_floor":
        return np.where(frac == 0.5, np.floor(x), np.round(x))
    return np.where(frac == 0.5, np.ceil(x), np.round(x))


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution weights for the taps at offsets -1, 0, 1, 2 from floor(x)."""
    def w(d):
        d = np.abs(d)
        return np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                        np.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, 0.0))
    return np.stack([w(t + 1), w(t), w(1 - t), w(2 - t)], axis=-1)


def axis_table(axis: int, n_in: int, a: ResizeAttrs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices [out, taps], weights [out, taps], outside [out]) for one axis."""
    x = source_coordinates(axis, n_in, a)
    outside = (x < 0) | (x > n_in - 1) if a.coordinate_mode == "tf_crop_and_resize" else np.zeros(len(x), bool)
    if a.mode == "nearest":
        idx = np.clip(_nearest(x, a.nearest_mode), 0, n_in - 1).astype(np.int64)[:, None]
        return idx, np.ones_like(idx, dtype=np.float64), outside
    base = np.floor(x)
    t = x - base
    if a.mode == "linear":
        offsets, weights = np.array([0, 1]), np.stack([1 - t, t], axis=-1)
    else:
        offsets, weights = np.array([-1, 0, 1, 2]), _cubic_weights(t, a.cubic_coeff_a)
    idx = base[:, None].astype(np.int64) + offsets
    if a.exclude_outside:
        weights = np.where((idx < 0) | (idx >= n_in), 0.0, weights)
        weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
    return np.clip(idx, 0, n_in - 1), weights, outside


def _resize(x: np.ndarray, a: ResizeAttrs) -> np.ndarray:
    out = x.astype(np.float64) if a.mode != "nearest" else x
    for axis in range(x.ndim):
        if a.size[axis] == x.shape[axis] and a.scales[axis] == 1.0 and a.coordinate_mode != "tf_crop_and_resize":
            continue
        idx, w, outside = axis_table(axis, x.shape[axis], a)
        taken = np.take(out, idx, axis=axis)  # [..., out, taps, ...]
        shape = [1] * taken.ndim
        shape[axis], shape[axis + 1] = w.shape
        out = (taken * w.reshape(shape)).sum(axis=axis + 1) if a.mode != "nearest" else np.squeeze(taken, axis + 1)
        if outside.any():
            mask_shape = [1] * out.ndim
            mask_shape[axis] = len(outside)
            out = np.where(outside.reshape(mask_shape), a.extrapolation_value, out)
    return np.asarray(out).astype(x.dtype)


RESIZE = register_op(OpDef("image.resize", ResizeAttrs, _resize_type, _resize, OpPattern.INJECTIVE,
                           flops=lambda x, a: 4 * int(np.prod(a.size)) if a.mode != "nearest" else 0))


# --- compute -------------------------------------------------------------------------------------------------
# Per resized axis, small tables [taps, out] (indices, weights, an outside flag) are computed once per call in
# float64 with the reference's own formulas (same operations in the same order, so nearest-mode ties land the
# same way); the kernel is then gathers and FMAs. Tables are laid out tap-major, so along the innermost axis
# each tap's indices and weights are contiguous vectors.

def _resized(axis: int, n_in: int, a: ResizeAttrs) -> bool:
    if a.coordinate_mode == "tf_crop_and_resize":  # a full [0, 1] crop at the same size samples i → i exactly
        return not (a.size[axis] == n_in and a.roi[axis] == 0.0 and a.roi[axis + len(a.size)] == 1.0)
    return not (a.size[axis] == n_in and a.scales[axis] == 1.0)


def _coordinate_expr(i, axis: int, n_in: int, a: ResizeAttrs):
    """source_coordinates for output index `i` (a TIR int), in float64, operation for operation."""
    from tvm import tirx as tir

    f64 = lambda v: tir.const(float(v), "float64")
    n_out, scale, mode = a.size[axis], a.scales[axis], a.coordinate_mode
    x = i.astype("float64")
    if mode in ("half_pixel", "pytorch_half_pixel"):
        if mode == "pytorch_half_pixel" and n_out <= 1:
            return f64(0)
        return (x + f64(0.5)) / f64(scale) - f64(0.5)
    if mode == "half_pixel_symmetric":
        adjustment = n_out / (scale * n_in)
        center = n_in / 2
        return f64(center * (1 - adjustment)) + (x + f64(0.5)) / f64(scale) - f64(0.5)
    if mode == "align_corners":
        length = n_in * scale
        return x * f64(n_in - 1) / f64(length - 1) if length > 1 else f64(0)
    if mode == "asymmetric":
        return x / f64(scale)
    start, end = a.roi[axis], a.roi[axis + len(a.size)]
    if n_out > 1:
        return f64(start * (n_in - 1)) + x * f64(end - start) * f64(n_in - 1) / f64(n_out - 1)
    return f64(0.5 * (start + end) * (n_in - 1))


def _tap_offsets(a: ResizeAttrs) -> tuple[int, ...]:
    return {"nearest": (0,), "linear": (0, 1), "cubic": (-1, 0, 1, 2)}[a.mode]


def _cubic_weight_expr(d, coeff: float):
    from tvm import tirx as tir

    c = lambda v: tir.const(float(v), "float64")
    d = tir.abs(d)
    near = ((c(coeff + 2) * d - c(coeff + 3)) * d * d + c(1))
    far = (((c(coeff) * d - c(5 * coeff)) * d + c(8 * coeff)) * d - c(4 * coeff))
    return tir.Select(d <= c(1), near, tir.Select(d < c(2), far, c(0)))


def _axis_tables(axis: int, n_in: int, a: ResizeAttrs):
    """(indices [taps, out] int32, weights [taps, out] or None, outside [out] or None) as TE stages."""
    from tvm import te
    from tvm import tirx as tir

    n_out, offsets = a.size[axis], _tap_offsets(a)

    def base_and_frac(i):
        x = _coordinate_expr(i, axis, n_in, a)
        base = tir.floor(x)
        return x, base, x - base

    def raw_index(k, i):
        x, base, frac = base_and_frac(i)
        if a.mode == "nearest":
            m = a.nearest_mode
            if m == "floor":
                return base
            if m == "ceil":
                return tir.ceil(x)
            tie = base if m == "round_prefer_floor" else base + tir.const(1.0, "float64")
            half = tir.const(0.5, "float64")
            return tir.Select(frac == half, tie, tir.Select(frac < half, base, base + tir.const(1.0, "float64")))
        return base + tir.const(float(offsets[k]), "float64")

    def select_tap(k, exprs):
        out = exprs[-1]
        for j in range(len(exprs) - 2, -1, -1):
            out = tir.Select(k == j, exprs[j], out)
        return out

    def index(k, i):
        taps = [tir.max(tir.min(raw_index(j, i), tir.const(n_in - 1.0, "float64")), tir.const(0.0, "float64"))
                for j in range(len(offsets))]
        return select_tap(k, taps).astype("int32")

    indices = te.compute((len(offsets), n_out), index, name=f"resize_index{axis}")
    weights = None
    if a.mode != "nearest":
        def weight(k, i):
            _, base, t = base_and_frac(i)
            one = tir.const(1.0, "float64")
            if a.mode == "linear":
                ws = [one - t, t]
            else:
                ws = [_cubic_weight_expr(t + one, a.cubic_coeff_a), _cubic_weight_expr(t, a.cubic_coeff_a),
                      _cubic_weight_expr(one - t, a.cubic_coeff_a),
                      _cubic_weight_expr(tir.const(2.0, "float64") - t, a.cubic_coeff_a)]
            if a.exclude_outside:
                inside = [tir.all(base + tir.const(float(o), "float64") >= tir.const(0.0, "float64"),
                                  base + tir.const(float(o), "float64") < tir.const(float(n_in), "float64"))
                          for o in offsets]
                ws = [tir.Select(ok, w, tir.const(0.0, "float64")) for ok, w in zip(inside, ws)]
                total = ws[0]
                for w in ws[1:]:
                    total = total + w
                ws = [w / tir.max(total, tir.const(1e-12, "float64")) for w in ws]
            return select_tap(k, ws).astype("float32")

        weights = te.compute((len(offsets), n_out), weight, name=f"resize_weight{axis}")
    outside = None
    if a.coordinate_mode == "tf_crop_and_resize":
        def out_of_range(i):
            x = _coordinate_expr(i, axis, n_in, a)
            return tir.any(x < tir.const(0.0, "float64"), x > tir.const(n_in - 1.0, "float64")).astype("int8")

        outside = te.compute((n_out,), out_of_range, name=f"resize_outside{axis}")
    return indices, weights, outside


@define_compute(RESIZE)
def resize_compute(x, a: ResizeAttrs):
    """out[o...] = Σ over each resized axis's taps of Π weights · x[gathered indices]; nearest is one gather.

    When the innermost axis and others are interpolated, the outer axes go first into `resize_rows` (contiguous
    loads along the input's innermost axis), then the innermost: taps_outer + taps_inner FMAs per output
    instead of their product, as the reference's axis-at-a-time order does.
    """
    import itertools

    from tvm import te
    from tvm import tirx as tir

    shape = [int(d) for d in x.shape]
    last = len(shape) - 1
    axes = [ax for ax in range(len(shape)) if _resized(ax, shape[ax], a)]
    tables = {ax: _axis_tables(ax, shape[ax], a) for ax in axes}
    acc = "float64" if x.dtype == "float64" else "float32"
    n_taps = len(_tap_offsets(a))

    def interpolate(src, over, o, cast_back: bool, bounded: bool = False):
        terms = []
        for combo in itertools.product(range(n_taps), repeat=len(over)):
            idx, w = list(o), None
            for ax, k in zip(over, combo):
                indices, weights, _ = tables[ax]
                idx[ax] = indices[k, o[ax]]
                if bounded:  # a no-op on the table's values, but it bounds the region a schedule can see
                    idx[ax] = tir.max(tir.min(idx[ax], shape[ax] - 1), 0)
                if weights is not None:
                    wk = weights[k, o[ax]].astype(acc)
                    w = wk if w is None else w * wk
            v = src[tuple(idx)]
            terms.append(v if w is None else v.astype(acc) * w)
        value = terms[0]
        for t in terms[1:]:
            value = value + t
        return value.astype(x.dtype) if cast_back and a.mode != "nearest" else value

    separable = a.mode != "nearest" and last in axes and len(axes) > 1
    src, inner = x, axes
    if separable:
        rows_shape = tuple(a.size[:-1]) + (shape[-1],)
        src = te.compute(rows_shape, lambda *o: interpolate(x, axes[:-1], o, cast_back=False), name="resize_rows")
        inner = [last]

    def body(*o):
        value = interpolate(src, inner, o, cast_back=True, bounded=separable)
        outside = [tables[ax][2][o[ax]] != tir.const(0, "int8") for ax in axes if tables[ax][2] is not None]
        if outside:
            fill = a.extrapolation_value if is_float(x.dtype) else int(a.extrapolation_value)
            value = tir.Select(tir.any(*outside), tir.const(fill, x.dtype), value)
        return value

    return te.compute(tuple(a.size), body, name="resize")

def output_size(n_in: int, scale: float) -> int:
    return int(math.floor(n_in * scale))
