"""Dense, matmul and batch matmul for CUDA (nn.dense, nn.dense_packed, nn.matmul), the epilogue fused in:
the classic tiled GEMM.

Each thread block computes an `m × n` tile of the output (over every batch index), each thread
`m_per_thread` rows × `n_per_thread` columns of it in local accumulators. The reduction walks k `tile_k` at a
time; for each step the block's threads cooperatively copy the A tile (m × tile_k) and the B tile (tile_k × n,
however the weights are laid out) into shared memory, then every thread accumulates from there.
"""

from __future__ import annotations

import math

from kiln.ir.ops.dense import DENSE, DENSE_PACKED, MATMUL
from kiln.schedules.space import Config, Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

from kiln.errors import InvalidConfig

from .threads import (
    MAX_ACCUMULATORS,
    MAX_THREADS,
    SHARED_BYTES,
    auto_unroll,
    check_tiles,
    cooperative_fetch,
    divisors,
    dtype_bytes,
    epilogue_group,
    largest_divisor,
    prepare,
    thread_pairs,
)

VERSION = 1
NAME = "cuda.dense_tiled"
UNROLL = (0, 16, 64, 256)  # TVM's auto-unroll limit (0: no unrolling)
# (most threads, most outputs per thread) along m and n; n goes to 128 threads, where the default puts every
# thread of a batch-1 GEMV
LIMITS = {"m": (32, 8), "n": (128, 8)}


def workload(group: Group, info=None) -> Workload:
    gemm = group.anchor
    shape = tuple(int(d) for d in gemm.type.shape)
    x = gemm.args[0].type
    return Workload.of(f"{NAME}@{VERSION}", group, batch=math.prod(shape[:-2]), m=shape[-2], n=shape[-1],
                       k=int(x.shape[-1]), dtype_bytes=dtype_bytes(x.dtype))


def threads(cfg: Config) -> int:
    return cfg["m_threads"] * cfg["n_threads"]


def shared_bytes(wl: Workload, cfg: Config) -> int:
    rows, cols = cfg["m_threads"] * cfg["m_per_thread"], cfg["n_threads"] * cfg["n_per_thread"]
    return (rows + cols) * cfg["tile_k"] * wl["dtype_bytes"]


def check(wl: Workload, cfg: Config) -> None:
    check_tiles(NAME, cfg, {"m": wl["m"], "n": wl["n"]})
    if wl["k"] % cfg["tile_k"]:
        raise InvalidConfig(f"{NAME}: tile_k={cfg['tile_k']} does not divide k={wl['k']}")
    if threads(cfg) > MAX_THREADS:
        raise InvalidConfig(f"{NAME}: {threads(cfg)} threads per block, the limit is {MAX_THREADS}")
    if cfg["m_per_thread"] * cfg["n_per_thread"] > MAX_ACCUMULATORS:
        raise InvalidConfig(f"{NAME}: more than {MAX_ACCUMULATORS} accumulators per thread")
    if shared_bytes(wl, cfg) > SHARED_BYTES:
        raise InvalidConfig(f"{NAME}: tiles need {shared_bytes(wl, cfg)} bytes of shared memory")


def space(wl: Workload, info=None) -> Space:
    """Every config that passes `check`: one branch per (m, n) × (threads, per thread) tile within
    MAX_THREADS (8 × 8 per thread is MAX_ACCUMULATORS, so every pair fits); in it, tile_k lists only the
    depths whose A and B tiles fit SHARED_BYTES (the bytes grow with tile_k). A tile with no fitting depth has
    no branch."""
    branches = []
    for tm, im in thread_pairs(wl["m"], *LIMITS["m"]):
        for tn, i_n in thread_pairs(wl["n"], *LIMITS["n"]):
            if tm * tn > MAX_THREADS or im * i_n > MAX_ACCUMULATORS:
                continue
            tile = {"m_threads": tm, "m_per_thread": im, "n_threads": tn, "n_per_thread": i_n}
            depths = [d for d in divisors(wl["k"], 64) if shared_bytes(wl, {**tile, "tile_k": d}) <= SHARED_BYTES]
            if depths:
                branches.append(Space.of(**tile, tile_k=depths, unroll=UNROLL))
    return Space.union(*branches)


