"""Max / average pooling that stays in NCHW (its producer is an NCHW grouped conv: ShuffleNet's stride-2 3x3
average pools): rows in parallel, a `tile_ow` piece of the output row per register tile, the window unrolled.

The generic schedule computed a whole output row per parallel iteration with the window loops outside a
vectorized row; a stride-2 window reads every other input, which TVM scalarizes per lane, and the row's sums
went through memory between window steps (136x28x28 → 14x14: 69 µs alone). Here the window loops are unrolled
over a short tile whose sums stay in registers: 19 µs vectorized at 7 wide, 20 µs unrolled scalar at 14 (measured
on an AVX-512 Xeon, 2026-11-30); which wins depends on the row, so `vector` is a knob beside the tile.
"""

from __future__ import annotations

from kiln.ir.ops.pool import AVG_POOL, MAX_POOL
from kiln.schedules.loops import divisors, n_reduction_axes
from kiln.schedules.space import Config, Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

from kiln.errors import InvalidConfig

from .pool_nchwc import UNROLL_MAX_WINDOW

VERSION = 1
NAME = "x86.pool_nchw"
MAX_TILE = 16
DEFAULT_TILE = 8  # the widest tile of at most 8 that divides the row: 7 of 14, 8 of 56


def applies(group: Group) -> bool:
    if not (group.anchored_by(AVG_POOL) or group.anchored_by(MAX_POOL)):
        return False
    pool = group.anchor
    shape = group.output[0]
    # a one-column output (a 7x7 window over a 7x7 map) has no row to vectorize; the generic schedule splits its
    # window into vector partial sums instead
    return len(pool.attrs.kernel) == 2 and len(shape) == 4 and 0 not in shape and shape[3] > 1


def workload(group: Group, info) -> Workload:
    pool = group.anchor
    kh, kw = pool.attrs.kernel
    return Workload.of(f"{NAME}@{VERSION}", group, out_w=group.output[0][3], window=kh * kw)


def space(wl: Workload, info=None) -> Space:
    return Space.of(tile_ow=divisors(wl["out_w"], MAX_TILE), vector=[True, False])


def default(wl: Workload, info=None) -> Config:
    return {"tile_ow": max(divisors(wl["out_w"], DEFAULT_TILE)), "vector": True}


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    cfg = space(wl).check(cfg)
    tile = cfg["tile_ow"]
    if wl["out_w"] % tile:
        raise InvalidConfig(f"{NAME}: tile_ow={tile} does not divide out_w={wl['out_w']}")
    root = sch.get_sblock("root")
    *inner, out = sch.get_child_blocks(root)
    anchors = [b for b in [*inner, out] if n_reduction_axes(sch, b)]
    if len(anchors) != 1:
        raise InvalidConfig(f"{NAME}: expected one window reduction, found {len(anchors)}")
    anchor = anchors[0]
    for b in inner:
        if not sch.get(b).same_as(sch.get(anchor)):
            sch.compute_inline(b)
    separate = not sch.get(out).same_as(sch.get(anchor))
    n, c, oh, ow, *_ = sch.get_loops(out)
    wo, wi = sch.split(ow, factors=[None, tile])
    sch.parallel(sch.fuse(n, c, oh))
    if separate:
        sch.compute_at(anchor, wo)
    loops = sch.get_loops(anchor)
    window, row = loops[-2:], loops[2:-2]  # below the parallel loop and the tile loop; no row when tile_ow is 1
    if row:
        sch.reorder(*window, *row)
    if wl["window"] <= UNROLL_MAX_WINDOW:  # ONNX's 60x80 dilated max pool unrolled: LLVM ran for over 5 minutes
        for loop in window:
            sch.unroll(loop)
    spread = sch.vectorize if cfg["vector"] and tile > 1 else sch.unroll
    for loop in row:
        spread(loop)  # before the init is split off: TVM vectorizes a reduction only with its init
    init = sch.decompose_reduction(anchor, window[0])
    if row:
        spread(sch.get_loops(init)[-1])
    if separate:
        spread(wi)
    return [f"pool_nchw(ow={tile},{'vector' if cfg['vector'] else 'unrolled'})"]


TEMPLATE = Template(
    NAME, VERSION, "llvm",
    applies=applies, workload=workload, space=space, default=default, schedule=schedule,
    doc="NCHW pooling: rows in parallel, a tile_ow piece of the row per register tile, the window unrolled",
)
