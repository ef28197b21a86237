"""image.grid_sample: ONNX GridSample (opset 16/20/22) over N spatial dims: each output point reads the input at a
location the grid gives in [-1, 1], by nearest, linear or cubic interpolation, with zeros, border or reflection
padding. Spatial transformers, optical flow and deformable heads use it.

The reference follows ONNX's own step by step (coordinates in float32, reflection in float64, per-axis padding
of each tap), vectorized; the compute does the same per output point, so both round alike. One deliberate
difference: cubic interpolation with border padding does not first move an outside point onto the border
(ONNX's reference evaluator does); each of its 16 taps is clamped instead, as PyTorch's grid_sample and ONNX
Runtime compute it (onnxruntime#10607: a point just outside still sees two rows of the inside through the
cubic's reach, which moving it to the border throws away). Models exported from PyTorch expect that.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from kiln.errors import TypeCheckError

from . import float_math
from ..op import OpDef, OpPattern, define_compute, register_op
from ..types import TensorType, is_float

MODES = ("nearest", "linear", "cubic")
PADDINGS = ("zeros", "border", "reflection")
CUBIC_A = -0.75


@dataclass(frozen=True)
class GridSampleAttrs:
    mode: str = "linear"
    padding_mode: str = "zeros"
    align_corners: bool = False


def _type(x: TensorType, grid: TensorType, a: GridSampleAttrs) -> TensorType:
    nd = x.ndim - 2
    if a.mode not in MODES or a.padding_mode not in PADDINGS:
        raise TypeCheckError(f"image.grid_sample: unknown mode in {a}")
    if nd < 1 or grid.ndim != nd + 2 or grid.shape[-1] != nd or grid.shape[0] != x.shape[0]:
        raise TypeCheckError(f"image.grid_sample: grid {grid} does not fit input {x} (want [N, *out, {nd}])")
    if not is_float(x.dtype) or not is_float(grid.dtype):
        raise TypeCheckError(f"image.grid_sample: needs float input and grid, got {x} and {grid}")
    return TensorType((x.shape[0], x.shape[1], *grid.shape[1:-1]), x.dtype)


def _borders(dims, align: bool) -> tuple[np.ndarray, np.ndarray]:
    lo = np.array([0.0 if align else -0.5] * len(dims))
    hi = np.array([d - (1.0 if align else 0.5) for d in dims], np.float64)
    return lo, hi


def _reflect(v, lo, hi):
    """v reflected by the near border until it lies in [lo, hi] (ONNX's _gs_reflect), in float64."""
    v = np.asarray(v, np.float64)
    span = np.where(hi > lo, hi - lo, 1.0)
    below, above = v < lo, v > hi
    dx = np.where(below, lo - v, v - hi)
    n = np.floor(dx / span)
    r = dx - n * span
    even = n % 2 == 0
    out = np.where(below, np.where(even, lo + r, hi - r), np.where(even, hi - r, lo + r))
    return np.where(below | above, out, v)


def _cubic_weights(t: np.ndarray) -> list[np.ndarray]:
    a = np.float32(CUBIC_A)
    t = np.abs(t)
    one, two = np.float32(1), np.float32(2)
    return [((a * (t + one) - 5 * a) * (t + one) + 8 * a) * (t + one) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + one,
            ((a + 2) * (one - t) - (a + 3)) * (one - t) * (one - t) + one,
            ((a * (two - t) - 5 * a) * (two - t) + 8 * a) * (two - t) - 4 * a]


def _grid_sample(x: np.ndarray, grid: np.ndarray, a: GridSampleAttrs) -> np.ndarray:
    nd, dims = x.ndim - 2, x.shape[2:]
    lo, hi = _borders(dims, a.align_corners)
    n_idx = np.arange(x.shape[0]).reshape((-1,) + (1,) * nd)
    coords = []
    for ax in range(nd):  # the grid's last axis lists x, y(, z): innermost dim first
        g = grid[..., nd - 1 - ax].astype(np.float32)
        d = np.float32(dims[ax])
        c = (g + 1) / 2 * (d - 1) if a.align_corners else ((g + 1) * d - 1) / 2
        c = c.astype(np.float32)
        if a.mode == "nearest":
            c = np.rint(c)
        out = (c < lo[ax]) | (c > hi[ax])
        if a.padding_mode == "border" and a.mode != "cubic":
            c = np.where(out, np.clip(c, 0, dims[ax] - 1), c).astype(np.float32)
        elif a.padding_mode == "reflection":
            c = np.where(out, _reflect(c, lo[ax], hi[ax]), c).astype(np.float32)
        coords.append(c)

    def taps(c):
        if a.mode == "nearest":
            return [(c.astype(np.int64), None)]
        base = np.floor(c)
        t = (c - base).astype(np.float32)
        base = base.astype(np.int64)
        if a.mode == "linear":
            return [(base, (1 - t).astype(np.float32)), (base + 1, t)]
        return [(base + k - 1, w.astype(np.float32)) for k, w in enumerate(_cubic_weights(t))]

    def pixel(idx):  # per-axis padding of one tap, then the gather: [N, *out, C]
        valid = np.ones(idx[0].shape, bool)
        fixed = []
        for ax, i in enumerate(idx):
            if a.padding_mode == "zeros":
                valid &= (i >= 0) & (i < dims[ax])
                i = np.clip(i, 0, dims[ax] - 1)
            elif a.padding_mode == "border":
                i = np.clip(i, 0, dims[ax] - 1)
            else:
                i = np.trunc(_reflect(i, lo[ax], hi[ax])).astype(np.int64)
            fixed.append(i)
        v = np.moveaxis(x, 1, -1)[(n_idx, *fixed)]
        return np.where(valid[..., None], v, 0).astype(np.float32 if x.dtype != np.float64 else np.float64)

    total = None
    for combo in itertools.product(*(taps(c) for c in coords)):
        w = None
        for _, wk in combo:
            if wk is not None:
                w = wk if w is None else w * wk
        v = pixel([i for i, _ in combo])
        term = v if w is None else v * w[..., None]
        total = term if total is None else total + term
    return np.moveaxis(total, -1, 1).astype(x.dtype)


GRID_SAMPLE = register_op(OpDef(
    "image.grid_sample", GridSampleAttrs, _type, _grid_sample, OpPattern.INJECTIVE,
    flops=lambda x, g, a: 2 * {"nearest": 1, "linear": 2, "cubic": 4}[a.mode] ** (x.ndim - 2)
    * int(np.prod(_type(x, g, a).shape))))


# --- compute -------------------------------------------------------------------------------------------------

@define_compute(GRID_SAMPLE)
def grid_sample_compute(x, grid, a: GridSampleAttrs):
    from tvm import te
    from tvm import tirx as tir

    nd = len(x.shape) - 2
    dims = [int(d) for d in x.shape[2:]]
    lo, hi = _borders(dims, a.align_corners)
    f32, f64 = "float32", "float64"
    acc = f64 if str(x.dtype) == "float64" else f32
    out_shape = (int(x.shape[0]), int(x.shape[1]), *[int(d) for d in grid.shape[1:-1]])

    def c32(v):
        return tir.const(float(v), f32)

    def reflect(v64, ax):
        return float_math.bind(v64, lambda v: _reflect_bound(v, ax))

    def _reflect_bound(v64, ax):
        l, h = tir.const(lo[ax], f64), tir.const(hi[ax], f64)
        span = tir.const(hi[ax] - lo[ax] if hi[ax] > lo[ax] else 1.0, f64)
        below = v64 < l
        dx = tir.Select(below, l - v64, v64 - h)
        n = tir.floor(dx / span)
        r = dx - n * span
        two = tir.const(2.0, f64)
        even = n - tir.floor(n / two) * two == tir.const(0.0, f64)  # floormod is for integers only
        out = tir.Select(below, tir.Select(even, l + r, h - r), tir.Select(even, h - r, l + r))
        return tir.Select(tir.Or(below, h < v64), out, v64)

    def coordinate(n, o, ax):
        g = grid[(n, *o, nd - 1 - ax)].astype(f32)
        d = c32(dims[ax])
        if a.align_corners:
            c = (g + c32(1)) / c32(2) * (d - c32(1))
        else:
            c = ((g + c32(1)) * d - c32(1)) / c32(2)
        if a.mode == "nearest":
            c = float_math.round_half_even(c)
        out = tir.Or(c.astype(f64) < tir.const(lo[ax], f64), tir.const(hi[ax], f64) < c.astype(f64))
        if a.padding_mode == "border" and a.mode != "cubic":  # see _grid_sample
            c = tir.Select(out, tir.max(tir.min(c, c32(dims[ax] - 1)), c32(0)), c)
        elif a.padding_mode == "reflection":
            c = tir.Select(out, reflect(c.astype(f64), ax).astype(f32), c)
        return c

    def cubic(t):
        aa = c32(CUBIC_A)
        one, two = c32(1), c32(2)
        return [((aa * (t + one) - c32(5) * aa) * (t + one) + c32(8) * aa) * (t + one) - c32(4) * aa,
                ((aa + two) * t - (aa + c32(3))) * t * t + one,
                ((aa + two) * (one - t) - (aa + c32(3))) * (one - t) * (one - t) + one,
                ((aa * (two - t) - c32(5) * aa) * (two - t) + c32(8) * aa) * (two - t) - c32(4) * aa]

    def taps(c):
        if a.mode == "nearest":
            return [(c.astype("int32"), None)]
        base = tir.floor(c)
        t = c - base
        i0 = base.astype("int32")  # c is a bound variable here: these stay small
        if a.mode == "linear":
            return [(i0, c32(1) - t), (i0 + 1, t)]
        return [(i0 + (k - 1), w) for k, w in enumerate(cubic(t))]

    def body(n, ch, *o):
        # each axis's coordinate, its floor and its fraction bound once (float_math.bind): written out at every
        # use, the reflection's nested selects grew the expression into thousands of copies (minutes to compile)
        coords = [lambda ax=ax: coordinate(n, o, ax) for ax in range(nd)]
        if a.mode == "nearest":  # one tap: nothing to share, and a bound index would leak into the read region
            return _sum_taps(n, ch, [taps(c()) for c in coords])
        return _bind_all(coords, lambda cs: _sum_taps(n, ch, [taps(c) for c in cs]))

    def _bind_all(makers, k, done=()):
        if not makers:
            return k(list(done))
        return float_math.bind(makers[0](), lambda c: _bind_all(makers[1:], k, (*done, c)))

    def _sum_taps(n, ch, per_axis):
        total = None
        for combo in itertools.product(*per_axis):
            valid, idx, w = [], [], None
            for ax, (i, wk) in enumerate(combo):
                top = dims[ax] - 1
                if a.padding_mode == "zeros":
                    valid.append(tir.And(i >= 0, i <= top))
                    i = tir.max(tir.min(i, top), 0)
                elif a.padding_mode == "border":
                    i = tir.max(tir.min(i, top), 0)
                else:  # reflection of the integer index, truncated as int() does, then kept in range
                    r = reflect(i.astype(f64), ax)
                    i = tir.max(tir.min(tir.trunc(r).astype("int32"), top), 0)
                idx.append(i)
                if wk is not None:
                    w = wk if w is None else w * wk
            v = x[(n, ch, *idx)].astype(acc)
            if valid:
                v = tir.Select(tir.all(*valid), v, tir.const(0.0, acc))
            term = v if w is None else v * w.astype(acc)
            total = term if total is None else total + term
        return total.astype(x.dtype)

    return te.compute(out_shape, body, name="grid_sample")
