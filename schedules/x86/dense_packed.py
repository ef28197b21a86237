"""Dense on x86 with packed weights [units / block, k, block]: a register tile of `tile_m` rows × `tile_n`
vectors of `block` units accumulates while k runs outside it; each k step loads `tile_n` weight vectors and
broadcasts `tile_m` inputs, then does `tile_m × tile_n` fused multiply-adds. Tiles run in parallel; the
group's epilogue (bias, GELU, residual add) is computed once per output, from the registers, per tile."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import InvalidConfig

VERSION = 2
ACCUMULATORS = 24  # of 32 zmm registers: the rest hold the tile_n weight vectors and a broadcast input


@dataclass(frozen=True)
class Config:
    tile_m: int  # rows per tile: each k step broadcasts tile_m inputs
    tile_n: int = 1  # blocks of units per tile: each k step loads tile_n weight vectors
    unroll_k: int = 1  # k steps unrolled per iteration of the k loop
    n_outer: bool = True  # tiles ordered unit blocks outer: a weight panel stays in cache across the rows


def divisors(n: int, upto: int) -> list[int]:
    return [d for d in range(1, min(n, upto) + 1) if n % d == 0]


def space(rows: int, n_blocks: int, k: int) -> dict[str, list]:
    """The knob space the tuner searches; `rows` is the output's second-to-last dim (tiles stay within
    one index of the dims before it). The default lies in it."""
    return {"tile_m": divisors(rows, 16), "tile_n": divisors(n_blocks, 6), "unroll_k": divisors(k, 4),
            "n_outer": [True, False]}


def accumulators(lanes: int) -> int:
    """Vector accumulators that fit beside the weight vectors and a broadcast input: of 32 registers on AVX-512
    (and NEON), of 16 on AVX2."""
    return 12 if lanes == 8 else ACCUMULATORS


def default(rows: int, n_blocks: int, k: int = 1, lanes: int = 16, block: int = 16, min_tiles: int = 8) -> Config:
    """The largest tile that fits the accumulator registers, shaped near 8 rows × 3 vectors (measured best on
    AVX-512: 3 weight vectors stream from L2 per k step, 8 broadcasts come from L1; 4 × 2 ymm on AVX2 at 128
    rows, 103 GFLOPS a core against 72 for 2 × 6), with at least `min_tiles` tiles to share between cores when the output has that many. A block
    of `block` units takes block / lanes vector registers (at least one)."""
    enough = min(min_tiles, rows * n_blocks)
    per_block = max(1, block // lanes)

    def score(c: Config):  # accumulators, discounted by how far rows : vectors is from 8 : 3; then accumulators
        vectors = c.tile_m * c.tile_n * per_block
        ratio = c.tile_m / (c.tile_n * per_block)
        return vectors * min(ratio, 8 / 3) / max(ratio, 8 / 3), vectors

    tiles = [Config(tile_m=tm, tile_n=tn) for tn in divisors(n_blocks, 6) for tm in divisors(rows, 16)
             if tm * tn * per_block <= accumulators(lanes) and (rows // tm) * (n_blocks // tn) >= enough]
    best = max(tiles, key=score, default=Config(tile_m=1, tile_n=1))
    return Config(tile_m=best.tile_m, tile_n=best.tile_n, unroll_k=max(divisors(k, 4)))


def schedule(sch, dense_block, out_block, block: int, cfg: Config) -> list[str]:
    """`dense_block` is (batch..., m, n | k) over packed weights; `out_block` the group's output, same shape."""
    tile_registers(sch, dense_block, out_block, block, cfg)
    order = ",n_outer" if cfg.n_outer else ""
    return [f"dense_packed(m={cfg.tile_m},n={cfg.tile_n},k={cfg.unroll_k}{order},block={block})"]


def tile_registers(sch, block, out_block, width: int, cfg: Config) -> None:
    """The register tiling shared with batch_matmul. `block` is (batch..., m, n | k): tiles of tile_m rows ×
    tile_n vectors of `width` columns accumulate in a local buffer (registers, once unrolled), in one parallel
    loop over batches and tiles; the output stage (the copy out, or the group's epilogue reading the
    accumulators) runs per tile after the reduction. A tile never spans two batches: the output stage's
    region per tile must be exact, or tiles would race on rows they share."""
    copy = sch.cache_write(block, 0, "local")
    if sch.get(out_block).same_as(sch.get(block)):
        out_block = copy  # no epilogue: the copy out of the accumulators is the output stage
    else:
        sch.compute_inline(copy)
    *batch, m, n, k = sch.get_loops(block)
    n_units, k_extent = int(sch.get(n).extent), int(sch.get(k).extent)
    n_rows = int(sch.get(m).extent)
    if n_rows % cfg.tile_m or n_units % (cfg.tile_n * width) or k_extent % cfg.unroll_k:
        raise InvalidConfig(f"{cfg} does not tile {n_rows} rows × {n_units} columns (vectors of {width}) "
                            f"× k={k_extent}")
    mo, mi = sch.split(m, factors=[None, cfg.tile_m])
    no, nt, nb = sch.split(n, factors=[None, cfg.tile_n, width])
    ko, ki = sch.split(k, factors=[None, cfg.unroll_k])
    tiles = (no, mo) if cfg.n_outer else (mo, no)
    sch.reorder(*batch, *tiles, ko, ki, mi, nt, nb)
    tile = sch.fuse(*batch, *tiles)
    sch.parallel(tile)
    for loop in (ki, mi, nt):
        sch.unroll(loop)
    sch.vectorize(nb)
    sch.reverse_compute_at(out_block, tile)
    init = sch.decompose_reduction(block, ko)
    for b in (init, out_block):
        last = sch.get_loops(b)[-1]
        if not sch.get(last).same_as(sch.get(tile)):  # compute_at leaves out unit loops
            sch.vectorize(last)
