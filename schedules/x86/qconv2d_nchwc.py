"""uint8 × int8 conv on NCHW[b]c: register tiles of int32 lanes fed by vpdpbusd (AVX-512 VNNI), or where there
is no VNNI (AVX2 hosts: AMD Zen 3) by vpmaddubsw + vpmaddwd.

The float direct conv's tiling (`conv2d_nchwc.py`) with the innermost step replaced: instead of one FMA per
(column, output lane, input channel), one vpdpbusd per (column, block of ob output lanes, 4 input channels)
broadcasts the column's 4 input bytes as one int32 and sums 4 byte products into each lane. The innermost
(lane, 4 channels) loop pair is tensorized with an intrinsic declared here, for accumulators in registers
("local" scope; TVM's own `dot_16x4_vnni` matches only global buffers), at 16, 8 and 4 lanes (zmm, ymm, xmm).

Without VNNI the same step is three instructions: vpmaddubsw sums byte products in pairs into int16, which
saturates at 32767, then vpmaddwd against ones sums the pairs into int32, then an add. A pair of products is
exact when |w| ≤ 64 (2 · 255 · 64 = 32640): the `madd` kernels take only 7-bit weights, which
`passes/quantize.py` writes for such targets (ONNX Runtime's `reduce_range`) and `realize_qdq` checks.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.ops.qconv import DOT, QCONV2D_NCHWC
from kiln.ir.tvm_import import import_tvm
from kiln.schedules.loops import divisors
from kiln.schedules.space import Space
from kiln.schedules.tensor_intrin import register_once
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

from .conv2d_nchwc import prepare

VERSION = 1
REGISTERS = {"vnni": 32, "madd": 16, "sdot": 32}  # vector registers: AVX-512's 32, AVX2's 16, NEON's 32
RESERVED = {"vnni": 8, "madd": 6, "sdot": 8}  # the broadcast, tile_oc weight vectors (madd: its ones, products)
MADD_LIMIT = 64  # |w| for which vpmaddubsw's int16 pair sums cannot saturate


@dataclass(frozen=True)
class Config:
    tile_ow: int
    tile_oc: int = 1
    rows_outer: bool = False


_INTRINSICS: dict[tuple[int, str], str] = {}
_MADD = {512: ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"),
         256: ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"),
         128: ("llvm.x86.ssse3.pmadd.ub.sw.128", "llvm.x86.sse2.pmadd.wd")}


def dot_kind(info) -> str | None:
    """How this CPU target multiplies bytes: "vnni" (vpdpbusd), "madd" (vpmaddubsw + vpmaddwd, 7-bit
    weights), "sdot" (aarch64 with the dot-product extension: int8 × int8, so activations are int8 there), or
    None."""
    if info.arch == "aarch64":
        return "sdot" if "dotprod" in info.features else None
    if "avx512vnni" in info.features:
        return "vnni"
    return "madd" if "avx2" in info.features else None


def intrinsic(lanes: int, dot: str = "vnni") -> str:
    """The name of the tensor intrinsic C[lanes] += sum_k A[k] * B[lanes, k] (k < 4) on local C, registered on
    first use: A uint8 for vnni and madd, int8 for sdot (aarch64, 4 lanes only)."""
    if (lanes, dot) in _INTRINSICS:
        return _INTRINSICS[(lanes, dot)]
    import_tvm()
    from tvm.script import tirx as T

    if dot == "sdot" and lanes != 4:
        raise ValueError(f"sdot sums into 4 int32 lanes (128-bit NEON), not {lanes}")
    bits = lanes * 32
    a_dtype = "int8" if dot == "sdot" else "uint8"
    i32, a8, i8, i16 = f"int32x{lanes}", f"{a_dtype}x{lanes * DOT}", f"int8x{lanes * DOT}", f"int16x{lanes * 2}"
    if dot == "sdot":
        llvm = T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8")
    else:
        llvm = T.llvm_lookup_intrinsic_id(f"llvm.x86.avx512.vpdpbusd.{bits}")
        pairs_of, quads_of = (T.llvm_lookup_intrinsic_id(n) for n in _MADD[bits])

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (DOT,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, DOT), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:DOT], B[0:lanes, 0:DOT])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, DOT):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def dot4(a: T.handle, b: T.handle, c: T.handle) -> None:  # vpdpbusd, sdot: one instruction
        A = T.match_buffer(a, (DOT,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, DOT), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:DOT], B[0:lanes, 0:DOT])
            T.writes(C[0:lanes])
            word = T.reinterpret(A.vload([0], f"{a_dtype}x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                llvm, C.vload([0], dtype=i32), T.reinterpret(T.broadcast(word, lanes), dtype=a8),
                B.vload([0, 0], dtype=i8), dtype=i32)

    impl = dot4
    if dot == "madd":  # built only here: its body names the x86 intrinsics
        @T.prim_func(s_tir=True)
        def madd(a: T.handle, b: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, (DOT,), a_dtype, offset_factor=1)
            B = T.match_buffer(b, (lanes, DOT), "int8", offset_factor=1)
            C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:DOT], B[0:lanes, 0:DOT])
                T.writes(C[0:lanes])
                word = T.reinterpret(A.vload([0], f"{a_dtype}x4"), dtype="int32")
                pairs = T.call_llvm_pure_intrin(pairs_of, T.reinterpret(T.broadcast(word, lanes), dtype=a8),
                                                B.vload([0, 0], dtype=i8), dtype=i16)
                C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=i32) + T.call_llvm_pure_intrin(
                    quads_of, pairs, T.broadcast(T.int16(1), lanes * 2), dtype=i32)

        impl = madd
    name = register_once(f"kiln_{dot}_{a_dtype[0]}8i8i32_{lanes}x{DOT}_local", lambda: (desc, impl))
    _INTRINSICS[(lanes, dot)] = name
    return name


def space(out_w: int, oc_blocks: int) -> dict[str, list]:
    return {"tile_ow": divisors(out_w, 28), "tile_oc": divisors(oc_blocks, 4), "rows_outer": [False, True]}


def default(out_w: int, oc_blocks: int, weight_bytes: int, input_bytes: int, dot: str = "vnni") -> Config:
    """Squarish tiles as for float convs: 2-4 channel blocks × the widest row that fits in the accumulators
    (24 of AVX-512's registers, 10 of AVX2's)."""
    budget = REGISTERS[dot] - RESERVED[dot]
    for toc in (4, 2, 1):
        if oc_blocks % toc:
            continue
        fits = [d for d in divisors(out_w, budget // toc) if d >= 4 or d == out_w]
        if fits:
            return Config(max(fits), toc, weight_bytes < input_bytes)
    return Config(max(divisors(out_w, budget)), 1, weight_bytes < input_bytes)


def schedule(sch, conv_block, out_block, cfg: Config, lanes: int, dot: str = "vnni") -> list[str]:
    if sch.get(out_block).same_as(sch.get(conv_block)):
        out_block = sch.cache_write(conv_block, 0, "global")
    sch.set_scope(conv_block, 0, "local")
    n, oc, oh, ow, ob, rco, ry, rx, rq, rd = sch.get_loops(conv_block)
    oco, oci = sch.split(oc, factors=[None, cfg.tile_oc])
    owo, owi = sch.split(ow, factors=[None, cfg.tile_ow])
    outer = (n, oh, oco) if cfg.rows_outer else (n, oco, oh)
    sch.reorder(*outer, owo, rco, ry, rx, rq, oci, owi, ob, rd)
    sch.parallel(sch.fuse(*outer))
    sch.reverse_compute_at(out_block, owo)
    init = sch.decompose_reduction(conv_block, rco)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(out_block)[-1])
    sch.tensorize(ob, intrinsic(lanes, dot))
    sch.unroll(oci)
    sch.unroll(owi)
    return [f"qnchwc(ow={cfg.tile_ow},oc={cfg.tile_oc}{',rows' if cfg.rows_outer else ''},{dot}{lanes})"]


def _applies(group: Group) -> bool:
    return group.anchored_by(QCONV2D_NCHWC)


def _workload(group: Group, info) -> Workload:
    a = group.anchor
    x, out, w = a.args[0].type, a.type, a.args[1].type
    conv = a.attrs.conv
    n, cb, h, wd, ib = x.shape
    dot = dot_kind(info)
    return Workload.of(f"x86.qconv2d_nchwc@{VERSION}", group, n=n, c=cb * ib, h=h, w=wd, in_block=ib,
                       oc=out.shape[1] * out.shape[4], out_block=out.shape[4], out_h=out.shape[2],
                       out_w=out.shape[3], kh=w.shape[2], kw=w.shape[3], strides=conv.strides,
                       padding=conv.padding, dilation=conv.dilation, x_zero_point=a.attrs.x_zero_point,
                       **({} if dot == "vnni" else {"dot": dot}))  # VNNI keys as they were


def _space(wl: Workload, info) -> Space:
    return Space.of(**space(wl["out_w"], wl["oc"] // wl["out_block"]))


def _default(wl: Workload, info) -> dict:
    p = wl["padding"]
    weights = wl["oc"] * wl["c"] * wl["kh"] * wl["kw"]
    inputs = wl["n"] * wl["c"] * (wl["h"] + p[0] + p[2]) * (wl["w"] + p[1] + p[3])
    cfg = default(wl["out_w"], wl["oc"] // wl["out_block"], weights, inputs, wl.get("dot", "vnni"))
    return {"tile_ow": cfg.tile_ow, "tile_oc": cfg.tile_oc, "rows_outer": cfg.rows_outer}


def _schedule(sch, wl: Workload, cfg: dict) -> list[str]:
    conv, out = prepare(sch, "qconv2d_nchwc")
    return schedule(sch, conv, out, Config(cfg["tile_ow"], cfg["tile_oc"], cfg["rows_outer"]), wl["out_block"],
                    wl.get("dot", "vnni"))


TEMPLATE = Template(
    "x86.qconv2d_nchwc", VERSION, "llvm",
    applies=_applies, workload=_workload, space=_space, default=_default, schedule=_schedule, priority=10,
    supports=lambda info: dot_kind(info) is not None,
    doc="uint8 × int8 conv on NCHW[b]c: vpdpbusd register tiles (AVX-512 VNNI), else vpmaddubsw + vpmaddwd",
)
