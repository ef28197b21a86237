"""Direct conv2d on NCHW[b]c for x86 (and any LLVM CPU), with the group's epilogue fused per tile.

A tile of `tile_oc` output-channel blocks × `tile_ow` output columns stays in vector registers: each step of
the reduction (input channel, kernel row, kernel column) broadcasts `tile_ow` input values and loads `tile_oc`
weight vectors of b output channels, then does `tile_oc × tile_ow` fused multiply-adds. Rows × channel
blocks run in parallel. Depthwise convs use the same tiling with the reduction over the window only.
"""

from __future__ import annotations

from dataclasses import dataclass

VERSION = 1


@dataclass(frozen=True)
class Config:
    tile_ow: int  # output columns per register tile
    tile_oc: int = 1  # output-channel blocks per register tile
    unroll_kw: bool = False  # unroll the kernel-column loop too
    rows_outer: bool = False  # parallel axis: (row, channel block) instead of (channel block, row)
    k_chunk: int = 0  # input-channel blocks per pass over all the rows (0: the whole reduction per tile)


def divisors(n: int, upto: int) -> list[int]:
    return [d for d in range(1, min(n, upto) + 1) if n % d == 0]


def registers(lanes: int) -> int:
    """Accumulators that fit beside the broadcast input and the weight vectors: 32 vector registers on
    AVX-512 (and NEON), 16 on AVX2."""
    return 24 if lanes >= 16 else 12 if lanes == 8 else 24


def space(out_w: int, oc_blocks: int, depthwise: bool = False) -> dict[str, list]:
    """The knob space the tuner searches; the default lies in it."""
    partial = {t for t in (4, 8, 12, 16) if t < out_w}  # tails are guarded: any width can take them
    return {
        "tile_ow": sorted(set(divisors(out_w, 32)) | partial),
        "tile_oc": [1] if depthwise else divisors(oc_blocks, 4),
        "unroll_kw": [False, True],
        "rows_outer": [False, True],
        "k_chunk": [0, 2, 4, 8],
    }


