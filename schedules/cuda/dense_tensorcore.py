"""Dense, matmul and batch matmul of float16 or bfloat16 on CUDA tensor cores (sm_80 and later), summed in float32,
the epilogue fused in: each warp runs `mma.sync.aligned.m16n8k16` on fragments that `ldmatrix` reads from shared
memory, which `cp.async` fills `stages - 1` k-chunks ahead of the math (a software pipeline).

A thread block computes a `block_m × block_n` tile of the output, each of its warps a `warp_m × warp_n` part of
it in float32 accumulator registers. Per `chunk_k` step the block copies the A tile (block_m × chunk_k) and the
B tile into shared memory with `cp.async` of `vector` elements per thread; rows are padded by PAD elements, so
the eight 16-byte rows one `ldmatrix` phase reads fall in eight different bank groups. After the reduction the
accumulators go through shared memory (float32) to the epilogue (round to the output dtype, bias, activation),
which every thread of the block writes out with vector stores.

Shapes: m × n must be a multiple of a block tile of the space (64 × 128 or 128 × 64 at the smallest) and k of a
32-deep chunk at least twice (k ≥ 64); other shapes are not claimed (`applies` is false, nothing is padded) and
cuda.dense_tiled schedules them. The target's arch is not checked (TargetInfo does not carry it): mma.sync
m16n8k16 on bfloat16 and cp.async need sm_80 or later, as the cuda-sm80 and cuda-sm90 presets are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kiln.ir.ops.dense import DENSE, DENSE_PACKED, MATMUL
from kiln.ir.tvm_import import import_tvm
from kiln.schedules.space import Config, Space
from kiln.schedules.tensor_intrin import register_once
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

from kiln.errors import InvalidConfig

from .threads import WARP, epilogue_group, prepare

VERSION = 1
NAME = "cuda.dense_tensorcore"
MIN_SM = 80  # mma.sync m16n8k16 on f16/bf16 and cp.async: Ampere and later (sm_75 has neither)
DTYPES = ("float16", "bfloat16")
BLOCK_TILES = ((64, 128), (128, 64), (128, 128), (128, 256), (256, 128))  # (block_m, block_n)
WARP_TILES = ((32, 64), (64, 32), (64, 64))  # (warp_m, warp_n): 64 or 128 float32 accumulators per thread
CHUNKS = (32, 64)  # chunk_k: two or four mma k-steps per stage (one step leaves the inner pipeline nothing)
STAGES = (2, 3, 4)
VECTORS = (4, 8)  # elements per cp.async: 8 or 16 bytes
MAX_WARPS = 8  # 256 threads × 255 registers fit one SM's 64 K registers, so every config launches
PAD = 8  # elements (16 bytes) of padding after each shared row: keeps cp.async's 16-byte alignment
SHARED_BYTES = 163 * 1024  # dynamic shared memory a block may opt into on sm_80 (227 KiB on sm_90)
MMA = 16  # the m, n (two n8 halves) and k of one tensorized step
OUT_VECTOR = 4  # float32 elements per thread per epilogue step: one 16-byte shared read
OUT_PAD = 4  # float32 elements of padding after each row of the output tile (keeps 16-byte rows)


def workload(group: Group, info=None) -> Workload:
    gemm = group.anchor
    shape = tuple(int(d) for d in gemm.type.shape)
    x = gemm.args[0].type
    packed = {"block": gemm.attrs.block} if gemm.op is DENSE_PACKED else {}
    return Workload.of(f"{NAME}@{VERSION}", group, batch=math.prod(shape[:-2]), m=shape[-2], n=shape[-1],
                       k=int(x.shape[-1]), dtype=str(x.dtype), b_layout=_b_layout(gemm), **packed)


def _b_layout(gemm) -> str:
    """How B is stored: "nk" (dense's w), "kn" (matmul's b), or "packed" (dense_packed's [n / block, k, block]:
    each 16 columns a [k, 16] tile, read as "kn")."""
    return {DENSE: "nk", MATMUL: "kn"}.get(gemm.op, "packed")


def warps(cfg: Config) -> int:
    return (cfg["block_m"] // cfg["warp_m"]) * (cfg["block_n"] // cfg["warp_n"])


def shared_bytes(wl: Workload, cfg: Config) -> int:
    """The larger of the pipeline's A and B stages (2-byte elements, padded rows) and the float32 output tile:
    the output tile reuses the stages' memory once the reduction is done (TVM merges dynamic shared buffers
    whose lifetimes do not overlap)."""
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["chunk_k"]
    b_tile = {"nk": bn * (bk + PAD), "kn": bk * (bn + PAD)}.get(wl["b_layout"], 0)
    if wl["b_layout"] == "packed":  # [bn / block, bk, block + PAD]
        b_tile = bn // wl["block"] * bk * (wl["block"] + PAD)
    stages = cfg["stages"] * (bm * (bk + PAD) + b_tile) * 2
    return max(stages, bm * (bn + OUT_PAD) * 4)


def check(wl: Workload, cfg: Config) -> None:
    bm, bn, bk, wm, wn = cfg["block_m"], cfg["block_n"], cfg["chunk_k"], cfg["warp_m"], cfg["warp_n"]
    if wl["m"] % bm or wl["n"] % bn:
        raise InvalidConfig(f"{NAME}: block tile {bm}x{bn} does not divide the {wl['m']}x{wl['n']} output")
    if wl["k"] % bk or wl["k"] // bk < cfg["stages"]:
        raise InvalidConfig(f"{NAME}: chunk_k={bk} must divide k={wl['k']} at least stages={cfg['stages']} times")
    if wl["b_layout"] == "packed" and (wl["block"] % MMA or bn % wl["block"]):
        raise InvalidConfig(f"{NAME}: packed block {wl['block']} must be a multiple of {MMA} dividing {bn}")
    if bm % wm or bn % wn or not 1 <= warps(cfg) <= MAX_WARPS:
        raise InvalidConfig(f"{NAME}: warp tile {wm}x{wn} must divide {bm}x{bn} into 1..{MAX_WARPS} warps")
    threads = warps(cfg) * WARP
    if (bm * bk) % (threads * cfg["vector"]) or (bn * bk) % (threads * cfg["vector"]):
        raise InvalidConfig(f"{NAME}: {threads} threads × vector={cfg['vector']} do not evenly copy the tiles")
    if (bm * bn) % (threads * OUT_VECTOR):
        raise InvalidConfig(f"{NAME}: {threads} threads do not evenly write the {bm}x{bn} tile")
    if shared_bytes(wl, cfg) > SHARED_BYTES:
        raise InvalidConfig(f"{NAME}: tiles need {shared_bytes(wl, cfg)} bytes of shared memory")


def space(wl: Workload, info=None) -> Space:
    """Every config that passes `check`: one branch per (block tile, warp tile, chunk_k, stages) that fits,
    with the vector widths that copy its tiles evenly."""
    return tile_space(NAME, wl, (BLOCK_TILES, WARP_TILES, CHUNKS, STAGES), VECTORS, check)


def tile_space(name: str, wl: Workload, tiles, widths, check_) -> Space:
    """The tensor-core templates' space: every (block tile, warp tile, chunk_k, stages) of `tiles` with the
    copy widths of `widths` that `check_` accepts, one branch per tile; InvalidConfig when none fits."""
    block_tiles, warp_tiles, chunks, stages_ = tiles
    branches = []
    for bm, bn in block_tiles:
        for wm, wn in warp_tiles:
            for bk in chunks:
                for stages in stages_:
                    tile = {"block_m": bm, "block_n": bn, "warp_m": wm, "warp_n": wn, "chunk_k": bk,
                            "stages": stages}
                    vectors = [v for v in widths if passes(check_, wl, {**tile, "vector": v})]
                    if vectors:
                        branches.append(Space.of(**tile, vector=vectors))
    if not branches:
        raise InvalidConfig(f"{name}: no tile of the space fits {wl.summary()}")
    return Space.union(*branches)


def passes(check_, wl: Workload, cfg: Config) -> bool:
    try:
        check_(wl, cfg)
    except InvalidConfig:
        return False
    return True


def default(wl: Workload, info=None) -> Config:
    """128 × 128 blocks of four 64 × 64 warps, 32-deep chunks in three stages, 16-byte copies: the tile CUTLASS
    and TVM's MetaSchedule tensor-core rules start from on A100/H100; smaller where the shape asks for it."""
    for bm, bn, wm, wn in ((128, 128, 64, 64), (128, 64, 64, 32), (64, 128, 32, 64), (64, 128, 32, 64)):
        for bk, stages in ((32, 3), (32, 2)):
            cfg = {"block_m": bm, "block_n": bn, "warp_m": wm, "warp_n": wn, "chunk_k": bk, "stages": stages,
                   "vector": 8}
            if passes(check, wl, cfg):
                return cfg
    return next(iter(space(wl)))


