"""nn.conv2d_winograd_nchwc: a stride-1 3x3 conv as Winograd F(m x m, 3 x 3) on NCHW[b]c data, m = 2 or 4.

Each m x m output tile costs (m + 2)^2 multiplies per input/output channel pair instead of 9 m^2: 2.25x fewer
for m = 4, 1.78x for m = 2, paid for with transforms of the input tiles and the output tiles (both linear in
the channel count, not quadratic) and with some precision (F(4x4) loses about one decimal digit in fp32).

    V = B^T d B        (input transform, per 6x6 tile and input channel)
    M = sum_c U * V    (per tile position: a batched GEMM over channels)
    Y = A^T M A        (output transform)

The weight transform U = G g G^T is done at compile time (`transform_weight`); the op takes U, packed
[alpha, alpha, O/ob, I, ob] so the GEMM reads ob output channels as one vector. The matrices are the ones of
Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2015).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction as F

import numpy as np

from kiln.errors import TypeCheckError

from ..op import OpDef, OpPattern, define_compute, register_op
from ..types import TensorType
from .blocked import block_array, pad_nchwc, unblock_array
from .conv import ConvAttrs, conv_reference

_MATRICES = {  # tile m: (B^T, G, A^T)
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [F(1, 2), F(1, 2), F(1, 2)], [F(1, 2), F(-1, 2), F(1, 2)], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        [
            [F(1, 4), 0, 0],
            [F(-1, 6), F(-1, 6), F(-1, 6)],
            [F(-1, 6), F(1, 6), F(-1, 6)],
            [F(1, 24), F(1, 12), F(1, 6)],
            [F(1, 24), F(-1, 12), F(1, 6)],
            [0, 0, 1],
        ],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}


def matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, G, A) in float64, so that V = B^T d B, U = G g G^T, Y = A^T M A."""
    bt, g, at = (np.array([[float(v) for v in row] for row in mat]) for mat in _MATRICES[m])
    return bt.T, g, at.T


@dataclass(frozen=True)
class WinogradAttrs:
    conv: ConvAttrs  # of the 3x3 stride-1 conv it replaces
    tile: int  # m: 2 or 4
    out_block: int


def supports(x_shape: tuple, w_shape: tuple, a: ConvAttrs) -> bool:
    return (
        len(w_shape) == 4
        and w_shape[2:] == (3, 3)
        and a.strides == (1, 1)
        and a.dilation == (1, 1)
        and a.groups == 1
        and a.out_dtype in (None, "float32")
    )


