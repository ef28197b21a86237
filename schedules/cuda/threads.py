"""Thread-binding steps shared by the CUDA schedules: spread a loop nest over blockIdx.x × threadIdx.x, and
fetch a shared-memory tile cooperatively with every thread of the block.

Only `blockIdx.x` and `threadIdx.x` are used, so a kernel's launch is one number of blocks × one number of
threads, and a stage computed under a thread loop binds the same `threadIdx.x` extent again (TVM merges them).
"""

from __future__ import annotations

from kiln.schedules.loops import divisors, n_reduction_axes

MAX_THREADS = 1024  # per block, on every CUDA GPU since Fermi
WARP = 32
SHARED_BYTES = 48 * 1024  # static shared memory per block on every CUDA GPU
MAX_ACCUMULATORS = 64  # per thread: beyond this the accumulators spill out of registers


def extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def largest_divisor(n: int, upto: int) -> int:
    return max(d for d in range(1, max(1, min(n, upto)) + 1) if n % d == 0)


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
    sch.compute_at(block, at_loop, preserve_unit_loops=True)  # a tile of one row keeps its loops to bind
    loops = sch.get_loops(block)
    at = sch.get(at_loop)
    inner = loops[next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(at)) + 1:]
    if not inner:  # a tile of one element
        inner = [sch.add_unit_loop(block)]
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


def thread_pairs(extent: int, max_threads: int, max_inner: int) -> list[tuple[int, int]]:
    """(threads, per thread) splits of a loop: both divide its extent, within the limits."""
    return [(t, i) for t in divisors(extent, max_threads) for i in divisors(extent // t, max_inner)]


def check_tiles(template: str, cfg, extents: dict[str, int]) -> None:
    """Each `<name>_threads` × `<name>_per_thread` pair of `cfg` must divide its loop's extent."""
    from kiln.errors import InvalidConfig

    for name, extent in extents.items():
        t, i = cfg[f"{name}_threads"], cfg[f"{name}_per_thread"]
        if t < 1 or i < 1 or extent % (t * i):
            raise InvalidConfig(f"{template}: {name}={t}x{i} does not divide {extent}")


def dtype_bytes(dtype: str) -> int:
    import tvm

    return max(1, tvm.DataType(str(dtype)).bits // 8)


def epilogue_group(group, anchors) -> bool:
    """The group is one of `anchors` (op handles) with only elementwise and broadcast ops before and after it,
    its output the anchor's shape: the shape the conv and GEMM templates tile (their `applies`)."""
    from kiln.ir.op import OpPattern

    anchor = group.anchor
    if anchor is None or anchor.op not in anchors:
        return False
    if any(c is not anchor and c.op.pattern > OpPattern.BROADCAST for c in group.calls):
        return False
    return group.output[0] == tuple(int(d) for d in anchor.type.shape)


def prepare(sch, keep_input: bool = False):
    """Inline every block but the anchor (the group's one reduction block), the output block and, with
    `keep_input`, the block that writes the anchor's first input (a conv's padded window); (anchor, output)."""
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    (anchor,) = [b for b in blocks if n_reduction_axes(sch, b)]
    data = sch.get(anchor).reads[0].source
    for b in blocks[:-1]:
        if sch.get(b).same_as(sch.get(anchor)) or (keep_input and sch.get(b).writes[0].source.same_as(data)):
            continue
        sch.compute_inline(b)
    return anchor, sch.get_child_blocks(sch.get_sblock("root"))[-1]