def applies(group: Group) -> bool:
    """A float16 or bfloat16 dense or matmul with a 2-D or batched output, summed in float32, with no producer
    fused before it and elementwise/broadcast ops after, whose m, n and k some tile of the space divides."""
    if not epilogue_group(group, (DENSE, DENSE_PACKED, MATMUL)) or group.calls[0] is not group.anchor:
        return False
    gemm = group.anchor
    x, w = (a.type for a in gemm.args[:2])
    if str(x.dtype) not in DTYPES or str(w.dtype) != str(x.dtype) or len(gemm.type.shape) < 2:
        return False
    if (gemm.attrs.out_dtype or "float32") != "float32" and gemm.attrs.out_dtype != str(x.dtype):
        return False  # out_dtype float32, or none: the sum is float32 either way (accumulate.py)
    if gemm.op is MATMUL and (x.ndim < 2 or w.ndim < 2):
        return False
    try:
        space(workload(group))
    except InvalidConfig:
        return False
    return True


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    """Blockize the GEMM into 16 × 16 × 16 steps, tile them over blocks and warps, stage A and B through shared
    memory (cp.async) and warp fragments (ldmatrix), tensorize the math (mma.sync), and write the accumulators
    through shared memory into the group's output block."""
    check(wl, cfg)
    intrin = _intrinsics(wl["dtype"], wl["b_layout"], cfg["vector"])
    n_warps = warps(cfg)
    gemm, out = prepare(sch)
    has_epilogue = not sch.get(out).same_as(sch.get(gemm))
    tiles = tile_gemm(sch, gemm, cfg)

    for operand in (0, 1):  # global → shared, cp.async, vector elements per thread
        copy = sch.cache_read(tiles.tile, operand, "shared.dyn")
        sch.compute_at(copy, tiles.k_chunk)
        loops = sch.get_loops(copy)
        at = next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(tiles.k_chunk)))
        *rows, cols = loops[at + 1:]  # two loops, or three for packed B: [n / block, k, block]
        cols, lanes = sch.split(cols, factors=[None, cfg["vector"]])
        vector = sch.blockize(lanes)
        sch.tensorize(vector, intrin["copy"])
        sch.storage_align(vector, 0, axis=-2, factor=32, offset=PAD)
        _, t_y, t_x = sch.split(sch.fuse(*rows, cols), factors=[None, n_warps, WARP])
        sch.bind(t_y, "threadIdx.y")
        sch.bind(t_x, "threadIdx.x")

    fragments, staged, acc = stage_fragments(sch, tiles)
    epilogue = out if has_epilogue else staged
    if has_epilogue:
        sch.compute_inline(staged)  # the output block reads the float32 tile from shared memory
    sch.reverse_compute_at(epilogue, tiles.bx)
    _, t_y, t_x, lanes = sch.split(sch.fuse(*sch.get_loops(epilogue)[-2:]),
                                   factors=[None, n_warps, WARP, OUT_VECTOR])
    sch.bind(t_y, "threadIdx.y")
    sch.bind(t_x, "threadIdx.x")
    sch.vectorize(lanes)
    tensorize_and_pipeline(sch, tiles, fragments, acc, intrin, cfg["stages"])
    bm, bn, bk, wm, wn = cfg["block_m"], cfg["block_n"], cfg["chunk_k"], cfg["warp_m"], cfg["warp_n"]
    steps = (f"dense_tensorcore.cuda(block={bm}x{bn},warp={wm}x{wn},k={bk},stages={cfg['stages']},"
             f"vector={cfg['vector']},{wl['dtype']})")
    return [steps]


