"""image.resize on x86: output rows in parallel, the innermost axis vectorized, with epilogues fused in.

The compute (ir/ops/image.py) first fills small per-axis tables (indices, weights, outside flags; tap-major, so
one tap's entries along the innermost axis are contiguous), then gathers and FMAs. The tables stay separate
stages, computed once per call before the kernel (they cost O(output extent) against O(output size)); every
other block (producers, the resize itself, epilogues) is inlined into the output. The knobs are the vector
tiles: of the output's innermost axis, and of the row buffer when the outer axes are interpolated first.
"""

from __future__ import annotations

from kiln.ir.op import OpPattern
from kiln.ir.ops.image import RESIZE, _resized
from kiln.ir.ops.transform import GATHER_ELEMENTS, GATHER_ND, TAKE
from kiln.schedules.space import Config, Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

VERSION = 1
NAME = "x86.resize"
ROWS = "resize_rows"
TABLE_PREFIXES = ("resize_index", "resize_weight", "resize_outside")
PARALLEL_MIN_ROWS = 64  # outer iterations enough to keep every core of a small CPU busy


def applies(group: Group) -> bool:
    """One resize with elementwise or injective producers and epilogues (a layout_transform into NCHW[b]c after
    it, a reshape): no reduction, no conv, no second resize. With a row buffer, no gather either: the buffer is
    computed at the output's loops, and rows picked by data TVM cannot bound (found by fuzzing)."""
    resizes = group.find(RESIZE)
    if len(resizes) != 1 or not all(c.op.pattern <= OpPattern.INJECTIVE for c in group.calls):
        return False
    return not (_has_rows(resizes[0]) and any(group.find(op) for op in (TAKE, GATHER_ELEMENTS, GATHER_ND)))


def _has_rows(call) -> bool:
    """Whether the compute makes a row buffer: the outer axes interpolated first, then the innermost."""
    a, shape = call.attrs, [int(d) for d in call.args[0].type.shape]
    axes = [ax for ax in range(len(shape)) if _resized(ax, shape[ax], a)]
    return a.mode != "nearest" and len(shape) - 1 in axes and len(axes) > 1


def workload(group: Group, info) -> Workload:
    (resize,) = group.find(RESIZE)
    shape = group.output[0]
    return Workload.of(f"{NAME}@{VERSION}", group, lanes=info.lanes(32), out_w=shape[-1] if shape else 1,
                       out_rank=len(shape), rows=_has_rows(resize))


def space(wl: Workload, info=None) -> Space:
    lanes, out_w = wl["lanes"], wl["out_w"]
    tiles = sorted({1, *[t for t in (lanes // 2, lanes, 2 * lanes) if 1 < t <= out_w]})
    if wl["rows"] and wl["out_rank"] < 2:  # a 1-D output (a reshape after): the row buffer sits in the only loop,
        tiles = [1]                          # which TVM cannot vectorize around it
    if not wl["rows"]:
        return Space.of(tile_w=tiles)
    return Space.of(tile_w=tiles, rows_tile=[lanes // 2, lanes, 2 * lanes])


def default(wl: Workload, info=None) -> Config:
    # gathers: AVX2's vgatherdps measured slower than scalar loads here (bilinear 2x on [1, 64, 37, 41]:
    # 0.6-1.3 ms scalar vs 1.0-1.6 ms 8-wide; bicubic 6.2 vs 11 ms), so the output axis stays scalar
    return {"tile_w": 1, "rows_tile": wl["lanes"]} if wl["rows"] else {"tile_w": 1}


def _is_table(name: str) -> bool:
    return name.startswith(TABLE_PREFIXES)


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    cfg = space(wl).check(cfg)
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    names = [sch.get(b).name_hint for b in blocks]
    if (ROWS in names) != wl["rows"]:
        raise AssertionError(f"{NAME}: the compute's row buffer ({ROWS in names}) disagrees with {wl.summary()}")
    for b, name in zip(blocks[:-1], names[:-1]):
        if not _is_table(name) and name != ROWS:
            sch.compute_inline(b)
    out = sch.get_child_blocks(root)[-1]
    loops = sch.get_loops(out)
    if not loops:
        return ["resize(scalar)"]
    extents = [int(sch.get(loop).extent) for loop in loops]
    if wl["rows"]:  # every outer loop in parallel: one input-width row buffer per output row
        k = len(loops) - 1
    else:  # fuse outer loops (n, c, rows) until there is enough work to share
        k, work = 1, extents[0]
        while k < len(loops) - 1 and work < PARALLEL_MIN_ROWS:
            work *= extents[k]
            k += 1
    if wl["rows"]:  # before fusing: compute_at cannot invert a fused loop's bindings
        rows = sch.get_sblock(ROWS)
        # unit loops kept: with an input row of width 1 the buffer's own inner loop would vanish, and the split
        # below would cut the output's loop under it instead
        sch.compute_at(rows, loops[k - 1], preserve_unit_loops=True)
        inner = sch.get_loops(rows)[-1]
        extent = sch.get(inner).extent  # a constant, or an expression of the loops above (a layout transform)
        if getattr(extent, "value", None) != 1:
            _, vec = sch.split(inner, factors=[None, cfg["rows_tile"]])
            sch.vectorize(vec)
    outer = sch.fuse(*loops[:k]) if k > 1 else loops[0]
    if len(loops) > 1:
        sch.parallel(outer)
    tile = cfg["tile_w"]
    if tile > 1:
        _, vec = sch.split(sch.get_loops(out)[-1], factors=[None, tile])
        sch.vectorize(vec)
    return [f"resize({'rows+' if wl['rows'] else ''}w={tile})"]


TEMPLATE = Template(
    NAME, VERSION, "llvm",
    applies=applies, workload=workload, space=space, default=default, schedule=schedule,
    doc="image.resize: tables once per call, rows in parallel, an optional row buffer, the inner axis tiled",
)
