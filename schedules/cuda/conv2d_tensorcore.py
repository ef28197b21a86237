"""conv2d (NCHW, groups 1) of float16 or bfloat16 on CUDA tensor cores (sm_80 and later) as an implicit GEMM,
summed in float32, the epilogue fused in: C[m, f] = Σ_k A[m, k] · B[f, k] with m = (n, oh, ow), f the output
channel and k = (ic, kh, kw), on dense_tensorcore's intrinsics (mma.sync m16n8k16, ldmatrix, cp.async).

A is the im2col matrix, never written to global memory: the schedule reindexes the conv into GEMM form
(`reindex` + `transform_layout`) and inlines the padded-input gather into the copy that fills the A tile in
shared memory, so each element of a k-chunk is read from the input (zero in the padding) as it is staged. B is
the weight tensor read as [oc, ic·kh·kw], the memory order it already has. Per chunk the B tile goes through
`cp.async` (`vector` elements per copy) when the kernel is 1 × 1, where a row of the tile is a run of one weight
row; for larger kernels the tile's rows cross (ic, kh, kw) boundaries, which no tensorizable copy region
expresses (TVM matches cp.async on a rectangle of the source buffer), so they are plain loads, one element
each, in the same pipeline. The A gather is always plain loads (2-byte elements along k are not contiguous in
NCHW).

m is padded to a whole number of block tiles and k to whole chunks (`pad_einsum`: padding rows and columns
gather zeros, padding rows are not stored), so ResNet's 28 × 28 and 7 × 7 planes and its 3-channel stem
(k = 147) take the template; a 1 × 1 kernel's k must be whole chunks (its cp.async weight rows would run past
it), and n (output channels) a multiple of block_n. The accumulators go through shared memory (float32) to the
group's output block, whose threads walk the tile along m (consecutive output pixels, coalesced NCHW stores).
Nothing here has run on a GPU yet.
"""

from __future__ import annotations

from kiln.ir.ops.conv import CONV2D
from kiln.schedules.space import Config, Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

from kiln.errors import InvalidConfig

from .dense_tensorcore import (
    DTYPES,
    MIN_SM,
    OUT_PAD,
    PAD,
    SHARED_BYTES,
    _intrinsics,
    _register_copy,
    passes,
    stage_fragments,
    tensorize_and_pipeline,
    tile_gemm,
    tile_space,
)
from .threads import WARP, epilogue_group, prepare

VERSION = 1
NAME = "cuda.conv2d_tensorcore"
BLOCK_TILES = ((64, 64), (64, 128), (128, 64), (128, 128))  # (block_m, block_n): ResNet's convs have 64+ channels
WARP_TILES = ((32, 32), (32, 64), (64, 32), (64, 64))  # (warp_m, warp_n)
CHUNKS = (32, 64)  # chunk_k
STAGES = (2, 3, 4)
VECTORS = (4, 8)  # elements per B copy of a 1 x 1 conv (cp.async of 8 or 16 bytes); larger kernels copy 1
MAX_WARPS = 8


def workload(group: Group, info=None) -> Workload:
    conv = group.anchor
    n, oc, oh, ow = (int(d) for d in conv.type.shape)
    x, w = (a.type for a in conv.args[:2])
    _, ic, kh, kw = (int(d) for d in w.shape)
    a = conv.attrs
    return Workload.of(f"{NAME}@{VERSION}", group, n=n, oc=oc, oh=oh, ow=ow, ic=ic, kh=kh, kw=kw,
                       strides=tuple(a.strides), padding=tuple(a.padding), dilation=tuple(a.dilation),
                       dtype=str(x.dtype))


def gemm_dims(wl: Workload) -> tuple[int, int, int]:
    """(m, n, k) of the implicit GEMM."""
    return wl["n"] * wl["oh"] * wl["ow"], wl["oc"], wl["ic"] * wl["kh"] * wl["kw"]


