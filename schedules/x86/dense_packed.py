"""Dense on x86 with packed weights [units / block, k, block]: a tile of `tile_m` rows × one `block`-wide vector
of units accumulates in registers while k runs outside it; rows × unit blocks run in parallel; the group's
epilogue (bias, activation) is fused per tile."""

from __future__ import annotations

from dataclasses import dataclass

VERSION = 1


@dataclass(frozen=True)
class Config:
    tile_m: int  # rows per tile: each k step loads one weight vector and broadcasts tile_m inputs


def default(rows: int) -> Config:
    return Config(tile_m=max(d for d in range(1, min(rows, 8) + 1) if rows % d == 0))


def schedule(sch, dense_block, out_block, block: int, cfg: Config) -> list[str]:
    copy = sch.cache_write(dense_block, 0, "local")
    if sch.get(out_block).same_as(sch.get(dense_block)):
        out_block = copy  # no epilogue: the copy out of the accumulators is the output stage
    else:
        sch.compute_inline(copy)
    loops = sch.get_loops(out_block)
    *batch, m, n = loops
    mo, mi = sch.split(m, factors=[None, cfg.tile_m])
    no, ni = sch.split(n, factors=[None, block])
    sch.reorder(*batch, mo, no, mi, ni)
    tile = sch.fuse(*batch, mo, no)
    sch.parallel(tile)
    sch.compute_at(dense_block, tile)
    d_loops = sch.get_loops(dense_block)
    inner = d_loops[1:]  # after the fused parallel loop: [mi], ni, k (unit loops dropped)
    reduce = inner[-1]
    spatial = inner[:-1]
    sch.reorder(reduce, *spatial)
    if len(spatial) == 2:
        sch.unroll(spatial[0])
    sch.vectorize(spatial[-1])
    init = sch.decompose_reduction(dense_block, reduce)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(out_block)[-1])
    return [f"dense_packed(m={cfg.tile_m},block={block})"]