def default(
    out_w: int, oc_blocks: int, lanes: int, depthwise: bool = False, block: int | None = None
) -> Config:
    """A register tile for the shape: measured rules, not a search (the tuner searches `space`)."""
    regs = registers(lanes)
    if depthwise:  # 9 loads per output vector: short rows and an unrolled window beat wide tiles (15-20%)
        tile_ow = max(divisors(out_w, 8))
        return Config(tile_ow=4 if tile_ow < 4 < out_w else tile_ow, tile_oc=1, unroll_kw=True)
    # Two or three channel blocks × a short row (4-8 columns) beat one block × a long row: each reduction step
    # loads tile_ow inputs and tile_oc weight vectors for tile_ow × tile_oc FMAs, so a squarer tile loads less
    # per FMA (ResNet-50's and MobileNetV2's convs 7-20% faster each). A block narrower than the vector
    # registers (8 channels on AVX-512) may use all 24 registers; a full one stops at 21.
    budget = regs if block is not None and block < lanes else min(regs, 21)
    for toc in (3, 2):
        if oc_blocks % toc == 0:
            fits = [d for d in divisors(out_w, budget // toc) if d >= 4]
            if fits:
                return Config(tile_ow=max(fits), tile_oc=toc)
    tile_ow = max(divisors(out_w, regs))
    if tile_ow < 4 and out_w > 4:  # a prime width: a partial tile beats one column at a time
        tile_ow = max(t for t in (4, 8, 12, 16) if t <= regs and t < out_w)
    tile_oc = max(d for d in divisors(oc_blocks, 4) if d * tile_ow <= regs or d == 1)
    return Config(tile_ow=tile_ow, tile_oc=tile_oc)


def rows_outer(weight_bytes: int, input_bytes: int) -> bool:
    """Split the parallel work by rows when the weights are smaller than the input: then each core reads all
    the (small) weights but only its own rows, which the previous layer, split the same way, left in its cache
    (MobileNetV2 3.42 -> 3.12 ms on 2 cores). With large weights (ResNet-50's last stages) splitting by output
    channel keeps each core on half of them (ResNet-50 31.5 ms by channels, 37 ms all by rows)."""
    return weight_bytes < input_bytes


def k_chunk(cfg: Config, weight_bytes: int, oc_blocks: int, in_blocks: int) -> int:
    """Chunk the reduction when each channel tile streams a large weight slab (≥ 128 KB) from memory: the
    slab then reaches the rows in pieces the prefetcher can run ahead of (ResNet-50's 1024→256 1x1 at 14x14
    0.372 → 0.338 ms cold, 2048→512 at 7x7 0.435 → 0.418, 512 3x3 at 7x7 0.974 → 0.941; a 320- or 256-channel
    input gains nothing)."""
    if cfg.rows_outer or in_blocks < 16 or in_blocks % 8:
        return 0
    slab = weight_bytes * cfg.tile_oc // max(oc_blocks, 1)
    return 8 if slab >= 128 << 10 else 0


def schedule(sch, conv_block, out_block, cfg: Config) -> list[str]:
    """`conv_block` is (n, oc, oh, ow, ob | reduction...); `out_block` the group's output, same 5-D shape.

    The conv's own loops are tiled (all of them exist here, unit ones included) and the epilogue is computed
    per tile after them, so the tile's accumulators are a small local buffer that LLVM keeps in registers."""
    if sch.get(out_block).same_as(sch.get(conv_block)):
        out_block = sch.cache_write(conv_block, 0, "global")  # no epilogue: the copy out is the output stage
    sch.set_scope(conv_block, 0, "local")
    n_red = sum(1 for iv in sch.get(conv_block).iter_vars if int(iv.iter_type) == 2)
    n, oc, oh, ow, ob, *reduce = sch.get_loops(conv_block)
    assert len(reduce) == n_red
    oco, oci = sch.split(oc, factors=[None, cfg.tile_oc])
    owo, owi = sch.split(ow, factors=[None, cfg.tile_ow])
    if cfg.k_chunk and len(reduce) == 4 and not cfg.rows_outer:
        return _schedule_k_chunked(sch, conv_block, out_block, cfg, n, oco, oci, oh, owo, owi, ob, reduce)
    outer = (n, oh, oco) if cfg.rows_outer else (n, oco, oh)
    sch.reorder(*outer, owo, *reduce, oci, owi, ob)
    sch.parallel(sch.fuse(*outer))
    sch.unroll(oci)
    sch.unroll(owi)
    sch.vectorize(ob)
    if cfg.unroll_kw:
        sch.unroll(reduce[-2] if len(reduce) == 4 else reduce[-1])  # rx: (rco, ry, rx, rci) or (ry, rx)
    sch.reverse_compute_at(out_block, owo)
    init = sch.decompose_reduction(conv_block, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(out_block)[-1])
    flags = (",kw" if cfg.unroll_kw else "") + (",rows" if cfg.rows_outer else "")
    return [f"nchwc(ow={cfg.tile_ow},oc={cfg.tile_oc}{flags})"]


def _schedule_k_chunked(sch, conv_block, out_block, cfg: Config, n, oco, oci, oh, owo, owi, ob, reduce):
    """The reduction split in chunks of `k_chunk` input blocks, each chunk run over every row of the channel
    tile before the next: a chunk of weights arriving cold from memory then feeds all the rows at once while
    the prefetcher brings the next, instead of the first row waiting for the whole weight slab. The partial
    sums of the tile's rows live in a small local buffer (L1) between chunks; the epilogue runs once at the end."""
    rco, ry, rx, rci = reduce
    rco_o, rco_i = sch.split(rco, factors=[None, cfg.k_chunk])
    sch.reorder(n, oco, rco_o, oh, owo, rco_i, ry, rx, rci, oci, owi, ob)
    sch.parallel(sch.fuse(n, oco))
    sch.unroll(oci)
    sch.unroll(owi)
    sch.vectorize(ob)
    if cfg.unroll_kw:
        sch.unroll(rx)
    sch.reverse_compute_at(out_block, sch.get_loops(conv_block)[0])
    init = sch.decompose_reduction(conv_block, rco_o)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(out_block)[-1])
    flags = (",kw" if cfg.unroll_kw else "") + f",k={cfg.k_chunk}"
    return [f"nchwc(ow={cfg.tile_ow},oc={cfg.tile_oc}{flags})"]
