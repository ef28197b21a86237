"""Direct conv2d on NCHW for x86, with the group's epilogue (bias, residual add, activation) fused in.

Output width is vectorized and an output-channel block unrolled, so a tile of `tile_oc × tile_ow` accumulators
stays in registers while the reduction (input channels × kernel window) runs outside it; the input's padding is
materialized once so the inner loop loads without bounds checks. The knobs are the two tile sizes, or
`direct=False`: the generic schedule, which the default keeps when no tile above 1 fits (a prime width or
channel count) or nothing is summed (a 1x1 conv of one channel per group).
"""

from __future__ import annotations

from kiln.ir.ops.conv import CONV2D
from kiln.schedules.loops import divisors
from kiln.schedules.space import Config, Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload
from kiln.schedules.x86 import generic
from kiln.schedules.x86.conv2d_nchwc import prepare

VERSION = 1
NAME = "x86.conv2d_direct"
MAX_ACCUMULATORS = 8  # accumulator vectors: leaves registers for the input vector and broadcast weights


def applies(group: Group) -> bool:
    """A 2-D NCHW conv with injective producers (inlined into its input) and elementwise epilogues of its output's
    shape (computed per tile)."""
    return group.anchored_by(CONV2D)


def workload(group: Group, info) -> Workload:
    conv = group.anchor
    w = conv.args[1].type
    _, oc, _, ow = (int(d) for d in conv.type.shape)
    return Workload.of(f"{NAME}@{VERSION}", group, lanes=info.lanes(32), out_channels=oc, out_w=ow,
                       groups=conv.attrs.groups, padded=any(conv.attrs.padding),
                       reduction=int(w.shape[1]) * int(w.shape[2]) * int(w.shape[3]))


def _tiles(n: int, upto: int) -> list[int]:
    """Tile sizes above 1 (compute_at drops a unit tile loop, and the tile then has no vector or no rows)."""
    return [d for d in divisors(n, upto) if d > 1]


def _width_tiles(n: int, lanes: int) -> list[int]:
    """Vectorized width tiles: one vector or less, or whole vectors. A width between (28 of 16 lanes) is a
    vector type LLVM legalizes badly: on a 136-channel 28×28 grouped 1x1 conv, 9.0 ms against 0.59 ms at 14."""
    return [d for d in _tiles(n, 2 * lanes) if d <= lanes or d % lanes == 0]


def space(wl: Workload, info=None) -> Space:
    """The direct tiles, and the generic schedule (the only choice when no tile fits, or nothing is summed)."""
    generic_ = Space.of(direct=False)
    tile_oc, tile_ow = _tiles(wl["out_channels"], 16), _width_tiles(wl["out_w"], wl["lanes"])
    if not tile_oc or not tile_ow or wl["reduction"] == 1:
        return generic_
    return Space.union(Space.of(direct=True, tile_oc=tile_oc, tile_ow=tile_ow), generic_)


def default(wl: Workload, info=None) -> Config:
    tile_oc = max(_tiles(wl["out_channels"], MAX_ACCUMULATORS), default=1)
    tile_ow = max(_tiles(wl["out_w"], wl["lanes"]), default=1)
    if tile_oc == 1 or tile_ow == 1 or wl["reduction"] == 1:
        return {"direct": False}
    return {"direct": True, "tile_oc": tile_oc, "tile_ow": tile_ow}


def _prepare(sch, wl: Workload):
    """Every block but the conv inlined; NCHW padding (4-D: n and c run in parallel) materialized once."""
    conv_name = "conv2d_nchw" if wl["groups"] == 1 else "group_conv2d_nchw"  # topi's block names
    return prepare(sch, conv_name, pad_names=("pad_temp",) if wl["padded"] else (), parallel_loops=2)


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    """The conv (n, oc, oh, ow | rc, ry, rx) computed per tile of the output's loops."""
    cfg = space(wl).check(cfg)
    if not cfg["direct"]:
        return generic.schedule(sch, wl, {})
    conv_block, out_block = _prepare(sch, wl)
    steps = []
    # accumulate into a tile-sized local buffer (registers, once unrolled) instead of the full output
    copy = sch.cache_write(conv_block, 0, "local")
    if sch.get(out_block).same_as(sch.get(conv_block)):
        out_block = copy  # no epilogue: the copy out of the accumulators is the output stage
    else:
        sch.compute_inline(copy)
    n, oc, oh, ow = sch.get_loops(out_block)[:4]
    oco, oci = sch.split(oc, factors=[None, cfg["tile_oc"]])
    owo, owi = sch.split(ow, factors=[None, cfg["tile_ow"]])
    sch.reorder(n, oco, oh, owo, oci, owi)
    sch.parallel(sch.fuse(n, oco, oh))
    steps.append(f"direct(oc={cfg['tile_oc']},ow={cfg['tile_ow']})")
    sch.compute_at(conv_block, owo)
    # under the tile: the two spatial loops, then the reduction loops (unit ones dropped by compute_at)
    loops = sch.get_loops(conv_block)[2:]
    c_oci, c_owi, reduce = loops[0], loops[1], loops[2:]
    sch.reorder(*reduce, c_oci, c_owi)
    sch.unroll(c_oci)
    sch.vectorize(c_owi)
    init = sch.decompose_reduction(conv_block, reduce[0])  # after vectorize: TVM checks dataflow on the whole block
    init_loops = sch.get_loops(init)
    sch.vectorize(init_loops[-1])
    sch.vectorize(sch.get_loops(out_block)[-1])
    return steps


TEMPLATE = Template(
    NAME, VERSION, "llvm",
    applies=applies, workload=workload, space=space, default=default, schedule=schedule,
    doc="direct NCHW conv2d: a tile_oc x tile_ow accumulator tile, padding materialized once",
)
