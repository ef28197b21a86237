"""A depthwise conv fused into the 1x1 conv that reads it (MobileNet's inverted residual), on NCHW[b]c.

Each core takes whole output rows. For a row, the depthwise conv (with its bias and activation) computes all
channels of that one row into a buffer of C × W floats, which stays in L1; the 1x1 conv then runs its usual
register tiles over the row. The expanded tensor between the two is never written to memory and read back
(for MobileNetV2 that tensor is 6× the channels of the block's input and output). A 1x1 stride-1 conv needs
exactly one input row per output row, so no row is computed twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.ops.blocked import CONV2D_NCHWC
from kiln.schedules.space import Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

from . import conv2d_nchwc

VERSION = 2  # 2: the space's keys are the config's (tile_ow, tile_oc, dw_tile_ow)


@dataclass(frozen=True)
class Config:
    pointwise: conv2d_nchwc.Config  # the 1x1 conv's register tile (its rows_outer is implied: rows split)
    dw_tile_ow: int  # output columns per depthwise register tile


def space(out_w: int, oc_blocks: int) -> Space:
    pw = conv2d_nchwc.space(out_w, oc_blocks)
    return Space.of(tile_ow=pw["tile_ow"], tile_oc=pw["tile_oc"], dw_tile_ow=pw["tile_ow"])


def default(out_w: int, oc_blocks: int, lanes: int, block: int | None = None) -> Config:
    pw = conv2d_nchwc.default(out_w, oc_blocks, lanes, block=block)
    dw = conv2d_nchwc.default(out_w, 1, lanes, depthwise=True)
    return Config(pointwise=pw, dw_tile_ow=dw.tile_ow)


def min_fused_rows(lanes: int) -> int:
    """Output rows below which a depthwise conv stays out of the 1x1 conv after it (passes/fuse_ops.py). On AVX2
    a 7-row stage runs faster unfused: its 7 rows split 4:3 over 2 cores, and the 1x1 conv alone takes the flat
    3 × 4 tile over its 49-wide plane (`conv2d_nchwc._flat_three`) where the fused kernel keeps 4 × 2 per row.
    Zen 3, 2026-12-03, MobileNetV2's four 7-row blocks, stamped per kernel, 15 alternated rounds: unfused
    0.918× the fused kernels' time (faster in 14 of 15), 0.935× with the builds loaded in the other order
    (10 of 15); its 14-row blocks unfused 1.017× and 0.997× (7 of 15 each): they stay fused. AVX-512 keeps 7
    (fused measured faster there before the flat tile, which is off by default there)."""
    return 8 if conv2d_nchwc.registers(lanes) == 12 else 7


def schedule(sch, dw_block, row_block, conv_block, out_block, cfg: Config) -> list[str]:
    """`dw_block` is the depthwise reduction (padding read in place), `row_block` the depthwise output after its
    epilogue (what the 1x1 conv reads; it may be `dw_block` itself), `conv_block` the 1x1 reduction and
    `out_block` the group's output."""
    pw = cfg.pointwise
    if sch.get(out_block).same_as(sch.get(conv_block)):
        out_block = sch.cache_write(conv_block, 0, "global")
    sch.set_scope(conv_block, 0, "global")  # on the stack when under 1 KB: see conv2d_nchwc.schedule
    n, oc, oh, ow, ob, *reduce = sch.get_loops(conv_block)
    oco, oci = sch.split(oc, factors=[None, pw.tile_oc])
    owo, owi = sch.split(ow, factors=[None, pw.tile_ow])
    sch.reorder(n, oh, oco, owo, *reduce, oci, owi, ob)
    row = sch.fuse(n, oh)
    sch.parallel(row)
    sch.unroll(oci)
    sch.unroll(owi)
    sch.vectorize(ob)
    sch.reverse_compute_at(out_block, owo)
    init = sch.decompose_reduction(conv_block, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(out_block)[-1])

    # the depthwise row, computed at the top of each row's iteration
    separate = not sch.get(row_block).same_as(sch.get(dw_block))
    sch.compute_at(row_block, row, preserve_unit_loops=True)
    if separate:
        sch.compute_at(dw_block, row, preserve_unit_loops=True)
        sch.set_scope(dw_block, 0, "local")
    _n, cb, _oh, dow, cc, ry, rx = sch.get_loops(dw_block)[-7:]  # under the row loop, unit ones kept
    dwo, dwi = sch.split(dow, factors=[None, cfg.dw_tile_ow])
    sch.reorder(cb, dwo, ry, rx, dwi, cc)
    sch.unroll(rx)
    sch.unroll(dwi)
    sch.vectorize(cc)
    if separate:
        sch.reverse_compute_at(row_block, dwo)
        sch.vectorize(sch.get_loops(row_block)[-1])
    dinit = sch.decompose_reduction(dw_block, ry)
    sch.vectorize(sch.get_loops(dinit)[-1])
    return [f"dw+1x1(dw_ow={cfg.dw_tile_ow};ow={pw.tile_ow},oc={pw.tile_oc})"]


def _applies(group: Group) -> bool:
    convs = group.find(CONV2D_NCHWC)
    return (len(convs) == 2 and conv2d_nchwc._is_depthwise(convs[0]) and not conv2d_nchwc._is_depthwise(convs[1])
            and group.anchor is convs[1])


def _workload(group: Group, info) -> Workload:
    out = group.anchor.type
    return Workload.of(f"x86.depthwise_pointwise@{VERSION}", group, out_w=out.shape[3],
                       oc_blocks=out.shape[1], out_block=out.shape[4], lanes=info.lanes(32))


def _default(wl: Workload, info) -> dict:
    cfg = default(wl["out_w"], wl["oc_blocks"], wl["lanes"], block=wl["out_block"])
    return {"tile_ow": cfg.pointwise.tile_ow, "tile_oc": cfg.pointwise.tile_oc, "dw_tile_ow": cfg.dw_tile_ow}


def _schedule(sch, wl: Workload, cfg: dict) -> list[str]:
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    i_dw, i_conv = names.index("depthwise_nchwc"), names.index("conv2d_nchwc")
    between = blocks[i_dw + 1:i_conv]
    for b in [*blocks[:i_dw], *between[:-1], *blocks[i_conv + 1:-1]]:
        sch.compute_inline(b)  # padding read in place (bounds-checked); epilogues into their consumers
    dw, conv = blocks[i_dw], blocks[i_conv]
    row = between[-1] if between else dw
    out = sch.get_child_blocks(sch.get_sblock("root"))[-1]
    pw = conv2d_nchwc.Config(tile_ow=cfg["tile_ow"], tile_oc=cfg["tile_oc"])
    return schedule(sch, dw, row, conv, out, Config(pointwise=pw, dw_tile_ow=cfg["dw_tile_ow"]))


TEMPLATE = Template(
    "x86.depthwise_pointwise", VERSION, "llvm",
    applies=_applies, workload=_workload, space=lambda wl, info: space(wl["out_w"], wl["oc_blocks"]),
    default=_default, schedule=_schedule, priority=20,
    doc="a depthwise conv fused into the 1x1 conv after it, one output row at a time",
)
