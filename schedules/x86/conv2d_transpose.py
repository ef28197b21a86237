"""Transposed conv2d on NCHW for x86, with the group's epilogue (bias, activation) fused in.

The compute (ir/ops/conv.py) gathers: each output pixel sums only the taps that reach it, and the weights are
repacked [kh, kw, c, oc] so a vector of output channels loads contiguously. A `tile_ow × tile_oc` accumulator
tile (output channels the vector lanes, columns unrolled) stays in registers while the reduction (input
channels × taps) runs outside it: one broadcast input value times one weight vector per FMA. Rows × channel
tiles run in parallel. The knobs are the two tile sizes.
"""

from __future__ import annotations

from kiln.ir.ops.conv import CONV2D_TRANSPOSE
from kiln.schedules.loops import divisors
from kiln.schedules.space import Config, Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

VERSION = 1
NAME = "x86.conv2d_transpose"
ANCHOR, WEIGHTS, PAD = "conv_transpose", "conv_transpose_weight", "conv_transpose_pad"


def applies(group: Group) -> bool:
    """A 2-D transposed conv with injective producers (inlined into its input) and elementwise epilogues of its output's
    shape (computed per tile)."""
    return group.anchored_by(CONV2D_TRANSPOSE)


def workload(group: Group, info) -> Workload:
    _, oc, _, ow = (int(d) for d in group.anchor.type.shape)
    return Workload.of(f"{NAME}@{VERSION}", group, lanes=info.lanes(32), out_channels=oc, out_w=ow)


def space(wl: Workload, info=None) -> Space:
    return Space.of(tile_oc=divisors(wl["out_channels"], 4 * wl["lanes"]), tile_ow=divisors(wl["out_w"], 16))


def default(wl: Workload, info=None) -> Config:
    # ≤ 12 accumulator vectors out of 16 (AVX2) or 32 (AVX-512): room for the weight vectors and a broadcast
    lanes = wl["lanes"]
    oc = max(divisors(wl["out_channels"], 2 * lanes))
    vectors = -(-oc // lanes)
    return {"tile_oc": oc, "tile_ow": max(divisors(wl["out_w"], max(1, 12 // vectors)))}


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    """Schedule a group holding WEIGHTS and ANCHOR (n, oc, oh, ow | rc, ry, rx) and elementwise epilogues."""
    cfg = space(wl).check(cfg)
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    names = [sch.get(b).name_hint for b in blocks]
    for b, name in zip(blocks[:-1], names[:-1]):
        if name == PAD:  # materialized once (parallel, vectorized): the inner loop then loads unchecked
            loops = sch.get_loops(b)
            sch.parallel(sch.fuse(*loops[:2]))
            _vectorize(sch, loops[-1])
        elif name not in (ANCHOR, WEIGHTS):
            sch.compute_inline(b)
    weights, conv = sch.get_sblock(WEIGHTS), sch.get_sblock(ANCHOR)
    out = sch.get_child_blocks(root)[-1]
    # the repacked weights: once per call, a copy the size of the weights (vs. H·W FMAs per weight)
    wloops = sch.get_loops(weights)
    _vectorize(sch, wloops[-1])
    # accumulate in a local NHWC tile, so the output-channel vector is contiguous (registers, once unrolled)
    acc = sch.cache_write(conv, 0, "local")
    sch.transform_layout(conv, ("write", 0), lambda n, c, h, w: (n, h, w, c))
    if sch.get(out).same_as(sch.get(conv)):
        out = acc  # no epilogue: the copy out of the accumulators is the output stage
    else:
        sch.compute_inline(acc)
    n, oc, oh, ow, rc, *taps = sch.get_loops(conv)  # TE keeps unit loops; compute_at would drop them
    oco, oci = sch.split(oc, factors=[None, cfg["tile_oc"]])
    owo, owi = sch.split(ow, factors=[None, cfg["tile_ow"]])
    sch.reorder(n, oco, oh, owo, *taps, rc, owi, oci)
    sch.parallel(sch.fuse(n, oco, oh))
    sch.unroll(owi)
    _vectorize(sch, oci)
    init = sch.decompose_reduction(conv, taps[0] if taps else rc)
    _vectorize(sch, sch.get_loops(init)[-1])
    sch.reverse_compute_at(out, owo)
    if len(out_loops := sch.get_loops(out)) > 2:  # under (rows, owo): the tile's own loops, if any remain
        _vectorize(sch, out_loops[-1])
    return [f"conv2d_transpose(oc={cfg['tile_oc']},ow={cfg['tile_ow']})"]


def _vectorize(sch, loop) -> None:
    if int(sch.get(loop).extent) > 1:  # TVM refuses to vectorize a unit loop
        sch.vectorize(loop)


TEMPLATE = Template(
    NAME, VERSION, "llvm",
    applies=applies, workload=workload, space=space, default=default, schedule=schedule,
    doc="transposed conv2d as a gather: a tile_ow x tile_oc accumulator tile, rows x channel tiles in parallel",
)
