"""Layout transforms between NCHW and NCHW[b]c, with the reshapes and transposes that feed them inlined
(ShuffleNet's channel shuffle, reshape + transpose + reshape, rides along): a transpose of each row's `b × W`
tile.

One side of that transpose is always strided. The generic schedule vectorizes the output's innermost loop, and
TVM scalarizes a strided vector load into one extract, load and insert per lane: 3 Gelem/s here, where a plain
copy of the same data runs at 15. Left as straight-line scalar code instead (the tile's loops unrolled), LLVM's
SLP vectorizer turns the strided side into hardware gathers where its cost model says they pay. Which unrolled
loop nest it vectorizes well depends on the tile and the CPU in ways no rule here predicts (measured on an
AVX-512 Xeon: unrolling the 16-lane block loop ran a 7x7 transform 3x faster than the generic schedule and a
14x14 one no faster; an 8-wide row tile ran a 56x56 one 4x faster and a 7-wide one 1.5x), so the nest is a knob
and the tuner measures it.

mode "vector": the output's innermost loop vectorized (the generic schedule's choice);
mode "unroll": the block loop unrolled, innermost (into blocks) / a `tile_w` piece of the row unrolled under the
    block loop (out of blocks);
mode "tile": a `tile_w` piece of the row and the block loop both unrolled, the row piece innermost.
"""

from __future__ import annotations

from kiln.ir.ops.blocked import LAYOUT_TRANSFORM
from kiln.ir.ops.transform import RESHAPE, TRANSPOSE
from kiln.schedules.loops import divisors
from kiln.schedules.space import Config, Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

from kiln.errors import InvalidConfig

VERSION = 1
NAME = "x86.layout_transform"
MAX_TILE_W = 16  # the unrolled row piece: 16 x a 16-lane block is 256 moves, enough straight-line code
# what may ride along: data movement only (a resize before the transform keeps its own template, x86/resize.py)
MOVES = (RESHAPE, TRANSPOSE, LAYOUT_TRANSFORM)


def applies(group: Group) -> bool:
    """Reshapes and transposes ending in one layout_transform between NCHW and a blocked layout (or two block
    sizes)."""
    if not group.calls or group.calls[-1].op is not LAYOUT_TRANSFORM:
        return False
    if not all(c.op in MOVES for c in group.calls):
        return False
    a = group.calls[-1].attrs
    shape = group.output[0]
    return len(shape) == (5 if a.dst_block else 4) and 0 not in shape and (a.src_block or a.dst_block) > 0


def workload(group: Group, info) -> Workload:
    a = group.calls[-1].attrs
    shape = group.output[0]
    into = bool(a.dst_block)
    block = a.dst_block if into else a.src_block
    channels = shape[1] * block if into else shape[1]
    return Workload.of(f"{NAME}@{VERSION}", group, into_blocks=into, block=block, width=shape[3],
                       whole_blocks=channels % block == 0)


def _tiles(width: int) -> list[int]:
    return divisors(width, MAX_TILE_W)


def space(wl: Workload, info=None) -> Space:
    tiles = _tiles(wl["width"])
    if wl["into_blocks"]:
        return Space.union(Space.of(mode=["vector", "unroll"]), Space.of(mode=["tile"], tile_w=tiles))
    if not wl["whole_blocks"]:  # dropping padded channels: the channel loop does not split into blocks
        return Space.of(mode=["vector"], tile_w=tiles)
    return Space.of(mode=["vector", "unroll", "tile"], tile_w=tiles)


def default(wl: Workload, info=None) -> Config:
    """Unrolled: on ShuffleNet's 8 transform shapes 1.0-3.7x faster than "vector" with AVX-512 code, and with AVX2
    code 1.2-2.4x faster on 7 of them, 3% slower on one."""
    if wl["into_blocks"]:
        return {"mode": "unroll"}
    tile = max(_tiles(wl["width"]))
    return {"mode": "unroll" if wl["whole_blocks"] else "vector", "tile_w": tile}


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    cfg = space(wl).check(cfg)
    root = sch.get_sblock("root")
    *producers, out = sch.get_child_blocks(root)
    for b in producers:
        sch.compute_inline(b)
    mode, tile = cfg["mode"], cfg.get("tile_w")
    if tile is not None and wl["width"] % tile:
        raise InvalidConfig(f"{NAME}: tile_w={tile} does not divide the row of {wl['width']}")
    if wl["into_blocks"]:
        n, cb, h, w, ci = sch.get_loops(out)
        sch.parallel(sch.fuse(n, cb, h))
        if mode == "vector":
            sch.vectorize(ci)
        elif mode == "unroll":
            sch.unroll(ci)
        else:
            wo, wi = sch.split(w, factors=[None, tile])
            sch.reorder(wo, ci, wi)
            sch.unroll(ci)
            sch.unroll(wi)
        return [f"layout_transform(into, {mode}{f', w={tile}' if mode == 'tile' else ''})"]
    n, c, h, w = sch.get_loops(out)
    wo, wi = sch.split(w, factors=[None, tile])
    if mode == "vector":
        sch.parallel(sch.fuse(n, c, h))
        sch.vectorize(wi)
    else:
        cb, ci = sch.split(c, factors=[None, wl["block"]])
        if mode == "unroll":
            sch.reorder(cb, h, ci, wo, wi)
        else:
            sch.reorder(cb, h, wo, ci, wi)
            sch.unroll(ci)
        sch.parallel(sch.fuse(n, cb, h))
        sch.unroll(wi)
    return [f"layout_transform(out of blocks, {mode}, w={tile})"]


TEMPLATE = Template(
    NAME, VERSION, "llvm",
    applies=applies, workload=workload, space=space, default=default, schedule=schedule,
    doc="NCHW <-> NCHW[b]c transforms (reshapes and transposes inlined): rows in parallel, the b x W transpose "
        "unrolled for LLVM's SLP vectorizer, the loop nest a knob",
)