def transform_weight(w: np.ndarray, m: int, out_block: int) -> np.ndarray:
    """OIHW 3x3 weights → U packed [alpha, alpha, O/ob, I, ob] (float32; computed in float64)."""
    _, g, _ = matrices(m)
    u = np.einsum("ea,oiab,fb->efoi", g, w.astype(np.float64), g)  # alpha, alpha, O, I
    alpha, _, o, i = u.shape
    u = u.reshape(alpha, alpha, o // out_block, out_block, i).transpose(0, 1, 2, 4, 3)
    return np.ascontiguousarray(u.astype(w.dtype))


def recover_weight(u: np.ndarray, m: int) -> np.ndarray:
    """The OIHW weights U was made from (G has full column rank, so its pseudo-inverse undoes it)."""
    _, g, _ = matrices(m)
    gi = np.linalg.pinv(g)
    alpha, _, ocb, i, ob = u.shape
    full = u.astype(np.float64).transpose(0, 1, 2, 4, 3).reshape(alpha, alpha, ocb * ob, i)
    return np.einsum("ae,efoi,bf->oiab", gi, full, gi)


def _type(x: TensorType, u: TensorType, a: WinogradAttrs) -> TensorType:
    op = "nn.conv2d_winograd_nchwc"
    alpha = a.tile + 2
    if a.tile not in _MATRICES:
        raise TypeCheckError(f"{op}: tile must be 2 or 4, got {a.tile}")
    if x.ndim != 5 or u.ndim != 5 or u.shape[:2] != (alpha, alpha) or u.shape[4] != a.out_block:
        raise TypeCheckError(
            f"{op}: expected NCHW[b]c data and [{alpha}, {alpha}, O/{a.out_block}, I, "
            f"{a.out_block}] weights, got {x} and {u}"
        )
    if x.shape[1] * x.shape[4] != u.shape[3]:
        raise TypeCheckError(
            f"{op}: data has {x.shape[1] * x.shape[4]} channels, weights expect {u.shape[3]}"
        )
    c = a.conv
    if c.strides != (1, 1) or c.dilation != (1, 1) or c.groups != 1:
        raise TypeCheckError(f"{op}: only stride-1, undilated, ungrouped convs, got {c}")
    oh, ow = x.shape[2] + c.padding[0] + c.padding[2] - 2, x.shape[3] + c.padding[1] + c.padding[3] - 2
    if min(oh, ow) < 1:
        raise TypeCheckError(f"{op}: 3x3 kernel larger than padded input {x}")
    return TensorType((x.shape[0], u.shape[2], oh, ow, a.out_block), x.dtype)


def _reference(x: np.ndarray, u: np.ndarray, a: WinogradAttrs) -> np.ndarray:
    w = recover_weight(u, a.tile)
    return block_array(conv_reference(unblock_array(x).astype(np.float64), w, a.conv), a.out_block).astype(
        x.dtype
    )


def _flops(x: TensorType, u: TensorType, a: WinogradAttrs) -> int:
    """The direct conv's count, so GFLOPS compare across algorithms (the usual convention)."""
    out = _type(x, u, a)
    return 2 * out.size * u.shape[3] * 9


CONV2D_WINOGRAD = register_op(
    OpDef(
        "nn.conv2d_winograd_nchwc",
        WinogradAttrs,
        _type,
        _reference,
        OpPattern.OUT_ELEMWISE_FUSABLE,
        flops=_flops,
    )
)


@define_compute(CONV2D_WINOGRAD)
def _compute(x, u, a: WinogradAttrs):
    from tvm import te
    from tvm.topi.nn.winograd_util import const_matrix

    m, alpha = a.tile, a.tile + 2
    n, cb, h, w, ib = (int(d) for d in x.shape)
    out = _type(
        TensorType((n, cb, h, w, ib), str(x.dtype)),
        TensorType(tuple(int(d) for d in u.shape), str(u.dtype)),
        a,
    )
    _, kb, oh, ow, ob = out.shape
    nh, nw = -(-oh // m), -(-ow // m)
    pt, pl, pb, pr = a.conv.padding
    # pad so every tile, the last ones included, reads a full alpha x alpha window
    xp = pad_nchwc(x, (pt, pl, nh * m + 2 - h - pt, nw * m + 2 - w - pl), name="wino_pad")
    bmat, _, amat = matrices(m)
    B = const_matrix(bmat.astype(np.float32), "B")
    A = const_matrix(amat.astype(np.float32), "A")
    tiles = n * nh * nw

    def tile_origin(p):
        return p // (nh * nw), (p // nw) % nh * m, p % nw * m

    r1 = te.reduce_axis((0, alpha), name="r1")
    # input transform, one axis at a time: rows (B^T d), then columns (. B)
    t1 = te.compute(
        (tiles, cb, alpha, alpha, ib),
        lambda p, c, e1, a2, ci: te.sum(
            B[r1, e1] * xp[tile_origin(p)[0], c, tile_origin(p)[1] + r1, tile_origin(p)[2] + a2, ci], axis=r1
        ),
        name="wino_in_rows",
    )
    r2 = te.reduce_axis((0, alpha), name="r2")
    v = te.compute(
        (alpha, alpha, tiles, cb, ib),
        lambda e1, e2, p, c, ci: te.sum(t1[p, c, e1, r2, ci] * B[r2, e2], axis=r2),
        name="wino_V",
    )
    rco, rci = te.reduce_axis((0, cb), name="rco"), te.reduce_axis((0, ib), name="rci")
    mm = te.compute(
        (alpha, alpha, tiles, kb, ob),
        lambda e1, e2, p, k, ko: te.sum(
            v[e1, e2, p, rco, rci] * u[e1, e2, k, rco * ib + rci, ko], axis=[rco, rci]
        ),
        name="wino_M",
    )
    r3 = te.reduce_axis((0, alpha), name="r3")
    t2 = te.compute(
        (tiles, kb, m, alpha, ob),
        lambda p, k, vh, e2, ko: te.sum(A[r3, vh] * mm[r3, e2, p, k, ko], axis=r3),
        name="wino_out_rows",
    )
    r4 = te.reduce_axis((0, alpha), name="r4")
    inv = te.compute(
        (tiles, kb, m, m, ob),
        lambda p, k, vh, vw, ko: te.sum(t2[p, k, vh, r4, ko] * A[r4, vw], axis=r4),
        name="wino_Y",
    )
    return te.compute(
        out.shape,
        lambda i, k, y, xx, ko: inv[(i * nh + y // m) * nw + xx // m, k, y % m, xx % m, ko],
        name="conv2d_winograd",
    )
