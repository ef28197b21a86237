"""Direct conv2d on NCHW[b]c for x86 (and any LLVM CPU), with the group's epilogue fused per tile.

A tile of `tile_oc` output-channel blocks × `tile_ow` output columns stays in vector registers: each step of
the reduction (input channel, kernel row, kernel column) broadcasts `tile_ow` input values and loads `tile_oc`
weight vectors of b output channels, then does `tile_oc × tile_ow` fused multiply-adds. Rows × channel
blocks run in parallel. Depthwise convs use the same tiling with the reduction over the window only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kiln.ir.ops.blocked import (
    CONV2D_NCHWC,
    LAYOUT_TRANSFORM,
    ConvNCHWcAttrs,
    LayoutTransformAttrs,
    is_grouped,
)
from kiln.ir.ops.winograd import CONV2D_WINOGRAD, WinogradAttrs
from kiln.ir.ops.winograd import transform_weight as winograd_weight
from kiln.schedules.loops import divisors, n_reduction_axes
from kiln.schedules.space import Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

from kiln.errors import InvalidConfig

from . import winograd

VERSION = 2  # 2: one conv task over direct, im2col and Winograd (the algorithm a knob); k_chunk only where it acts


@dataclass(frozen=True)
class Config:
    tile_ow: int  # output columns per register tile
    tile_oc: int = 1  # output-channel blocks per register tile
    unroll_kw: bool = False  # unroll the kernel-column loop too
    rows_outer: bool = False  # parallel axis: (row, channel block) instead of (channel block, row)
    k_chunk: int = 0  # input-channel blocks per pass over all the rows (0: the whole reduction per tile)
    flat: bool = False  # a pointwise conv's plane as one row (h * W + w): column tiles run on across rows


def registers(lanes: int) -> int:
    """Accumulators that fit beside the broadcast input and the weight vectors: 32 vector registers on
    AVX-512 (and NEON), 16 on AVX2."""
    return 24 if lanes >= 16 else 12 if lanes == 8 else 24


def channel_tile(lanes: int) -> int:
    """Output-channel blocks a pointwise conv's default register tile spans (AVX2's 3 columns × 4 blocks,
    `_flat_three`): the layout pass pads a 1x1 conv's channels to whole tiles where that costs little."""
    return 4 if registers(lanes) == 12 else 1


def space(out_w: int, oc_blocks: int, depthwise: bool = False, three: bool = False) -> dict[str, list]:
    """The knob space the tuner searches; the default lies in it. `three`: a guarded 3-column tile too (AVX2's
    pointwise convs, see `default`)."""
    partial = {t for t in (3,) * three + (4, 8, 12, 16) if t < out_w}  # tails are guarded: any width can take them
    return {
        "tile_ow": sorted(set(divisors(out_w, 32)) | partial),
        "tile_oc": [1] if depthwise else divisors(oc_blocks, 4),
        "unroll_kw": [False, True],
        "rows_outer": [False, True],
        "k_chunk": [0, 2, 4, 8],
    }


def default(
    out_w: int, oc_blocks: int, lanes: int, depthwise: bool = False, block: int | None = None,
    pointwise: bool = False, grouped: bool = False,
) -> Config:
    """A register tile for the shape: measured rules, not a search (the tuner searches `space`)."""
    tile = _default_tile(out_w, oc_blocks, lanes, depthwise, block, pointwise, grouped)
    if _three_columns(out_w, oc_blocks, lanes, pointwise and not (depthwise or grouped)) and \
            tile.tile_ow * tile.tile_oc < 12:
        # AVX2: channel counts are powers of two and planes multiples of 7 (ResNet-50's 14, 28, 56), so no tile
        # of 12 accumulators divides both, and 8 (2 × 4, 4 × 2) leave 4 of the 16 registers idle. A guarded
        # 3 × 4 wastes 1 column in 15 at 14 wide, 2 in 30 at 28. Zen 3, 2026-12-03: ResNet-50 whole, 21
        # interleaved rounds, 0.956× the time (faster in 15), 11 more rounds 0.976× (7); its 14×14 256→1024
        # conv alone 0.93×, 512→128 at 28×28 0.92×, 64→256 at 56×56 0.83×, 256→64 at 56×56 1.09×;
        # MobileNetV2 0.998× (15 rounds)
        return Config(tile_ow=3, tile_oc=4)
    return tile


