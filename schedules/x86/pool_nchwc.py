"""Max / average / global-average pooling on NCHW[b]c: rows in parallel, the channel block as one vector.

In NCHW a pool vectorizes along the output row, whose stride-2 windows make gathers; in NCHW[b]c every window
element is one contiguous b-channel vector, so a `tile_ow × b` tile of results stays in registers while the
window loops (unrolled) run over it. Padding is read in place: the bounds checks are uniform across the vector.
"""

from __future__ import annotations

from dataclasses import dataclass

VERSION = 1
ANCHORS = ("max_pool_nchwc", "pool_sum_nchwc", "global_sum_nchwc")


@dataclass(frozen=True)
class Config:
    tile_ow: int  # output columns per register tile
    unroll_window: bool = True


def space(out_w: int) -> dict[str, list]:
    return {"tile_ow": [d for d in range(1, min(out_w, 16) + 1) if out_w % d == 0], "unroll_window": [False, True]}


def default(out_w: int, window: int) -> Config:
    tile = max(d for d in range(1, min(out_w, 8) + 1) if out_w % d == 0)
    return Config(tile_ow=tile, unroll_window=window <= 49)


def schedule(sch, cfg: Config) -> list[str]:
    """Schedule a group whose anchor is one of ANCHORS (everything else, padding included, is inlined)."""
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
    owo, owi = sch.split(ow, factors=[None, cfg.tile_ow])
    sch.reorder(n, oh, cb, owo, *window, owi, c)
    fused = sch.fuse(n, oh, cb)
    sch.parallel(fused)
    sch.vectorize(c)
    sch.unroll(owi)
    if cfg.unroll_window:
        for loop in window:
            sch.unroll(loop)
    if window:
        init = sch.decompose_reduction(anchor, window[0])
        sch.vectorize(sch.get_loops(init)[-1])
    if not sch.get(out).same_as(sch.get(anchor)):
        sch.reverse_compute_at(out, owo)
        sch.vectorize(sch.get_loops(out)[-1])
    return [f"pool_nchwc(ow={cfg.tile_ow}{',unrolled' if cfg.unroll_window else ''})"]