def vectors(wl: Workload) -> tuple[int, ...]:
    """The B copy widths: cp.async of 4 or 8 elements for a 1 × 1 kernel, single elements otherwise (a vector
    of weights across an (ic, kh, kw) boundary is not an affine index to TVM: some tiles vectorize to 16-byte
    loads, others to an 8-lane int64 index the CUDA codegen prints wrongly)."""
    return VECTORS if wl["kh"] * wl["kw"] == 1 else (1,)


def warps(cfg: Config) -> int:
    return (cfg["block_m"] // cfg["warp_m"]) * (cfg["block_n"] // cfg["warp_n"])


def shared_bytes(wl: Workload, cfg: Config) -> int:
    """The pipeline's A and B stages (2-byte elements, padded rows) or the float32 output tile, the larger."""
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["chunk_k"]
    return max(cfg["stages"] * (bm + bn) * (bk + PAD) * 2, bm * (bn + OUT_PAD) * 4)


def check(wl: Workload, cfg: Config) -> None:
    _, n, k = gemm_dims(wl)
    bm, bn, bk, wm, wn = cfg["block_m"], cfg["block_n"], cfg["chunk_k"], cfg["warp_m"], cfg["warp_n"]
    if n % bn:
        raise InvalidConfig(f"{NAME}: block_n={bn} does not divide {n} output channels")
    if wl["kh"] * wl["kw"] == 1 and k % bk:  # the cp.async weight rows must not run past k
        raise InvalidConfig(f"{NAME}: chunk_k={bk} must divide a 1 x 1 conv's k={k}")
    if -(-k // bk) < cfg["stages"]:
        raise InvalidConfig(f"{NAME}: k={k} has fewer chunks of {bk} than stages={cfg['stages']}")
    if bm % wm or bn % wn or not 1 <= warps(cfg) <= MAX_WARPS:
        raise InvalidConfig(f"{NAME}: warp tile {wm}x{wn} must divide {bm}x{bn} into 1..{MAX_WARPS} warps")
    threads = warps(cfg) * WARP
    if cfg["vector"] not in vectors(wl):
        raise InvalidConfig(f"{NAME}: vector={cfg['vector']}: B is copied {vectors(wl)} elements at a time")
    if (bm * bk) % threads or (bn * bk) % (threads * cfg["vector"]) or (bm * bn) % threads:
        raise InvalidConfig(f"{NAME}: {threads} threads × vector={cfg['vector']} do not evenly copy the tiles")
    if shared_bytes(wl, cfg) > SHARED_BYTES:
        raise InvalidConfig(f"{NAME}: tiles need {shared_bytes(wl, cfg)} bytes of shared memory")


def space(wl: Workload, info=None) -> Space:
    """Every config that passes `check`, one branch per (block tile, warp tile, chunk_k, stages)."""
    return tile_space(NAME, wl, (BLOCK_TILES, WARP_TILES, CHUNKS, STAGES), vectors(wl), check)


def default(wl: Workload, info=None) -> Config:
    """128 × 64 blocks of four 64 × 32 warps (64 × 64 when m is small), 32-deep chunks in three stages:
    ResNet's convs have 64 to 512 output channels, and fewer m rows than a GEMM's."""
    m, _, _ = gemm_dims(wl)
    tiles = ((128, 128, 64, 64), (128, 64, 64, 32), (64, 64, 32, 32), (64, 128, 32, 64))
    if m <= 1024:  # a 28 × 28 plane or smaller: more blocks to fill the SMs
        tiles = ((64, 64, 32, 32), (64, 128, 32, 64), (128, 64, 64, 32))
    for bm, bn, wm, wn in tiles:
        for bk, stages in ((32, 3), (32, 2)):
            cfg = {"block_m": bm, "block_n": bn, "warp_m": wm, "warp_n": wn, "chunk_k": bk, "stages": stages,
                   "vector": max(vectors(wl))}
            if passes(check, wl, cfg):
                return cfg
    return next(iter(space(wl)))


def applies(group: Group) -> bool:
    """A float16 or bfloat16 NCHW conv2d with groups 1, rounded back to its input dtype, elementwise and
    broadcast ops after it and none before, whose GEMM n and k some tile of the space divides."""
    if not epilogue_group(group, (CONV2D,)) or group.calls[0] is not group.anchor:
        return False
    conv = group.anchor
    x, w = (a.type for a in conv.args[:2])
    if len(conv.type.shape) != 4 or conv.attrs.groups != 1 or str(x.dtype) not in DTYPES:
        return False
    if str(w.dtype) != str(x.dtype) or str(conv.type.dtype) != str(x.dtype):
        return False  # the sum is float32 (accumulate.py); a float32 output would leave no output block
    try:
        space(workload(group))
    except InvalidConfig:
        return False
    return True


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    """Reindex the conv into a [m, k] × [n, k] GEMM (A gathered from the padded input, B the weights as they
    lie), pad m to the block tile, then dense_tensorcore's steps: 16 × 16 × 16 mma blocks over blocks and warps,
    A and B tiles through shared memory, ldmatrix fragments, mma.sync, and the float32 tile to the output."""
    check(wl, cfg)
    intrin = _intrinsics(wl["dtype"], "nk", 8)  # its copy is not used: A is gathered, B has its own below
    n_warps = warps(cfg)
    conv, out = as_gemm(sch, wl, cfg)
    tiles = tile_gemm(sch, conv, cfg)

    async_b = wl["kh"] * wl["kw"] == 1
    for operand in (0, 1):
        copy = sch.cache_read(tiles.tile, operand, "shared.dyn")
        _inline_producers(sch, copy)  # the gather (or the weight rows) straight into the shared copy
        sch.compute_at(copy, tiles.k_chunk)
        loops = sch.get_loops(copy)
        at = next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(tiles.k_chunk)))
        rows, cols = loops[at + 1:]
        if operand == 1 and async_b:  # w[oc, k, 0, 0]: `vector` weights in a row are one 8- or 16-byte run
            cols, lanes = sch.split(cols, factors=[None, cfg["vector"]])
            vector = sch.blockize(lanes)
            sch.tensorize(vector, _register_copy(wl["dtype"], cfg["vector"], unit_dims=2))
            sch.storage_align(vector, 0, axis=-2, factor=32, offset=PAD)
        else:  # one element per thread and step: the im2col gather, or weights across (ic, kh, kw)
            sch.storage_align(copy, 0, axis=-2, factor=32, offset=PAD)
        _, t_y, t_x = sch.split(sch.fuse(rows, cols), factors=[None, n_warps, WARP])
        sch.bind(t_y, "threadIdx.y")
        sch.bind(t_x, "threadIdx.x")

    fragments, staged, acc = stage_fragments(sch, tiles)
    for block in _consumers_between(sch, staged, out):
        sch.compute_inline(block)  # pad_einsum's copy out of the padded C, when m was padded
    sch.compute_inline(staged)  # the output block reads the float32 tile from shared memory
    sch.reverse_compute_at(out, tiles.bx)
    r, c = sch.get_loops(out)[-2:]
    sch.reorder(c, r)  # threads along m: consecutive output pixels of a channel, coalesced NCHW stores
    _, t_y, t_x = sch.split(sch.fuse(c, r), factors=[None, n_warps, WARP])
    sch.bind(t_y, "threadIdx.y")
    sch.bind(t_x, "threadIdx.x")
    tensorize_and_pipeline(sch, tiles, fragments, acc, intrin, cfg["stages"])
    bm, bn, bk, wm, wn = cfg["block_m"], cfg["block_n"], cfg["chunk_k"], cfg["warp_m"], cfg["warp_n"]
    steps = (f"conv2d_tensorcore.cuda(block={bm}x{bn},warp={wm}x{wn},k={bk},stages={cfg['stages']},"
             f"vector={cfg['vector']},b={'cp.async' if async_b else 'loads'},{wl['dtype']})")
    return [steps]