def default(wl: Workload, info=None) -> Config:
    # 8 × 16 threads, each a 4 × 4 register tile: a 32 × 64 block tile; narrower when m is small (batch-1
    # classifiers are a GEMV: all threads go along n)
    m, n = wl["m"], wl["n"]
    t_m = largest_divisor(m, 8)
    t_n = largest_divisor(n, max(16, 128 // t_m))
    cfg = {"m_threads": t_m, "m_per_thread": largest_divisor(m // t_m, 4), "n_threads": t_n,
           "n_per_thread": largest_divisor(n // t_n, 4 if m >= 16 else 2), "tile_k": largest_divisor(wl["k"], 16),
           "unroll": 64}
    check(wl, cfg)
    return cfg


def applies(group: Group) -> bool:
    """A dense, packed dense or matmul with a 2-D or batched output and elementwise/broadcast ops around it,
    whose default tiles fit shared memory (wide float64 tiles may not: the generic schedule takes them)."""
    if not epilogue_group(group, (DENSE, DENSE_PACKED, MATMUL)) or len(group.anchor.type.shape) < 2:
        return False
    try:
        default(workload(group))
    except InvalidConfig:
        return False
    return True


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    """The GEMM (*batch, m, n | k) at the thread tiles of the group's output block, which is the GEMM's own
    copy out of its accumulators when the group has no epilogue."""
    check(wl, cfg)
    gemm, out = prepare(sch)
    copy = sch.cache_write(gemm, 0, "local")
    if sch.get(out).same_as(sch.get(gemm)):
        out = copy
    else:
        sch.compute_inline(copy)
    *batch, m, n = sch.get_loops(out)
    mo, mt, mi = sch.split(m, factors=[None, cfg["m_threads"], cfg["m_per_thread"]])
    no, nt, ni = sch.split(n, factors=[None, cfg["n_threads"], cfg["n_per_thread"]])
    sch.reorder(*batch, mo, no, mt, nt, mi, ni)
    bx, tx = sch.fuse(*batch, mo, no), sch.fuse(mt, nt)
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.compute_at(gemm, tx, preserve_unit_loops=True)
    loops = sch.get_loops(gemm)
    k, spatial = loops[-1], loops[2:-1]
    ko, ki = sch.split(k, factors=[None, cfg["tile_k"]])
    sch.reorder(ko, ki, *spatial)
    # for the gemm only: an epilogue that reads the same input keeps reading it from global memory
    # (one that read the shared copy outside its tile loop failed compute_at; found by fuzzing)
    a_shared = sch.cache_read(gemm, 0, "shared", consumer_blocks=[gemm])
    b_shared = sch.cache_read(gemm, 1, "shared", consumer_blocks=[gemm])
    cooperative_fetch(sch, a_shared, ko, threads(cfg))
    cooperative_fetch(sch, b_shared, ko, threads(cfg))
    sch.decompose_reduction(gemm, ko)
    auto_unroll(sch, bx, cfg["unroll"])
    tiles = ",".join(f"{axis}=({cfg[axis + '_threads']}, {cfg[axis + '_per_thread']})" for axis in ("m", "n"))
    return [f"dense_tiled.cuda({tiles},k={cfg['tile_k']},threads={threads(cfg)})"]


TEMPLATE = Template(
    NAME, VERSION, "cuda",
    applies=applies, workload=workload, space=space, default=default, schedule=schedule,
    doc=("thread-block tiles of m × n with register accumulators; A and B tiles staged in shared memory "
         "tile_k at a time"),
)
