"""image.resize: N-d nearest, linear and cubic resampling with ONNX's coordinate-transformation modes.

The resampling is separable, so the reference resizes one axis at a time with a precomputed (indices, weights)
table per axis; a kernel can use the same tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kiln.errors import TypeCheckError

from ..op import OpDef, OpPattern, register_op
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


def output_size(n_in: int, scale: float) -> int:
    return int(math.floor(n_in * scale))