def as_gemm(sch, wl: Workload, cfg: Config):
    """The group's conv block as C[m, f] += A[m, k] · B[f, k] over m padded to block_m, its output block as
    (m, f); (conv, output block). Still plain TIR: it builds for any target (the tests run it on the CPU)."""
    oh, ow, kh, kw = wl["oh"], wl["ow"], wl["kh"], wl["kw"]
    conv, out = prepare(sch, keep_input=True)
    if sch.get(out).same_as(sch.get(conv)):
        raise InvalidConfig(f"{NAME}: the group has no output block after the conv")  # applies excludes it
    c_back = sch.reindex(conv, ("write", 0))
    sch.reindex(conv, ("read", 0))  # A: the padded input's im2col gather, inlined into the shared copy
    sch.reindex(conv, ("read", 1))  # B: the weights as [oc, k]
    block = sch.get(conv)
    axes = [iv.var for iv in block.iter_vars]  # n, f, y, x, c, r, s
    for kind, index, dims in (("read", 0, "mk"), ("read", 1, "fk"), ("write", 0, "mf")):
        region = (block.reads if kind == "read" else block.writes)[index].region
        present = [next(i for i, v in enumerate(axes) if r.min.same_as(v)) for r in region]
        sch.transform_layout(conv, (kind, index), _gemm_index(present, dims, oh, ow, kh, kw))
    sch.transform_block_layout(conv, lambda n, f, y, x, c, r, s: ((n * oh + y) * ow + x, f, (c * kh + r) * kw + s))
    sch.compute_inline(c_back)  # the output block reads C[m, f]
    sch.transform_block_layout(out, lambda n, f, y, x: ((n * oh + y) * ow + x, f))
    m, _, k = gemm_dims(wl)
    pads = [cfg["block_m"] if m % cfg["block_m"] else 1, 1, cfg["chunk_k"] if k % cfg["chunk_k"] else 1]
    if pads != [1, 1, 1]:  # rows past m and columns past k gather zeros; the output block stops at m
        sch.pad_einsum(conv, pads)
    return conv, out


