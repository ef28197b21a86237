"""image.resize on x86: output rows in parallel, the innermost axis vectorized, with epilogues fused in.

The compute (ir/ops/image.py) first fills small per-axis tables (indices, weights, outside flags; tap-major, so
one tap's entries along the innermost axis are contiguous), then gathers and FMAs. The tables stay separate
stages, computed once per call before the kernel (they cost O(output extent) against O(output size)); every
other block (producers, the resize itself, epilogues) is inlined into the output. The knob is the vector tile.
"""

from __future__ import annotations

from dataclasses import dataclass

VERSION = 1
ANCHOR, ROWS = "resize", "resize_rows"
TABLE_PREFIXES = ("resize_index", "resize_weight", "resize_outside")
PARALLEL_MIN_ROWS = 64  # outer iterations enough to keep every core of a small CPU busy


@dataclass(frozen=True)
class Config:
    tile_w: int  # output elements per vector along the innermost axis (gathers)
    rows_tile: int = 8  # row-buffer elements per vector (contiguous loads), when the outer axes go first


def space(out_w: int, lanes: int) -> dict[str, list]:
    tiles = sorted({1, *[t for t in (lanes // 2, lanes, 2 * lanes) if 1 < t <= max(out_w, 1)]})
    return {"tile_w": tiles, "rows_tile": [lanes // 2, lanes, 2 * lanes]}


def default(out_w: int, lanes: int) -> Config:
    # gathers: AVX2's vgatherdps measured slower than scalar loads here (bilinear 2x on [1, 64, 37, 41]:
    # 0.6-1.3 ms scalar vs 1.0-1.6 ms 8-wide; bicubic 6.2 vs 11 ms), so the output axis stays scalar
    return Config(tile_w=1, rows_tile=lanes)


def is_table(name: str) -> bool:
    return name.startswith(TABLE_PREFIXES)


def schedule(sch, cfg: Config) -> list[str]:
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    names = [sch.get(b).name_hint for b in blocks]
    if ANCHOR not in names:
        raise LookupError(f"no {ANCHOR} block")
    for b, name in zip(blocks[:-1], names[:-1]):
        if not is_table(name) and name != ROWS:
            sch.compute_inline(b)
    out = sch.get_child_blocks(root)[-1]
    loops = sch.get_loops(out)
    if not loops:
        return ["resize(scalar)"]
    extents = [int(sch.get(loop).extent) for loop in loops]
    rows = sch.get_sblock(ROWS) if ROWS in names else None
    if rows is not None:  # every outer loop in parallel: one input-width row buffer per output row
        k = len(loops) - 1
    else:  # fuse outer loops (n, c, rows) until there is enough work to share
        k, work = 1, extents[0]
        while k < len(loops) - 1 and work < PARALLEL_MIN_ROWS:
            work *= extents[k]
            k += 1
    steps = []
    if rows is not None:  # before fusing: compute_at cannot invert a fused loop's bindings
        sch.compute_at(rows, loops[k - 1])
        row_loop = sch.get_loops(rows)[-1]
        _, vec = sch.split(row_loop, factors=[None, cfg.rows_tile])
        sch.vectorize(vec)
        steps.append("rows")
    outer = sch.fuse(*loops[:k]) if k > 1 else loops[0]
    if len(loops) > 1:
        sch.parallel(outer)
    inner = sch.get_loops(out)[-1]
    tile = min(cfg.tile_w, extents[-1])
    if tile > 1:
        _, vec = sch.split(inner, factors=[None, tile])
        sch.vectorize(vec)
    return [f"resize({'rows+' if steps else ''}w={tile})"]