def _default_tile(out_w: int, oc_blocks: int, lanes: int, depthwise: bool, block: int | None, pointwise: bool,
                  grouped: bool) -> Config:
    regs = registers(lanes)
    if depthwise:  # 9 loads per output vector: short rows and an unrolled window beat wide tiles (15-20%)
        tile_ow = max(divisors(out_w, 8))
        return Config(tile_ow=4 if tile_ow < 4 < out_w else tile_ow, tile_oc=1, unroll_kw=True)
    # Two or three channel blocks × a short row (4-8 columns) beat one block × a long row: each reduction step
    # loads tile_ow inputs and tile_oc weight vectors for tile_ow × tile_oc FMAs, so a squarer tile loads less
    # per FMA (ResNet-50's and MobileNetV2's convs 7-20% faster each). A block narrower than the vector
    # registers (8 channels on AVX-512) may use all 24 registers; a full one stops at 21.
    budget = regs if block is not None and block < lanes else min(regs, 21)
    # a prime width (SqueezeNet's 13): a guarded partial tile of a 1x1 conv beats 13 columns × 1 block (its
    # 1000-class 512→1008 conv 1.35 → 0.81 ms, the model 4.84 → 4.47 ms); under a kh × kw window the guard costs
    # more than it saves (an AlexNet 13-wide conv 2.1 → 3.7 ms); 7 × 1 was not measured. Four columns × as many
    # blocks as fit: 8 × 2 (tails of 5 of 8 columns) ran 1.3-1.6× slower than 4 × 4 on its 13×13 convs (Zen 5,
    # 2026-12-03: 64→256 24.2 → 15.3 µs, 512→64 39.2 → 28.5, 384→64 33.5 → 24.8; ORT 22.2, 36.9, 36.2)
    if pointwise and out_w >= 11 and not [d for d in divisors(out_w) if 4 <= d < out_w]:
        tile_oc = max(d for d in divisors(oc_blocks, 4) if 4 * d <= budget or d == 1)
        if tile_oc > 1:  # one block: the wide partial tile below
            return Config(tile_ow=4, tile_oc=tile_oc)
    tile = _blocks_by_columns(out_w, oc_blocks, budget, (3, 2), least_columns=4)
    if tile:
        return tile
    if budget <= 12 and not grouped:
        # AVX2's 16 registers: a width with no divisor of 4-6 (ResNet-50's 14 and 7, SqueezeNet's 27 and 111)
        # fell to a whole-row tile of one channel block (7 × 1, 9 × 1, 12 × 1), which loads one broadcast per
        # FMA; the searches on Zen 3 (2026-12-03) chose 2-3 columns × 4 blocks, or a guarded 4 × 2, instead:
        # ResNet-50's 14×14 and 7×7 1x1 convs 1.1-2.2× faster in the model, SqueezeNet's first conv 2.2× (the
        # models 0.93× and 0.97×, MobileNetV2 0.89×). ShuffleNet's grouped 7×7 1x1 convs ran 15-20% slower at
        # 4 × 2 in the same search, so a grouped conv keeps the row
        tile = _blocks_by_columns(out_w, oc_blocks, budget, (4, 3, 2), least_columns=2)
        if tile:
            return tile
        if out_w > 4 and oc_blocks % 2 == 0:
            return Config(tile_ow=4, tile_oc=2)
    tile_ow = max(divisors(out_w, regs))
    if tile_ow < 4 and out_w > 4:  # a prime width: a partial tile beats one column at a time
        tile_ow = max(t for t in (4, 8, 12, 16) if t <= regs and t < out_w)
    tile_oc = max(d for d in divisors(oc_blocks, 4) if d * tile_ow <= regs or d == 1)
    return Config(tile_ow=tile_ow, tile_oc=tile_oc)


def _three_columns(out_w: int, oc_blocks: int, lanes: int, pointwise: bool) -> bool:
    """AVX2's guarded 3 columns × 4 channel blocks (12 accumulators), for an ungrouped pointwise conv at least
    14 wide; under a kh × kw window the guard costs more than it saves (see the prime-width rule)."""
    return registers(lanes) == 12 and pointwise and out_w >= 14 and oc_blocks % 4 == 0


