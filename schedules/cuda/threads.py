"""Thread-binding steps shared by the CUDA schedules: spread a loop nest over blockIdx.x × threadIdx.x, and
fetch a shared-memory tile cooperatively with every thread of the block.

Only `blockIdx.x` and `threadIdx.x` are used, so a kernel's launch is one number of blocks × one number of
threads, and a stage computed under a thread loop binds the same `threadIdx.x` extent again (TVM merges them).
"""

from __future__ import annotations

MAX_THREADS = 1024  # per block, on every CUDA GPU since Fermi
WARP = 32
SHARED_BYTES = 48 * 1024  # static shared memory per block on every CUDA GPU
MAX_ACCUMULATORS = 64  # per thread: beyond this the accumulators spill out of registers


def n_reduction_axes(sch, block) -> int:
    return sum(1 for iv in sch.get(block).iter_vars if int(iv.iter_type) == 2)  # 2: CommReduce


def extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def largest_divisor(n: int, upto: int) -> int:
    return max(d for d in range(1, max(1, min(n, upto)) + 1) if n % d == 0)


def divisors(n: int, upto: int | None = None) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and (upto is None or d <= upto)]


def bind_spread(sch, loops, threads: int):
    """Fuse `loops`, split the result into blocks of `threads`, bind; returns (block loop, thread loop).

    Fewer elements than `threads` give one block of exactly that many threads; a remainder is predicated."""
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    total = extent(sch, fused)
    threads = max(1, min(threads, total))
    bx, tx = sch.split(fused, factors=[None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return bx, tx


def cooperative_fetch(sch, block, at_loop, threads: int, vector: int = 1) -> None:
    """Compute a shared-memory copy `block` under `at_loop`, its elements spread over the block's threads."""
    sch.compute_at(block, at_loop)
    loops = sch.get_loops(block)
    at = sch.get(at_loop)
    inner = loops[next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(at)) + 1:]
    fused = sch.fuse(*inner) if len(inner) > 1 else inner[0]
    if vector > 1 and extent(sch, fused) % (threads * vector) == 0:
        _, tx, vec = sch.split(fused, factors=[None, threads, vector])
        sch.vectorize(vec)
    else:
        _, tx = sch.split(fused, factors=[None, threads])
    sch.bind(tx, "threadIdx.x")


def auto_unroll(sch, loop, max_step: int) -> None:
    """Ask TVM's unroller to unroll inner loops of up to `max_step` iterations under `loop`."""
    if max_step > 0:
        sch.annotate(loop, "pragma_auto_unroll_max_step", max_step)
        sch.annotate(loop, "pragma_unroll_explicit", 1)


def buildable_configs(space: dict, make, check, wl):
    """Every config of the knob space `check` accepts for `wl`, in knob order (a tuner's enumeration, the
    tests' samples)."""
    from itertools import product

    from kiln.errors import InvalidConfig

    for values in product(*space.values()):
        cfg = make(**dict(zip(space, values)))
        try:
            check(wl, cfg)
        except InvalidConfig:
            continue
        yield cfg


def check_tiles(template: str, cfg, extents: dict[str, int]) -> None:
    """Each (threads, per-thread) tile pair of `cfg` must divide its loop's extent."""
    from kiln.errors import InvalidConfig

    for name, extent in extents.items():
        t, i = getattr(cfg, name)
        if t < 1 or i < 1 or extent % (t * i):
            raise InvalidConfig(f"{template}: {name}={t}x{i} does not divide {extent}")