def _gemm_index(present, dims: str, oh: int, ow: int, kh: int, kw: int):
    """An index map from the conv's axes in `present` (positions in n, f, y, x, c, r, s: a reindexed buffer has
    only the block axes its access uses, so a 1 × 1 kernel's input has no r, s) to the GEMM's `dims`: m is
    (n, y, x) fused, f the output channel, k (c, r, s) fused; an absent axis counts as 0."""
    present = list(present)

    def index(*values):
        v = dict.fromkeys(range(7), 0) | dict(zip(present, values))
        gemm = {"m": (v[0] * oh + v[2]) * ow + v[3], "f": v[1], "k": (v[4] * kh + v[5]) * kw + v[6]}
        return tuple(gemm[d] for d in dims)

    return index


def _inline_producers(sch, block) -> None:
    """Inline every block that (transitively) produces `block`'s input: the reindexed gather, the padded input
    and pad_einsum's zero rows for A, the weight rows for B."""
    while producers := sch.get_producers(block):
        for p in producers:
            sch.compute_inline(p)


def _consumers_between(sch, block, out):
    """Blocks on the way from `block` to the output block `out` (pad_einsum's unpadding copy)."""
    found, current = [], block
    while True:
        consumers = [c for c in sch.get_consumers(current) if not sch.get(c).same_as(sch.get(out))]
        if not consumers:
            return found
        found.append(consumers[0])
        current = consumers[0]


TEMPLATE = Template(
    NAME, VERSION, "cuda",
    applies=applies, workload=workload, space=space, default=default, schedule=schedule, priority=10,
    supports=lambda info: info.sm >= MIN_SM,
    doc=("conv2d as an implicit GEMM on tensor cores: im2col rows gathered into shared memory per k-chunk, "
         "weights as [oc, ic·kh·kw], mma.sync on ldmatrix fragments, float32 sums, the epilogue on store"),
)