def _blocks_by_columns(out_w: int, oc_blocks: int, budget: int, blocks: tuple[int, ...],
                       least_columns: int) -> Config | None:
    """The first of `blocks` channel blocks that divides the channels, × the widest divisor of the row that
    keeps the tile within `budget` accumulators and has at least `least_columns` columns."""
    for toc in blocks:
        if oc_blocks % toc == 0:
            fits = [d for d in divisors(out_w, budget // toc) if d >= least_columns]
            if fits:
                return Config(tile_ow=max(fits), tile_oc=toc)
    return None


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
    per tile after them, so the tile's accumulators are a small buffer that LLVM keeps in registers."""
    if sch.get(out_block).same_as(sch.get(conv_block)):
        out_block = sch.cache_write(conv_block, 0, "global")  # no epilogue: the copy out is the output stage
    # "global", not "local": TVM 0.27 puts a "local" buffer on the heap (TVMBackendAllocWorkspace, one call per
    # parallel iteration) but a "global" one under 1 KB on the stack, where LLVM keeps the tile in registers with
    # no pointer to reason about (whole models, same configs, outputs bit-identical, Zen 5 2026-12-03: SqueezeNet
    # 0.905x, ResNet-50 0.970x, MobileNetV2 0.980x the time); a larger tile is on the heap either way
    sch.set_scope(conv_block, 0, "global")
    if cfg.flat:
        return _schedule_flat(sch, conv_block, out_block, cfg)
    n_red = n_reduction_axes(sch, conv_block)
    n, oc, oh, ow, ob, *reduce = sch.get_loops(conv_block)
    assert len(reduce) == n_red
    oco, oci = sch.split(oc, factors=[None, cfg.tile_oc])
    owo, owi = sch.split(ow, factors=[None, cfg.tile_ow])
    if cfg.k_chunk and len(reduce) == 4 and not cfg.rows_outer:
        return _schedule_k_chunked(sch, conv_block, out_block, cfg, n, oco, oci, oh, owo, owi, ob, reduce)
    outer = (n, oh, oco) if cfg.rows_outer else (n, oco, oh)
    sch.reorder(*outer, owo, *reduce, oci, owi, ob)
    sch.parallel(sch.fuse(*outer))
    rx = [reduce[-2] if len(reduce) == 4 else reduce[-1]] if cfg.unroll_kw else []  # (rco, ry, rx, rci) or (ry, rx)
    finish_tile(sch, conv_block, out_block, [oci, owi, *rx], ob, at=owo, first=reduce[0])
    flags = (",kw" if cfg.unroll_kw else "") + (",rows" if cfg.rows_outer else "")
    return [f"nchwc(ow={cfg.tile_ow},oc={cfg.tile_oc}{flags})"]


def finish_tile(sch, conv_block, out_block, unrolled, vector, at, first) -> None:
    """A register tile's last steps, once its loops are in order: its inner loops unrolled and its vector loop
    vectorized, the epilogue computed under loop `at`, and the accumulators zeroed ahead of `first` (the
    outermost reduction loop inside the tile), the zeroing and the epilogue vectorized too."""
    for loop in unrolled:
        sch.unroll(loop)
    sch.vectorize(vector)
    sch.reverse_compute_at(out_block, at)
    init = sch.decompose_reduction(conv_block, first)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(out_block)[-1])


def _schedule_k_chunked(sch, conv_block, out_block, cfg: Config, n, oco, oci, oh, owo, owi, ob, reduce):
    """The reduction split in chunks of `k_chunk` input blocks, each chunk run over every row of the channel
    tile before the next: a chunk of weights arriving cold from memory then feeds all the rows at once while
    the prefetcher brings the next, instead of the first row waiting for the whole weight slab. The partial
    sums of the tile's rows live in a small local buffer (L1) between chunks; the epilogue runs once at the end."""
    rco, ry, rx, rci = reduce
    rco_o, rco_i = sch.split(rco, factors=[None, cfg.k_chunk])
    sch.reorder(n, oco, rco_o, oh, owo, rco_i, ry, rx, rci, oci, owi, ob)
    sch.parallel(sch.fuse(n, oco))
    finish_tile(sch, conv_block, out_block, [oci, owi, *([rx] if cfg.unroll_kw else [])], ob,
                at=sch.get_loops(conv_block)[0], first=rco_o)
    flags = (",kw" if cfg.unroll_kw else "") + f",k={cfg.k_chunk}"
    return [f"nchwc(ow={cfg.tile_ow},oc={cfg.tile_oc}{flags})"]


def _schedule_flat(sch, conv_block, out_block, cfg: Config) -> list[str]:
    """A 1x1 stride-1 unpadded conv reads and writes its plane as one row: output (h, w) is input (h, w), and
    both are contiguous in h * W + w. So the conv, its output buffer and the epilogue are re-indexed over that
    row and the column tiles run across row ends: one guarded tail per plane instead of one per row. AVX2's
    3-column tile wastes 2 columns in 9 of a 7-wide row, and 1 in 51 of its 49-long plane.

    Channel tiles run in parallel, each over the whole plane; or, with `rows_outer`, tiles of the plane, each
    through every channel tile. The latter reads all the weights once per tile, which pays only where they stay
    in L1 (MobileNetV2's 16→96 and 32→192 convs, 0.82-0.93×); ResNet-50's 56×56 and 28×28 1x1 convs, with
    16-256 KB of weights, ran 1.1-1.5× slower that way. Stretches of a row's length per parallel step would
    keep a channel tile's weights across the stretch, but the stretch's end is a second guard, and with it
    LLVM no longer unswitched the tail's guard out of the reduction (12 FMAs in the kernel, 3× slower)."""
    from tvm.tirx import IndexMap

    loops = sch.get_loops(conv_block)
    width = int(sch.get(loops[3]).extent)
    n_iters = len(sch.get(conv_block).iter_vars)

    def flatten(*v):
        return (v[0], v[1], v[2] * width + v[3], *v[4:])

    sch.transform_layout(conv_block, ("write", 0), lambda n, c, h, w, b: (n, c, h * width + w, b))
    sch.transform_block_layout(conv_block, IndexMap.from_func(flatten, ndim=n_iters, index_dtype="int32"))
    sch.transform_block_layout(out_block, IndexMap.from_func(flatten, ndim=5, index_dtype="int32"))
    n, oc, p, ob, *reduce = sch.get_loops(conv_block)
    oco, oci = sch.split(oc, factors=[None, cfg.tile_oc])
    owo, owi = sch.split(p, factors=[None, cfg.tile_ow])
    if cfg.k_chunk and len(reduce) == 4:  # as `_schedule_k_chunked`, the plane's tiles inside each chunk
        rco, ry, rx, rci = reduce
        rco_o, rco_i = sch.split(rco, factors=[None, cfg.k_chunk])
        sch.reorder(n, oco, rco_o, owo, rco_i, ry, rx, rci, oci, owi, ob)
        sch.parallel(sch.fuse(n, oco))
        at, first = sch.get_loops(conv_block)[0], rco_o
    elif cfg.rows_outer:
        sch.reorder(n, owo, oco, *reduce, oci, owi, ob)
        at, first = sch.fuse(n, owo, oco), reduce[0]
        sch.parallel(at)
    else:
        sch.reorder(n, oco, owo, *reduce, oci, owi, ob)
        sch.parallel(sch.fuse(n, oco))
        at, first = owo, reduce[0]
    finish_tile(sch, conv_block, out_block, [oci, owi], ob, at=at, first=first)
    flags = (",rows" if cfg.rows_outer else "") + (f",k={cfg.k_chunk}" if cfg.k_chunk else "")
    return [f"nchwc(flat,ow={cfg.tile_ow},oc={cfg.tile_oc}{flags})"]


# --- the conv task: direct, im2col and Winograd are values of one knob --------------------------------------
#
# A conv's workload is the same whichever algorithm the graph gave it (the input as n, c, h, w in blocks of
# in_block, the output's blocks, the kernel and its attrs, the epilogue after it), so a tuning record can move
# it to another algorithm: the driver then has passes/alter_layout.py lay the conv out for that algorithm
# (`graph_knobs`), and the tuner measures it through `regroup`.

ALGORITHM = "algorithm"


def _conv_applies(group: Group) -> bool:
    a = group.anchor
    if a is None or len(group.find(CONV2D_NCHWC, CONV2D_WINOGRAD)) != 1:
        return False
    if a.op is CONV2D_WINOGRAD:
        return True
    return a.op is CONV2D_NCHWC and not _is_depthwise(a)


def _is_depthwise(call) -> bool:
    x = call.args[0].type
    channels = x.shape[1] * x.shape[4] if x.ndim == 5 else x.shape[1]
    return call.op is CONV2D_NCHWC and call.attrs.conv.groups > 1 and not is_grouped(call.attrs, channels)


def _conv_dims(group: Group, info) -> dict:
    a = group.anchor
    x, out = a.args[0].type, a.type
    conv = a.attrs.conv
    if x.ndim == 5:
        n, cb, h, w, ib = x.shape
    else:  # plain NCHW read as one block
        n, ib, h, w = x.shape
        cb = 1
    kh, kw = (3, 3) if a.op is CONV2D_WINOGRAD else a.args[1].type.shape[2:4]
    return dict(n=n, c=cb * ib, h=h, w=w, in_block=ib, oc=out.shape[1] * out.shape[4], out_block=out.shape[4],
                out_h=out.shape[2], out_w=out.shape[3], kh=kh, kw=kw, strides=conv.strides, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, dtype=str(x.dtype), lanes=info.lanes(32))


def _conv_workload(group: Group, info) -> Workload:
    a = group.anchor
    calls = group.calls
    after = calls[calls.index(a) + 1:]
    inputs = tuple(_tensor_of(p) for p in group.fn.params if p is not a.args[0] and p is not a.args[1])
    return Workload.of(f"x86.conv2d_nchwc@{VERSION}", group, ops=("conv2d", *(c.op.name for c in after)),
                       inputs=inputs, **_conv_dims(group, info))


def _tensor_of(p):
    return tuple(int(d) for d in p.type.shape), str(p.type.dtype)


def _graph_algorithm(group: Group) -> dict:
    a = group.anchor
    if a.op is CONV2D_WINOGRAD:
        return {ALGORITHM: f"winograd{a.attrs.tile}"}
    return {ALGORITHM: a.attrs.algorithm}


def _choose_workload(wl: Workload):
    from kiln.schedules.choose import ConvWorkload

    return ConvWorkload(wl["n"], wl["c"], wl["h"], wl["w"], wl["oc"], wl["kh"], wl["kw"], wl["strides"],
                        wl["padding"], wl["dilation"], wl["groups"])


def _algorithms(wl: Workload) -> list[str]:
    from kiln.schedules import choose

    if wl["groups"] != 1:
        return [choose.DIRECT]  # grouped convs in blocks (whole vectors per group): direct only
    return choose.candidates(_choose_workload(wl), wl["lanes"])


def _winograd_tiles(wl: Workload, m: int) -> int:
    return wl["n"] * -(-wl["out_h"] // m) * -(-wl["out_w"] // m)


def _weight_bytes(wl: Workload) -> int:
    return 4 * wl["oc"] * (wl["c"] // wl["groups"]) * wl["kh"] * wl["kw"]


def _input_bytes(wl: Workload) -> int:
    """The conv's input as it reads it: padded once (materialized) when the conv pads. An unpadded image with
    too few channels to block (3) is read straight from the caller's NCHW tensor; the template has always
    counted it as 0 bytes (so split by channel), and the first convs of AlexNet, ZFNet and SqueezeNet keep
    that: measured both ways, the difference was lost in noise."""
    p = wl["padding"]
    plain = wl["c"] == wl["in_block"] and not any(wl["c"] % b == 0 for b in (16, 8, 4))
    if plain and not any(p):
        return 0
    return 4 * wl["n"] * wl["c"] * (wl["h"] + p[0] + p[2]) * (wl["w"] + p[1] + p[3])


def _in_blocks(wl: Workload) -> int:
    """Input-channel blocks one output block reduces over (those of its group)."""
    return wl["c"] // wl["in_block"] // wl["groups"]


def _conv_space(wl: Workload, info) -> Space:
    from kiln.schedules import choose

    out_w, ocb = wl["out_w"], wl["oc"] // wl["out_block"]
    pointwise = (wl["kh"], wl["kw"]) == (1, 1) and wl["groups"] == 1
    three = _three_columns(out_w, ocb, wl["lanes"], pointwise) or _flat_three(wl)
    tiles = space(out_w, ocb, three=three)
    unroll = [False, True] if wl["kw"] > 1 else [False]
    # the knob only where the plane can be one row (`_schedule_flat`)
    flat = {"flat": [False, True]} if _flat_applies(wl) else {}
    branches = []
    for algo in _algorithms(wl):
        if algo == choose.DIRECT:
            chunks = [k for k in (2, 4, 8) if k < _in_blocks(wl) and _in_blocks(wl) % k == 0]
            common = dict(algorithm=algo, tile_ow=tiles["tile_ow"], tile_oc=tiles["tile_oc"], unroll_kw=unroll)
            branches.append(Space.of(**common, rows_outer=[True], k_chunk=[0], **flat))
            branches.append(Space.of(**common, rows_outer=[False], k_chunk=[0, *chunks], **flat))
        elif algo == choose.IM2COL:
            branches.append(Space.of(algorithm=algo, tile_ow=tiles["tile_ow"], tile_oc=tiles["tile_oc"],
                                     unroll_kw=unroll, rows_outer=[False, True]))
        else:
            m = 2 if algo == choose.WINOGRAD2 else 4
            knobs = winograd.space(_winograd_tiles(wl, m), ocb)
            branches.append(Space.of(algorithm=algo, tile_p=knobs["tile_p"], tile_k=knobs["tile_k"],
                                     fused=knobs["fused"]))
    return Space.union(*branches)


def _conv_default(wl: Workload, info, fixed: dict | None = None) -> dict:
    from kiln.schedules import choose

    algo = (fixed or {}).get(ALGORITHM) or choose.choose(_choose_workload(wl), wl["lanes"], info.cores).algorithm
    if algo not in _algorithms(wl):
        algo = choose.DIRECT
    lanes = wl["lanes"]
    if algo in (choose.WINOGRAD2, choose.WINOGRAD4):
        m = 2 if algo == choose.WINOGRAD2 else 4
        ocb = wl["oc"] // wl["out_block"]
        transformed = (m + 2) ** 2 * _weight_bytes(wl) // 9
        cfg = winograd.default(_winograd_tiles(wl, m), lanes, m, ocb, weight_bytes=transformed)
        return {ALGORITHM: algo, "tile_p": cfg.tile_p, "tile_k": cfg.tile_k, "fused": cfg.fused}
    ocb = wl["oc"] // wl["out_block"]
    cfg = default(wl["out_w"], ocb, lanes, False, block=wl["out_block"], pointwise=(wl["kh"], wl["kw"]) == (1, 1),
                  grouped=wl.get("groups", 1) > 1)
    if algo == choose.IM2COL:  # the conv reads the gathered columns, not the input: split by channel
        return {ALGORITHM: algo, "tile_ow": cfg.tile_ow, "tile_oc": cfg.tile_oc, "unroll_kw": cfg.unroll_kw,
                "rows_outer": False}
    cfg = replace(cfg, rows_outer=rows_outer(_weight_bytes(wl), _input_bytes(wl)))
    if _flat_three(wl, info.cores, cfg.rows_outer):
        cfg = Config(tile_ow=3, tile_oc=4, rows_outer=cfg.rows_outer, flat=True)
    # a guarded tile's chunked loops ran 2.1× slower (3 × 4 at 14 wide, Zen 3): chunks only for whole tiles
    whole = (wl["out_h"] * wl["out_w"] if cfg.flat else wl["out_w"]) % cfg.tile_ow == 0
    chunk = k_chunk(cfg, _weight_bytes(wl), ocb, _in_blocks(wl)) if whole else 0
    flat = {"flat": cfg.flat} if _flat_applies(wl) else {}
    return {ALGORITHM: algo, "tile_ow": cfg.tile_ow, "tile_oc": cfg.tile_oc, "unroll_kw": cfg.unroll_kw,
            "rows_outer": cfg.rows_outer, "k_chunk": chunk, **flat}


def _flat_applies(wl: Workload) -> bool:
    """Whether the direct conv can run its plane as one row (`_schedule_flat`): a 1x1 window at stride 1
    with no padding, so that output (h, w) reads input (h, w) alone."""
    return ((wl["kh"], wl["kw"]) == (1, 1) and tuple(wl["strides"]) == (1, 1) and not any(wl["padding"])
            and wl["groups"] == 1)


def _flat_three(wl: Workload, cores: int = 1, rows: bool = False) -> bool:
    """AVX2's default for a conv that can run flat: 3 columns × 4 channel blocks (12 of the 16 registers) over
    the plane, whatever its width. With channel tiles in parallel, where they share out evenly over the cores;
    with tiles of the plane in parallel (`rows`, weights smaller than the input), where each tile's pass over
    every channel tile keeps the weights in L1 (at most 4 input blocks and 32 KB; see `_schedule_flat`).
    Zen 3, 2026-12-03, each kernel in its model against the 3 × 4 or 4 × 2 tiles it had per row, both load
    orders: ResNet-50's 7×7 1x1 convs 0.84-0.91×, its 14×14 and 28×28 ones 0.91-1.0×; MobileNetV2's 7×7
    ones 0.87-0.90×, its 16→96 at 112×112 0.86-0.89×, 32→192 at 28×28 0.82-0.93×."""
    ocb = wl["oc"] // wl["out_block"]
    if not (_flat_applies(wl) and registers(wl["lanes"]) == 12 and ocb % 4 == 0 and wl["out_w"] > 3):
        return False  # (a row of 3 or fewer columns: 3 is no partial tile in the space, and the plane is tiny)
    if rows:
        return _in_blocks(wl) <= 4 and _weight_bytes(wl) <= 32 << 10
    steps = wl["n"] * ocb // 4
    return steps % cores == 0 or steps >= 4 * cores


def _conv_schedule(sch, wl: Workload, cfg: dict) -> list[str]:
    names = _block_names(sch)
    actual = ("winograd" if "wino_M" in names else "im2col" if "im2col" in names else "direct")
    algo = cfg[ALGORITHM]
    if not algo.startswith(actual):
        raise InvalidConfig(f"config for {algo}, but the group was laid out for {actual}")
    if actual == "winograd":
        return winograd.schedule(sch, winograd.Config(tile_p=cfg["tile_p"], m=int(algo[-1]),
                                                     tile_k=cfg.get("tile_k", 1), fused=cfg.get("fused", False)))
    conv, out = prepare(sch, "conv2d_nchwc", pad_names=("im2col",) if actual == "im2col" else ("pad",))
    steps = schedule(sch, conv, out, Config(tile_ow=cfg["tile_ow"], tile_oc=cfg["tile_oc"],
                                            unroll_kw=cfg["unroll_kw"], rows_outer=cfg["rows_outer"],
                                            k_chunk=cfg.get("k_chunk", 0), flat=cfg.get("flat", False)))
    return ["im2col+" + steps[0]] if actual == "im2col" else steps


def _block_names(sch) -> set[str]:
    return {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}


def prepare(sch, anchor_name: str, pad_names=("pad",), parallel_loops: int = 3):
    """Inline every block but the anchor; materialize padding once (its outer `parallel_loops` fused and run in
    parallel, the innermost vectorized) so the anchor's inner loop loads without bounds checks. Returns the
    anchor and the group's output block."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    for b, name in zip(blocks[:-1], names[:-1]):
        if name in pad_names:
            loops = sch.get_loops(b)
            sch.parallel(sch.fuse(*loops[:parallel_loops]))
            sch.vectorize(loops[-1])
        elif name != anchor_name:
            sch.compute_inline(b)
    return sch.get_sblock(anchor_name), sch.get_child_blocks(sch.get_sblock("root"))[-1]


def _conv_regroup(fn, knobs: dict):
    """The group with its conv laid out for another algorithm: weights of the new algorithm's packed shape
    (as a parameter: the tuner feeds random ones), the input blocked when Winograd needs it."""
    from kiln.ir import Call, Function, TensorType, Var
    from kiln.ir.visitor import rewrite

    group = Group(fn)
    a = group.anchor
    algo = knobs[ALGORITHM]
    x, w = a.args
    xt = x.type
    ib = xt.shape[4] if xt.ndim == 5 else xt.shape[1]
    c = xt.shape[1] * xt.shape[4] if xt.ndim == 5 else xt.shape[1]
    ob = a.type.shape[4]
    oc = a.type.shape[1] * ob
    conv_attrs = a.attrs.conv
    if algo.startswith("winograd"):
        m = int(algo[-1])
        if xt.ndim != 5:
            x = Call(LAYOUT_TRANSFORM, (x,), LayoutTransformAttrs(0, ib))
        weight = Var(w.name, TensorType((m + 2, m + 2, oc // ob, c, ob), w.type.dtype))
        new = Call(CONV2D_WINOGRAD, (x, weight), WinogradAttrs(conv_attrs, m, ob), a.span)
    else:
        kh, kw = (3, 3) if a.op is CONV2D_WINOGRAD else w.type.shape[2:4]
        weight = Var(w.name, TensorType((oc // ob, c // ib, kh, kw, ib, ob), w.type.dtype))
        new = Call(CONV2D_NCHWC, (x, weight), ConvNCHWcAttrs(conv_attrs, ob, algo), a.span)
    params = tuple(weight if p is w else p for p in fn.params)
    body = rewrite(fn.body, lambda e: new if e is a or (isinstance(e, Call) and e.op is a.op and e.args == a.args
                                                          and e.attrs == a.attrs) else None)
    return Function(params, body, fn.attrs)


def _conv_valid_inputs(fn, arrays: dict, rng) -> dict:
    """Winograd's weights as the transform of random 3x3 weights."""
    a = Group(fn).anchor
    if a.op is not CONV2D_WINOGRAD:
        return arrays
    i = fn.params.index(a.args[1])
    _, _, ocb, c, ob = a.args[1].type.shape
    w = (rng.standard_normal((ocb * ob, c, 3, 3)) * 0.3).astype(a.args[1].type.dtype)
    return {**arrays, i: winograd_weight(w, a.attrs.tile, ob)}


TEMPLATE = Template(
    "x86.conv2d_nchwc", VERSION, "llvm",
    applies=_conv_applies, workload=_conv_workload, space=_conv_space, default=_conv_default,
    schedule=_conv_schedule, graph_knobs=_graph_algorithm, regroup=_conv_regroup, valid_inputs=_conv_valid_inputs,
    priority=10, added_knobs={"tile_k": 1, "fused": False, "flat": False},  # in the order they were added
    added_values={"tile_ow": (3,)},  # AVX2's guarded 3 columns (a divisor of the width was always there)
    doc="conv2d on NCHW[b]c: direct register tiles, im2col, or Winograd F(2x2)/F(4x4, 3x3)",
)


# --- depthwise convs alone ----------------------------------------------------------------------------------


def _depthwise_applies(group: Group) -> bool:
    convs = group.find(CONV2D_NCHWC)
    return len(convs) == 1 and group.anchor is convs[0] and _is_depthwise(convs[0])


def _depthwise_workload(group: Group, info) -> Workload:
    return Workload.of(f"x86.depthwise_nchwc@{VERSION}", group, **_conv_dims(group, info))


def _depthwise_space(wl: Workload, info) -> Space:
    return Space.of(tile_ow=space(wl["out_w"], 1)["tile_ow"], unroll_kw=[False, True] if wl["kw"] > 1 else [False],
                    rows_outer=[False, True])


def _depthwise_default(wl: Workload, info) -> dict:
    cfg = default(wl["out_w"], wl["oc"] // wl["out_block"], wl["lanes"], True, block=wl["out_block"])
    unroll = cfg.unroll_kw and wl["kw"] > 1
    # the depthwise conv reads its input in place (padding bounds-checked), so the input it reads is unpadded
    unpadded = 4 * wl["n"] * wl["c"] * wl["h"] * wl["w"]
    weights = 4 * wl["c"] * wl["kh"] * wl["kw"]
    # rows in parallel only where they share out evenly over the cores, or are many: MobileNetV2's 7-row
    # depthwise convs (7 rows go 4:3 on 2 cores) split by channel blocks instead took 0.58-0.70× the time in
    # the model (Zen 3, 2026-12-03, stamped per kernel, faster in 14-15 of 15 rounds)
    rows = wl["n"] * wl["out_h"]
    even = rows % info.cores == 0 or rows >= 4 * info.cores
    return {"tile_ow": cfg.tile_ow, "unroll_kw": unroll, "rows_outer": rows_outer(weights, unpadded) and even}


def _depthwise_schedule(sch, wl: Workload, cfg: dict) -> list[str]:
    # padding is read in place, bounds-checked: copying it would double a depthwise conv's memory traffic
    conv, out = prepare(sch, "depthwise_nchwc", pad_names=())
    return schedule(sch, conv, out, Config(tile_ow=cfg["tile_ow"], tile_oc=1, unroll_kw=cfg["unroll_kw"],
                                           rows_outer=cfg["rows_outer"]))


DEPTHWISE = Template(
    "x86.depthwise_nchwc", VERSION, "llvm",
    applies=_depthwise_applies, workload=_depthwise_workload, space=_depthwise_space, default=_depthwise_default,
    schedule=_depthwise_schedule, priority=10,
    doc="depthwise conv on NCHW[b]c: one channel block per vector, rows of the window unrolled",
)

TEMPLATES = (DEPTHWISE,)
