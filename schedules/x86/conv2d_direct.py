"""Direct conv2d on NCHW for x86, with the group's epilogue (bias, residual add, activation) fused in.

Output width is vectorized and an output-channel block unrolled, so a tile of `tile_oc × tile_ow` accumulators
stays in registers while the reduction (input channels × kernel window) runs outside it; the input's padding is
materialized once so the inner loop loads without bounds checks. The knobs are the two tile sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

VERSION = 1


@dataclass(frozen=True)
class Config:
    tile_oc: int  # output channels unrolled per tile (accumulator rows)
    tile_ow: int  # output columns per vector (accumulator width)


def largest_divisor(n: int, upto: int) -> int:
    return max(d for d in range(1, min(n, upto) + 1) if n % d == 0)


def space(out_channels: int, out_width: int, lanes: int) -> dict[str, list]:
    """The knob space the tuner searches; the default lies in it."""
    return {"tile_oc": [d for d in range(1, min(out_channels, 16) + 1) if out_channels % d == 0],
            "tile_ow": [d for d in range(1, min(out_width, 2 * lanes) + 1) if out_width % d == 0]}


def default(out_channels: int, out_width: int, lanes: int) -> Config:
    # ≤ 8 accumulator vectors: leaves registers for the input vector and broadcast weights
    return Config(tile_oc=largest_divisor(out_channels, 8), tile_ow=largest_divisor(out_width, lanes))


def schedule(sch, conv_block, out_block, cfg: Config) -> list[str]:
    """Schedule `conv_block` (n, oc, oh, ow | rc, ry, rx) computed per tile of `out_block`'s loops."""
    steps = []
    # accumulate into a tile-sized local buffer (registers, once unrolled) instead of the full output
    copy = sch.cache_write(conv_block, 0, "local")
    if sch.get(out_block).same_as(sch.get(conv_block)):
        out_block = copy  # no epilogue: the copy out of the accumulators is the output stage
    else:
        sch.compute_inline(copy)
    n, oc, oh, ow = sch.get_loops(out_block)[:4]
    oco, oci = sch.split(oc, factors=[None, cfg.tile_oc])
    owo, owi = sch.split(ow, factors=[None, cfg.tile_ow])
    sch.reorder(n, oco, oh, owo, oci, owi)
    sch.parallel(sch.fuse(n, oco, oh))
    steps.append(f"direct(oc={cfg.tile_oc},ow={cfg.tile_ow})")
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
