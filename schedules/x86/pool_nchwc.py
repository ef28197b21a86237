"""Max / average / global-average pooling on NCHW[b]c: rows in parallel, the channel block as one vector.

In NCHW a pool vectorizes along the output row, whose stride-2 windows make gathers; in NCHW[b]c every window
element is one contiguous b-channel vector, so a `tile_ow × b` tile of results stays in registers while the
window loops (unrolled) run over it. Padding is read in place: the bounds checks are uniform across the vector.
"""

from __future__ import annotations

from kiln.ir.ops.blocked import GLOBAL_AVG_POOL_NCHWC, POOL2D_NCHWC
from kiln.schedules.space import Config, Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

from kiln.errors import InvalidConfig

VERSION = 1
NAME = "x86.pool_nchwc"
ANCHORS = ("max_pool_nchwc", "pool_sum_nchwc", "global_sum_nchwc")  # the reduction block of each pool compute
UNROLL_MAX_WINDOW = 49  # a 7x7 window unrolled still fits the instruction cache; a global pool's does not


def applies(group: Group) -> bool:
    return group.anchor is not None and group.anchor.op in (POOL2D_NCHWC, GLOBAL_AVG_POOL_NCHWC)


def workload(group: Group, info) -> Workload:
    pool = group.anchor
    out_w = int(pool.type.shape[3])
    if pool.op is GLOBAL_AVG_POOL_NCHWC:  # one output column; the window is the whole image
        _, _, h, w, _ = pool.args[0].type.shape
        out_w, window = 1, int(h) * int(w)
    else:
        kh, kw = pool.attrs.pool.kernel
        window = kh * kw
    return Workload.of(f"{NAME}@{VERSION}", group, lanes=info.lanes(32), out_w=out_w, window=window)


def _tiles(out_w: int) -> list[int]:
    return [d for d in range(1, min(out_w, 16) + 1) if out_w % d == 0]


def space(wl: Workload, info=None) -> Space:
    # unrolling a one-element window changes nothing: the knob exists only for real windows
    return Space.of(tile_ow=_tiles(wl["out_w"]), unroll_window=[False, True] if wl["window"] > 1 else [True])


def default(wl: Workload, info=None) -> Config:
    out_w = wl["out_w"]
    return {"tile_ow": max(d for d in _tiles(out_w) if d <= 8), "unroll_window": wl["window"] <= UNROLL_MAX_WINDOW}


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    """Inline everything but the pool's reduction (padding included); the output computed per register tile."""
    cfg = space(wl).check(cfg)
    if wl["out_w"] % cfg["tile_ow"]:
        raise InvalidConfig(f"{NAME}: tile_ow={cfg['tile_ow']} does not divide out_w={wl['out_w']}")
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    names = [sch.get(b).name_hint for b in blocks]
    anchor_name = next(n for n in names if n in ANCHORS)
    for b, name in zip(blocks[:-1], names[:-1]):
        if name != anchor_name:
            sch.compute_inline(b)
    anchor = sch.get_sblock(anchor_name)
    out = sch.get_child_blocks(root)[-1]
    n, cb, oh, ow, c, *window = sch.get_loops(anchor)
    owo, owi = sch.split(ow, factors=[None, cfg["tile_ow"]])
    sch.reorder(n, oh, cb, owo, *window, owi, c)
    fused = sch.fuse(n, oh, cb)
    sch.parallel(fused)
    sch.vectorize(c)
    sch.unroll(owi)
    if cfg["unroll_window"]:
        for loop in window:
            sch.unroll(loop)
    if window:
        init = sch.decompose_reduction(anchor, window[0])
        sch.vectorize(sch.get_loops(init)[-1])
    if not sch.get(out).same_as(sch.get(anchor)):
        sch.reverse_compute_at(out, owo)
        sch.vectorize(sch.get_loops(out)[-1])
    return [f"pool_nchwc(ow={cfg['tile_ow']}{',unrolled' if cfg['unroll_window'] else ''})"]


TEMPLATE = Template(
    NAME, VERSION, "llvm",
    applies=applies, workload=workload, space=space, default=default, schedule=schedule,
    doc="NCHW[b]c pooling: rows in parallel, a tile_ow x b register tile, the window loops unrolled",
)
