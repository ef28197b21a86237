"""A depthwise conv fused into the 1x1 conv that reads it (MobileNet's inverted residual), on NCHW[b]c.

Each core takes whole output rows. For a row, the depthwise conv (with its bias and activation) computes all
channels of that one row into a buffer of C × W floats, which stays in L1; the 1x1 conv then runs its usual
register tiles over the row. The expanded tensor between the two is never written to memory and read back
(for MobileNetV2 that tensor is 6× the channels of the block's input and output). A 1x1 stride-1 conv needs
exactly one input row per output row, so no row is computed twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import conv2d_nchwc

VERSION = 1


@dataclass(frozen=True)
class Config:
    pointwise: conv2d_nchwc.Config  # the 1x1 conv's register tile (its rows_outer is implied: rows split)
    dw_tile_ow: int  # output columns per depthwise register tile


def space(out_w: int, oc_blocks: int) -> dict[str, list]:
    pw = conv2d_nchwc.space(out_w, oc_blocks)
    return {"tile_ow": pw["tile_ow"], "tile_oc": pw["tile_oc"], "dw_tile_ow": pw["tile_ow"]}


def default(out_w: int, oc_blocks: int, lanes: int, block: int | None = None) -> Config:
    pw = conv2d_nchwc.default(out_w, oc_blocks, lanes, block=block)
    dw = conv2d_nchwc.default(out_w, 1, lanes, depthwise=True)
    return Config(pointwise=pw, dw_tile_ow=dw.tile_ow)


def schedule(sch, dw_block, row_block, conv_block, out_block, cfg: Config) -> list[str]:
    """`dw_block` is the depthwise reduction (padding read in place), `row_block` the depthwise output after its
    epilogue (what the 1x1 conv reads; it may be `dw_block` itself), `conv_block` the 1x1 reduction and
    `out_block` the group's output."""
    pw = cfg.pointwise
    if sch.get(out_block).same_as(sch.get(conv_block)):
        out_block = sch.cache_write(conv_block, 0, "global")
    sch.set_scope(conv_block, 0, "local")
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