# --- schedule steps conv2d_tensorcore shares ------------------------------------------------------------------

@dataclass
class Tiles:
    """The loops and blocks of a GEMM tiled by `tile_gemm`."""
    tile: Any  # the block of one 16 × 16 × 16 step's loops (what shared and warp copies are cached for)
    step: Any  # the 16 × 16 × 16 step itself, mma.sync replaces it
    bx: Any  # blockIdx.x: the block tiles
    ty: Any  # threadIdx.y: the warps
    k_chunk: Any  # the outer pipeline: chunk_k at a time
    k_step: Any  # the inner pipeline: 16 at a time


def tile_gemm(sch, gemm, cfg: Config) -> Tiles:
    """Blockize the GEMM block (loops *batch, i, j, k) into 16 × 16 × 16 steps, tiled over blocks (blockIdx.x,
    batch on blockIdx.y) and warps (threadIdx.y), k in chunk_k chunks of 16-deep steps."""
    bm, bn, bk, wm, wn = cfg["block_m"], cfg["block_n"], cfg["chunk_k"], cfg["warp_m"], cfg["warp_n"]
    *batch, i, j, k = sch.get_loops(gemm)
    i, i_mma = sch.split(i, factors=[None, MMA])
    j, j_mma = sch.split(j, factors=[None, MMA])
    k, k_mma = sch.split(k, factors=[None, MMA])
    sch.reorder(i, j, k, i_mma, j_mma, k_mma)
    step = gemm  # one 16 × 16 × 16 step, the block mma.sync replaces
    tile = sch.blockize(i_mma)
    i_block, i_warp, i_step = sch.split(i, factors=[None, bm // wm, wm // MMA])
    j_block, j_warp, j_step = sch.split(j, factors=[None, bn // wn, wn // MMA])
    k_chunk, k_step = sch.split(k, factors=[None, bk // MMA])
    sch.reorder(i_block, j_block, i_warp, j_warp, k_chunk, k_step, i_step, j_step)
    bx, ty = sch.fuse(i_block, j_block), sch.fuse(i_warp, j_warp)
    if batch:
        sch.bind(sch.fuse(*batch) if len(batch) > 1 else batch[0], "blockIdx.y")
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    return Tiles(tile, step, bx, ty, k_chunk, k_step)


def stage_fragments(sch, tiles: Tiles):
    """Warp fragments of A and B (shared → registers, per k step) and the accumulators' way out: warp registers
    → a float32 tile in shared.dyn; (fragments, staged, acc). The staged block is what the epilogue reads."""
    fragments = [sch.cache_read(tiles.tile, operand, "warp") for operand in (0, 1)]  # shared → registers, ldmatrix
    for fragment in fragments:
        sch.compute_at(fragment, tiles.k_step)
    staged = sch.cache_write(tiles.tile, 0, "shared.dyn")  # accumulators → shared, for the epilogue
    acc = sch.cache_write(tiles.tile, 0, "warp")
    sch.reverse_compute_at(acc, tiles.ty)
    rows, cols = sch.get_loops(acc)[-2:]
    r_out, r_in = sch.split(rows, factors=[None, MMA])
    c_out, c_in = sch.split(cols, factors=[None, MMA])
    sch.reorder(r_out, c_out, r_in, c_in)
    return fragments, staged, acc


def tensorize_and_pipeline(sch, tiles: Tiles, fragments, acc, intrin: dict[str, str], stages: int) -> None:
    """Zero the accumulators, lay the fragments out for ldmatrix/mma.sync and tensorize loads, math, fill and
    store; then the two software pipelines (chunks `stages` deep with the copies async, k steps 2 deep)."""
    init = sch.decompose_reduction(tiles.tile, tiles.k_chunk)
    loads = []
    for fragment in fragments:
        rows, cols = sch.get_loops(fragment)[-2:]
        r_out, r_in = sch.split(rows, factors=[None, MMA])
        c_out, c_in = sch.split(cols, factors=[None, MMA])
        sch.reorder(r_out, c_out, r_in, c_in)
        loads.append(r_in)
    def fragment_layout(*index):  # (*batch, row, col): batch dims (unit in a block) kept in front
        *batch, r, c = index
        return (*batch, r // MMA, c // MMA, *ldmatrix_layout(r % MMA, c % MMA))

    sch.transform_layout(fragments[0], ("write", 0), fragment_layout)
    sch.transform_layout(fragments[1], ("write", 0), fragment_layout)
    sch.transform_layout(acc, ("read", 0), fragment_layout)
    sch.tensorize(loads[0], intrin["load_a"])
    sch.tensorize(loads[1], intrin["load_b"])
    sch.tensorize(sch.get_loops(tiles.step)[-3], intrin["mma"])
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], intrin["fill"])
    store = sch.blockize(sch.get_loops(acc)[-2])
    sch.tensorize(store, intrin["store"])
    # rows of the float32 tile OUT_PAD apart: the 8 rows one store instruction writes hit 8 bank groups
    sch.storage_align(store, 0, axis=-2, factor=32, offset=OUT_PAD)

    # the outer pipeline's five statements: copy A, copy B, and the inner pipeline's prologue, body, epilogue
    sch.annotate(tiles.k_chunk, "software_pipeline_stage", [0, 0, stages - 1, stages - 1, stages - 1])
    sch.annotate(tiles.k_chunk, "software_pipeline_order", [0, 1, 2, 3, 4])
    sch.annotate(tiles.k_chunk, "software_pipeline_async_stages", [0])
    # the inner one loads the next k-step's fragments while the mma of this one runs
    sch.annotate(tiles.k_step, "software_pipeline_stage", [0, 0, 1])
    sch.annotate(tiles.k_step, "software_pipeline_order", [0, 1, 2])


# --- tensor intrinsics ---------------------------------------------------------------------------------------
# Kiln's own, after TVM 0.27's float16 ones (s_tir/tensor_intrin/cuda.py) with the dtype a parameter (TVM has no
# bfloat16 ldmatrix or mma.sync). Importing that module parses ~150 TVMScript functions for every target (minutes
# on a loaded CI machine); these are the dozen this template uses, registered on first use. cp.async is
# tensorized explicitly, so the copies are asynchronous without the `tirx.use_async_copy` pass option.

def ldmatrix_layout(i, j):
    """(thread, register) of element (i, j) of a 16 × 16 tile in an mma.sync m16n8k16 fragment."""
    return 4 * (i % 8) + (j % 8) // 2, 4 * (j // 8) + (i // 8) * 2 + (j % 2)


def _fragment_element(thread, local):
    """The inverse of ldmatrix_layout for the accumulator tile: (row, column) of a thread's register."""
    return 8 * (local % 4 // 2) + thread // 4, 8 * (local // 4) + (thread % 4) * 2 + (local % 2)


SHORT = {"float16": "fp16", "bfloat16": "bf16"}
LOCAL = MMA * MMA // WARP  # elements of a 16 × 16 tile per thread: 8


def _intrinsics(dtype: str, b_layout: str, vector: int) -> dict[str, str]:
    import_tvm()  # the _register_* below import tvm.script
    trans_b = b_layout == "nk"  # B stored [n, k]: mma's "col" operand as it is; kn and packed: ldmatrix .trans
    return {"copy": _register_copy(dtype, vector), "load_a": _register_ldmatrix(dtype, "A", False),
            "load_b": _register_ldmatrix(dtype, "B", trans_b), "mma": _register_mma(dtype, trans_b),
            "fill": _register_fill(), "store": _register_store()}


def _register(name: str, make) -> str:
    return register_once(name, make)


def _register_copy(dtype: str, lanes: int, unit_dims: int = 0) -> str:
    """`lanes` elements global → shared.dyn by one cp.async (16 bytes: .cg, bypassing L1; 8 bytes: .ca).
    `unit_dims`: the source is read as [lanes, 1, ...] (a 1 × 1 conv's weights [oc, ic, 1, 1], conv2d_tensorcore)."""
    from tvm.script import tirx as T

    nbytes = lanes * 2
    shape = (lanes,) + (1,) * unit_dims

    def make():
        @T.prim_func(s_tir=True)
        def desc(g: T.handle, s: T.handle) -> None:
            G = T.match_buffer(g, shape, dtype, offset_factor=1)
            S = T.match_buffer(s, (lanes,), dtype, offset_factor=1, scope="shared.dyn")
            with T.sblock("root"):
                T.reads(G[0:lanes] if unit_dims == 0 else G[0:lanes, 0:1, 0:1])
                T.writes(S[0:lanes])
                for i in T.serial(lanes):
                    with T.sblock("copy"):
                        vi = T.axis.remap("S", [i])
                        S[vi] = G[vi] if unit_dims == 0 else G[vi, 0, 0]

        @T.prim_func(s_tir=True)
        def impl(g: T.handle, s: T.handle) -> None:
            G = T.match_buffer(g, shape, dtype, offset_factor=1)
            S = T.match_buffer(s, (lanes,), dtype, offset_factor=1, scope="shared.dyn")
            with T.sblock("root"):
                T.reads(G[0:lanes] if unit_dims == 0 else G[0:lanes, 0:1, 0:1])
                T.writes(S[0:lanes])
                # access_ptr("w"): ThreadSync must see the write to shared memory, or the barrier before the
                # next chunk's copies into a stage other warps still read (a write-after-read race) goes
                T.evaluate(T.s_tir.cp_async_raw.legacy(S.access_ptr("w"), 0, G.access_ptr("r"), 0, nbytes,
                                                       dtype=dtype))

        return desc, impl

    return _register(f"kiln_cp_async_{dtype}_x{lanes}" + (f"_unit{unit_dims}" if unit_dims else ""), make)


def _register_ldmatrix(dtype: str, operand: str, transposed: bool) -> str:
    """ldmatrix.x4 of a 16 × 16 tile of 2-byte elements from shared.dyn into the mma fragment layout.
    A is [m, k]; B is [n, k] (`transposed`) or [k, n] (ldmatrix .trans)."""
    from tvm.script import tirx as T

    ldmatrix_transposes = operand == "B" and not transposed
    if operand == "B" and transposed:  # rows are n: matrices 0, 1 are rows 0-7 (k 0-7, 8-15), 2, 3 rows 8-15
        def offset(tx, stride):
            return stride * 8 * (tx // 16) + stride * (tx % 8) + 8 * ((tx % 16) // 8)
    else:
        def offset(tx, stride):
            return stride * (tx % 16) + 8 * (tx // 16)

    def make():
        @T.prim_func(s_tir=True)
        def desc(warp_handle: T.handle, shared_handle: T.handle) -> None:
            shared = T.match_buffer(shared_handle, (MMA, MMA), dtype, align=64, offset_factor=MMA,
                                    scope="shared.dyn")
            warp = T.match_buffer(warp_handle, (WARP, LOCAL), dtype, align=64, offset_factor=MMA, scope="warp")
            with T.sblock("root"):
                T.reads(shared[0:MMA, 0:MMA])
                T.writes(warp[0:WARP, 0:LOCAL])
                for ax0, ax1 in T.grid(MMA, MMA):
                    with T.sblock("shared_warp"):
                        v0, v1 = T.axis.remap("SS", [ax0, ax1])
                        T.reads(shared[v0, v1])
                        thread_id, local_id = T.meta_var(ldmatrix_layout(v0, v1))
                        T.writes(warp[thread_id, local_id])
                        warp[thread_id, local_id] = shared[v0, v1]

        @T.prim_func(s_tir=True)
        def impl(warp_handle: T.handle, shared_handle: T.handle) -> None:
            s0 = T.int32()
            s1 = T.int32()
            shared = T.match_buffer(shared_handle, (MMA, MMA), dtype, align=64, offset_factor=MMA,
                                    scope="shared.dyn", strides=[s0, s1])
            warp = T.match_buffer(warp_handle, (WARP, LOCAL), dtype, align=64, offset_factor=MMA, scope="warp")
            with T.sblock("root"):
                T.reads(shared[0:MMA, 0:MMA])
                T.writes(warp[0:WARP, 0:LOCAL])
                for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                    T.evaluate(T.ptx_legacy.ldmatrix(ldmatrix_transposes, 4, ".b16", warp.data,
                                                     warp.elem_offset + LOCAL * tx, shared.access_ptr("r"),
                                                     offset(tx, s0), dtype=dtype))

        return desc, impl

    kind = "b_trans" if operand == "B" and transposed else operand.lower()
    return _register(f"kiln_ldmatrix_{dtype}_{kind}_dyn", make)


def _register_mma(dtype: str, trans_b: bool) -> str:
    """Two mma.sync.aligned.m16n8k16.row.col.f32 (the two n8 halves of a 16 × 16 × 16 step), float32 sums."""
    from tvm.script import tirx as T
    from tvm.tirx import Cast

    short = SHORT[dtype]

    def make():
        @T.prim_func(s_tir=True)
        def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, (WARP, LOCAL), dtype, align=64, offset_factor=MMA, scope="warp")
            B = T.match_buffer(b, (WARP, LOCAL), dtype, align=64, offset_factor=MMA, scope="warp")
            C = T.match_buffer(c, (WARP, LOCAL), "float32", align=64, offset_factor=MMA, scope="warp")
            with T.sblock("root"):
                T.reads(C[0:WARP, 0:LOCAL], A[0:WARP, 0:LOCAL], B[0:WARP, 0:LOCAL])
                T.writes(C[0:WARP, 0:LOCAL])
                for i, j, k in T.grid(MMA, MMA, MMA):
                    with T.sblock("C"):
                        vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                        b_row, b_col = T.meta_var((vj, vk) if trans_b else (vk, vj))
                        thread_c, local_c = T.meta_var(ldmatrix_layout(vi, vj))
                        thread_a, local_a = T.meta_var(ldmatrix_layout(vi, vk))
                        thread_b, local_b = T.meta_var(ldmatrix_layout(b_row, b_col))
                        T.reads(C[thread_c, local_c], A[thread_a, local_a], B[thread_b, local_b])
                        T.writes(C[thread_c, local_c])
                        C[thread_c, local_c] += Cast("float32", A[thread_a, local_a]) * Cast(
                            "float32", B[thread_b, local_b])

        @T.prim_func(s_tir=True)
        def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, (WARP, LOCAL), dtype, align=64, offset_factor=MMA, scope="warp")
            B = T.match_buffer(b, (WARP, LOCAL), dtype, align=64, offset_factor=MMA, scope="warp")
            C = T.match_buffer(c, (WARP, LOCAL), "float32", align=64, offset_factor=MMA, scope="warp")
            with T.sblock("root"):
                T.reads(C[0:WARP, 0:LOCAL], A[0:WARP, 0:LOCAL], B[0:WARP, 0:LOCAL])
                T.writes(C[0:WARP, 0:LOCAL])
                for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                    T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", short, short, "fp32",
                                                A.data, A.elem_offset + tx * LOCAL, B.data,
                                                B.elem_offset + tx * LOCAL, C.data,
                                                C.elem_offset + tx * LOCAL, False, dtype="float32"))
                    T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", short, short, "fp32",
                                                A.data, A.elem_offset + tx * LOCAL, B.data,
                                                B.elem_offset + tx * LOCAL + LOCAL // 2, C.data,
                                                C.elem_offset + tx * LOCAL + LOCAL // 2, False,
                                                dtype="float32"))

        return desc, impl

    return _register(f"kiln_mma_{dtype}_f32{'_trans_b' if trans_b else ''}", make)


def _register_fill() -> str:
    """Zero a 16 × 16 float32 accumulator tile."""
    from tvm.script import tirx as T
    from tvm.tirx import FloatImm

    zero = FloatImm("float32", 0.0)

    def make():
        @T.prim_func(s_tir=True)
        def desc(a: T.handle) -> None:
            C = T.match_buffer(a, [WARP, LOCAL], dtype="float32", scope="warp")
            with T.sblock("root"):
                T.reads()
                T.writes(C[0:WARP, 0:LOCAL])
                for i0, i1 in T.grid(MMA, MMA):
                    with T.sblock("C_warp"):
                        i, j = T.axis.remap("SS", [i0, i1])
                        thread_id, local_id = T.meta_var(ldmatrix_layout(i, j))
                        T.reads()
                        T.writes(C[thread_id, local_id])
                        C[thread_id, local_id] = zero

        @T.prim_func(s_tir=True)
        def impl(a: T.handle) -> None:
            C = T.match_buffer(a, [WARP, LOCAL], dtype="float32", scope="warp", offset_factor=1)
            with T.sblock("root"):
                T.reads()
                T.writes(C[0:WARP, 0:LOCAL])
                for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                    T.evaluate(T.cuda.mma_fill_legacy(LOCAL, C.data, C.elem_offset, dtype="float32"))

        return desc, impl

    return _register("kiln_mma_fill_f32", make)


def _register_store() -> str:
    """A 16 × 16 float32 accumulator tile to shared.dyn, one element per register (plain stores: the padded
    output tile needs no swizzle to match)."""
    from tvm.script import tirx as T

    def make():
        @T.prim_func(s_tir=True)
        def desc(a: T.handle, c: T.handle) -> None:
            C_warp = T.match_buffer(a, [WARP, LOCAL], dtype="float32", scope="warp")
            C = T.match_buffer(c, [MMA, MMA], dtype="float32", scope="shared.dyn")
            with T.sblock("root"):
                T.reads(C_warp[0:WARP, 0:LOCAL])
                T.writes(C[0:MMA, 0:MMA])
                for i0, i1 in T.grid(MMA, MMA):
                    with T.sblock("C_warp"):
                        v0, v1 = T.axis.remap("SS", [i0, i1])
                        thread_id, local_id = T.meta_var(ldmatrix_layout(v0, v1))
                        T.reads(C_warp[thread_id, local_id])
                        T.writes(C[v0, v1])
                        C[v0, v1] = C_warp[thread_id, local_id]

        @T.prim_func(s_tir=True)
        def impl(a: T.handle, c: T.handle) -> None:
            s0 = T.int32()
            s1 = T.int32()
            C_warp = T.match_buffer(a, [WARP, LOCAL], dtype="float32", scope="warp", offset_factor=1)
            C = T.match_buffer(c, [MMA, MMA], dtype="float32", scope="shared.dyn", offset_factor=1,
                               strides=[s0, s1])
            with T.sblock("root"):
                T.reads(C_warp[0:WARP, 0:LOCAL])
                T.writes(C[0:MMA, 0:MMA])
                for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                    for local_id in T.serial(LOCAL):
                        row, col = T.meta_var(_fragment_element(tx, local_id))
                        C[row, col] = C_warp[tx, local_id]

        return desc, impl

    return _register("kiln_mma_store_f32_shared_dyn", make)


TEMPLATE = Template(
    NAME, VERSION, "cuda",
    applies=applies, workload=workload, space=space, default=default, schedule=schedule, priority=10,
    supports=lambda info: info.sm >= MIN_SM,
    doc=("tensor cores: mma.sync m16n8k16 on ldmatrix fragments, A and B tiles through padded shared memory by "
         "cp.async in a stages-deep software pipeline, float32 sums, the epilogue from a shared float32 tile"),
)
