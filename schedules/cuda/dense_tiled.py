"""Dense, matmul and batch matmul for CUDA (nn.dense, nn.dense_packed, nn.matmul), the epilogue fused in:
the classic tiled GEMM.

Each thread block computes a `tile_m × tile_n` tile of the output (over every batch index), each thread
`per thread` rows × columns of it in local accumulators. The reduction walks k `tile_k` at a time; for each step
the block's threads cooperatively copy the A tile (tile_m × tile_k) and the B tile (tile_k × tile_n, however
the weights are laid out) into shared memory, then every thread accumulates from there.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import InvalidConfig

from .threads import (
    MAX_ACCUMULATORS,
    MAX_THREADS,
    SHARED_BYTES,
    auto_unroll,
    buildable_configs,
    check_tiles,
    cooperative_fetch,
    divisors,
    largest_divisor,
)

VERSION = 1


@dataclass(frozen=True)
class Workload:
    batch: int  # all leading output axes, multiplied
    m: int
    n: int
    k: int
    dtype_bytes: int = 4


@dataclass(frozen=True)
class Config:
    tile_m: tuple[int, int]  # (threads, rows per thread)
    tile_n: tuple[int, int]  # (threads, columns per thread)
    tile_k: int  # k staged in shared memory per reduction step
    unroll: int  # TVM's auto-unroll limit (0: no unrolling)

    @property
    def threads(self) -> int:
        return self.tile_m[0] * self.tile_n[0]


def _pairs(extent: int, max_threads: int, max_inner: int) -> list[tuple[int, int]]:
    return [(t, i) for t in divisors(extent, max_threads) for i in divisors(extent // t, max_inner)]


def space(wl: Workload) -> dict[str, list]:
    return {"tile_m": _pairs(wl.m, 32, 8), "tile_n": _pairs(wl.n, 64, 8), "tile_k": divisors(wl.k, 64),
            "unroll": [0, 16, 64, 256]}


def shared_bytes(wl: Workload, cfg: Config) -> int:
    rows, cols = cfg.tile_m[0] * cfg.tile_m[1], cfg.tile_n[0] * cfg.tile_n[1]
    return (rows + cols) * cfg.tile_k * wl.dtype_bytes


def check(wl: Workload, cfg: Config) -> None:
    check_tiles("dense_tiled.cuda", cfg, {"tile_m": wl.m, "tile_n": wl.n})
    if wl.k % cfg.tile_k:
        raise InvalidConfig(f"dense_tiled.cuda: tile_k={cfg.tile_k} does not divide k={wl.k}")
    if cfg.threads > MAX_THREADS:
        raise InvalidConfig(f"dense_tiled.cuda: {cfg.threads} threads per block, the limit is {MAX_THREADS}")
    if cfg.tile_m[1] * cfg.tile_n[1] > MAX_ACCUMULATORS:
        raise InvalidConfig(f"dense_tiled.cuda: more than {MAX_ACCUMULATORS} accumulators per thread")
    if shared_bytes(wl, cfg) > SHARED_BYTES:
        raise InvalidConfig(f"dense_tiled.cuda: tiles need {shared_bytes(wl, cfg)} bytes of shared memory")


def configs(wl: Workload):
    """Every buildable config, in knob order (for a tuner's enumeration and the tests' samples)."""
    return buildable_configs(space(wl), Config, check, wl)


def default(wl: Workload) -> Config:
    # 8 × 16 threads, each a 4 × 4 register tile: a 32 × 64 block tile; narrower when m is small (batch-1
    # classifiers are a GEMV: all threads go along n)
    t_m = largest_divisor(wl.m, 8)
    i_m = largest_divisor(wl.m // t_m, 4)
    t_n = largest_divisor(wl.n, max(16, 128 // t_m))
    i_n = largest_divisor(wl.n // t_n, 4 if wl.m >= 16 else 2)
    cfg = Config((t_m, i_m), (t_n, i_n), largest_divisor(wl.k, 16), unroll=64)
    check(wl, cfg)
    return cfg


def schedule(sch, gemm, out, wl: Workload, cfg: Config) -> list[str]:
    """Schedule `gemm` (*batch, m, n | k) at the thread tiles of `out`, the group's output block, which is
    `gemm` itself when the group has no epilogue."""
    check(wl, cfg)
    copy = sch.cache_write(gemm, 0, "local")
    if sch.get(out).same_as(sch.get(gemm)):
        out = copy
    else:
        sch.compute_inline(copy)
    *batch, m, n = sch.get_loops(out)
    mo, mt, mi = sch.split(m, factors=[None, *cfg.tile_m])
    no, nt, ni = sch.split(n, factors=[None, *cfg.tile_n])
    sch.reorder(*batch, mo, no, mt, nt, mi, ni)
    bx, tx = sch.fuse(*batch, mo, no), sch.fuse(mt, nt)
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.compute_at(gemm, tx, preserve_unit_loops=True)
    loops = sch.get_loops(gemm)
    k, spatial = loops[-1], loops[2:-1]
    ko, ki = sch.split(k, factors=[None, cfg.tile_k])
    sch.reorder(ko, ki, *spatial)
    a_shared = sch.cache_read(gemm, 0, "shared")
    b_shared = sch.cache_read(gemm, 1, "shared")
    cooperative_fetch(sch, a_shared, ko, cfg.threads)
    cooperative_fetch(sch, b_shared, ko, cfg.threads)
    sch.decompose_reduction(gemm, ko)
    auto_unroll(sch, bx, cfg.unroll)
    return [f"dense_tiled.cuda(m={cfg.tile_m},n={cfg.tile_n},k={cfg.tile_k},threads={cfg.threads})"]
