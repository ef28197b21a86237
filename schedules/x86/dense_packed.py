"""Dense on x86 with packed weights [units / block, k, block]: a register tile of `tile_m` rows × `tile_n`
vectors of `block` units accumulates while k runs outside it; each k step loads `tile_n` weight vectors and
broadcasts `tile_m` inputs, then does `tile_m × tile_n` fused multiply-adds. Tiles run in parallel; the
group's epilogue (bias, GELU, residual add) is computed once per output, from the registers, per tile."""

from __future__ import annotations

import math

from kiln.ir.op import OpPattern
from kiln.ir.ops.dense import DENSE_PACKED
from kiln.schedules.loops import divisors
from kiln.schedules.space import Config, Space
from kiln.schedules.target_info import TargetInfo
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

from kiln.errors import InvalidConfig

VERSION = 2
ACCUMULATORS = 24  # of 32 zmm registers: the rest hold the tile_n weight vectors and a broadcast input


def accumulators(lanes: int) -> int:
    """Vector accumulators that fit beside the weight vectors and a broadcast input: of 32 registers on AVX-512
    (and NEON), of 16 on AVX2."""
    return 12 if lanes == 8 else ACCUMULATORS


def register_tile(rows: int, n_blocks: int, k: int, lanes: int, block: int, min_tiles: int) -> Config:
    """The largest tile that fits the accumulator registers, shaped near 8 rows × 3 vectors (measured best on
    AVX-512: 3 weight vectors stream from L2 per k step, 8 broadcasts come from L1; on AVX2, 4 × 3 ymm of
    8-unit blocks at 128 rows, 125-130 GFLOPS on 2 Zen 3 cores against 109-114 for 4 × 1 blocks of 16 = 8
    ymm), with at least `min_tiles` tiles to share between cores when the output has that many. A block of `block` units takes block / lanes vector registers (at least one).
    Shared with batch_matmul; n_outer is the caller's."""
    enough = min(min_tiles, rows * n_blocks)
    per_block = max(1, block // lanes)

    def score(tile: tuple[int, int]):  # accumulators, discounted by how far rows : vectors is from 8 : 3
        tm, tn = tile
        vectors = tm * tn * per_block
        ratio = tm / (tn * per_block)
        return vectors * min(ratio, 8 / 3) / max(ratio, 8 / 3), vectors

    tiles = [(tm, tn) for tn in divisors(n_blocks, 6) for tm in divisors(rows, 16)
             if tm * tn * per_block <= accumulators(lanes) and (rows // tm) * (n_blocks // tn) >= enough]
    tile_m, tile_n = max(tiles, key=score, default=(1, 1))
    return {"tile_m": tile_m, "tile_n": tile_n, "unroll_k": max(divisors(k, 4))}


def tiled_anchor(group: Group, op) -> bool:
    """The group is `op` (the anchor) with an elementwise or broadcast epilogue, whose output is the anchor's
    (perhaps with leading dims broadcast onto it): what tile_registers computes per tile."""
    anchor = group.anchor
    if anchor is None or anchor.op is not op:
        return False
    shape, out = tuple(int(d) for d in anchor.type.shape), group.output[0]
    return (len(shape) >= 2 and len(out) >= len(shape) and out[len(out) - len(shape):] == shape
            and 0 not in out and all(c is anchor or c.op.pattern <= OpPattern.BROADCAST for c in group.calls))


def applies(group: Group) -> bool:
    return tiled_anchor(group, DENSE_PACKED)


def tile_dims(group: Group) -> dict:
    """`rows` is the output's second-to-last dim (tiles stay within one index of the `batches` dims before it);
    shared with the int8 dense."""
    anchor = group.anchor
    out, block = group.output[0], anchor.attrs.block
    return dict(rows=out[-2], n_blocks=out[-1] // block, k=int(anchor.args[0].type.shape[-1]), block=block,
                batches=math.prod(out[:-2]))


def workload(group: Group, info: TargetInfo) -> Workload:
    return Workload.of(f"x86.dense_packed@{VERSION}", group, **tile_dims(group), lanes=info.lanes(32))


def k_chunks(wl: Workload) -> list[int]:
    """Reduction chunks for a long k on AVX2 (see tile_registers): a chunk of the weight panel then stays in L1
    while every row tile reads it, where a whole panel of a 3072-long k (288 KB at 3 ymm) streams from L2 once
    per row tile. FFN 128×3072→768 alone on 2 Zen 3 cores (2026-12-03): 131 GFLOPS whole, 136 at 256 (0.93×
    the time), 135 at 384, 138 at 768; at k = 768 the gain was in the noise, so shorter reductions have no chunk
    knob. AVX-512 (24 accumulators of 32 registers) is unmeasured and keeps its space."""
    k = wl["k"]
    if wl["lanes"] != 8 or wl["rows"] < 16 or k < 2048:
        return []
    return [c for c in (256, 384, 512, 768) if k % c == 0 and c < k]


def space(wl: Workload, info: TargetInfo) -> Space:
    # with one row or one block of units there is one tile along that axis: the tile order changes nothing
    orders = (True, False) if wl["rows"] > 1 and wl["n_blocks"] > 1 else (True,)
    tiles = dict(tile_m=divisors(wl["rows"], 16), tile_n=divisors(wl["n_blocks"], 6), unroll_k=divisors(wl["k"], 4))
    whole = Space.of(**tiles, n_outer=orders)
    chunks = k_chunks(wl)
    if not chunks:
        return whole
    steps = divisors(math.gcd(*chunks), 4)  # an unroll that divides every chunk (3072's 3 divides none)
    return Space.union(whole, Space.of(**{**tiles, "unroll_k": steps}, k_chunk=chunks))  # chunked: n outer


def default(wl: Workload, info: TargetInfo) -> Config:
    tile = register_tile(wl["rows"], wl["n_blocks"], wl["k"], wl["lanes"], wl["block"],
                         min_tiles=-(-8 // wl["batches"]))
    if 256 in k_chunks(wl):
        return {**tile, "k_chunk": 256}
    return {**tile, "n_outer": True}  # a weight panel stays in cache across the rows


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    dense, out = inline_around(sch, "dense_packed")
    tile_registers(sch, dense, out, wl["block"], cfg)
    order = f",k_chunk={cfg['k_chunk']}" if cfg.get("k_chunk") else ",n_outer" if cfg["n_outer"] else ""
    return [f"dense_packed(m={cfg['tile_m']},n={cfg['tile_n']},k={cfg['unroll_k']}{order},block={wl['block']})"]


def inline_around(sch, anchor_name: str):
    """Inline every block but the anchor (the op's own compute) and the output; (anchor, output)."""
    anchor = sch.get_sblock(anchor_name)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for b in blocks[:-1]:
        if not sch.get(b).same_as(sch.get(anchor)):
            sch.compute_inline(b)
    return anchor, sch.get_child_blocks(sch.get_sblock("root"))[-1]


def tile_registers(sch, block, out_block, width: int, cfg: Config) -> None:
    """The register tiling shared with batch_matmul. `block` is (batch..., m, n | k): tiles of tile_m rows ×
    tile_n vectors of `width` columns accumulate in a local buffer (registers, once unrolled), in one parallel
    loop over batches and tiles; the output stage (the copy out, or the group's epilogue reading the
    accumulators) runs per tile after the reduction. A tile never spans two batches: the output stage's
    region per tile must be exact, or tiles would race on rows they share."""
    *batch, m, n, k = sch.get_loops(block)
    n_units, k_extent = int(sch.get(n).extent), int(sch.get(k).extent)
    n_rows = int(sch.get(m).extent)
    tile_m, tile_n, unroll_k = cfg["tile_m"], cfg["tile_n"], cfg["unroll_k"]
    if n_rows % tile_m or n_units % (tile_n * width) or k_extent % unroll_k:
        raise InvalidConfig(f"{cfg} does not tile {n_rows} rows × {n_units} columns (vectors of {width}) "
                            f"× k={k_extent}")
    # "global", not "local": TVM 0.27 allocates a "local" buffer with TVMBackendAllocWorkspace, one call per
    # parallel iteration (4,096 a run of BERT's FFN), and a "global" one under 1 KB on the stack, where LLVM
    # keeps the tile in registers. BERT layer on Zen 3, 15 interleaved rounds: 0.897× the time (14 of 15), as
    # the conv template found (conv2d_nchwc.schedule); a chunked tile's buffer (all rows) is on the heap either way
    copy = sch.cache_write(block, 0, "global")
    if sch.get(out_block).same_as(sch.get(block)):
        out_block = copy  # no epilogue: the copy out of the accumulators is the output stage
    else:
        sch.compute_inline(copy)
    *batch, m, n, k = sch.get_loops(block)
    mo, mi = sch.split(m, factors=[None, tile_m])
    no, nt, nb = sch.split(n, factors=[None, tile_n, width])
    chunk = cfg.get("k_chunk", 0)
    if chunk:
        # each parallel step is one column tile over all the rows; the reduction runs in chunks, each over
        # every row tile before the next, so a chunk of weights (chunk × tile_n vectors) feeds all the row
        # tiles from L1. The rows' partial sums wait in the buffer between chunks (a row tile's accumulators
        # are loaded into registers before its chunk and stored after); the epilogue runs after the last chunk
        if k_extent % chunk or chunk % unroll_k:
            raise InvalidConfig(f"a k chunk of {chunk} does not split k={k_extent} in steps of {unroll_k}")
        kb, ko, ki = sch.split(k, factors=[None, chunk // unroll_k, unroll_k])
        outer, reduce_from = (*batch, no), kb
        sch.reorder(*outer, kb, mo, ko, ki, mi, nt, nb)
    else:
        ko, ki = sch.split(k, factors=[None, unroll_k])
        outer, reduce_from = (*batch, *((no, mo) if cfg["n_outer"] else (mo, no))), ko
        sch.reorder(*outer, ko, ki, mi, nt, nb)
    tile = sch.fuse(*outer)
    sch.parallel(tile)
    for loop in (ki, mi, nt):
        sch.unroll(loop)
    sch.vectorize(nb)
    sch.reverse_compute_at(out_block, tile)
    init = sch.decompose_reduction(block, reduce_from)
    for b in (init, out_block):
        last = sch.get_loops(b)[-1]
        if not sch.get(last).same_as(sch.get(tile)):  # compute_at leaves out unit loops
            sch.vectorize(last)


TEMPLATE = Template(
    "x86.dense_packed", VERSION, "llvm", applies=applies, workload=workload, space=space, default=default,
    schedule=schedule,
    doc="register tiles of rows × packed-weight vectors, k outside, tiles in parallel, epilogue per tile",
)
