"""uint8 × int8 dense with AVX-512 VNNI: the float dense's register tiles (`dense_packed.py`), each step a
vpdpbusd of 4 input bytes against a vector of `block` units × 4 weight bytes instead of one FMA per k."""

from __future__ import annotations

from kiln.ir.ops.qdense import QDENSE_PACKED
from kiln.schedules.loops import divisors
from kiln.schedules.space import Config, Space
from kiln.schedules.target_info import TargetInfo
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

from kiln.errors import InvalidConfig

from .dense_packed import inline_around, register_tile, tile_dims, tiled_anchor
from .qconv2d_nchwc import dot_kind, intrinsic

VERSION = 1


def _applies(group: Group) -> bool:
    return tiled_anchor(group, QDENSE_PACKED)


def _workload(group: Group, info: TargetInfo) -> Workload:
    dot = dot_kind(info)
    return Workload.of(f"x86.qdense_packed@{VERSION}", group, **tile_dims(group),
                       **({} if dot == "vnni" else {"dot": dot}))


def _space(wl: Workload, info: TargetInfo) -> Space:
    orders = (True, False) if wl["rows"] > 1 and wl["n_blocks"] > 1 else (True,)
    return Space.of(tile_m=divisors(wl["rows"], 16), tile_n=divisors(wl["n_blocks"], 6), n_outer=orders)


def _default(wl: Workload, info: TargetInfo) -> Config:
    # one int32 vector per block of 16 units, as one float vector: the float dense's tile shape
    lanes = {"vnni": 16, "madd": 8, "sdot": 4}[wl.get("dot", "vnni")]  # the vector: AVX-512's, AVX2's, NEON's
    tile = register_tile(wl["rows"], wl["n_blocks"], wl["k"], lanes, lanes, min_tiles=-(-8 // wl["batches"]))
    return {"tile_m": tile["tile_m"], "tile_n": tile["tile_n"], "n_outer": True}


def _schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    block = wl["block"]
    dense, out = inline_around(sch, "qdense_packed")
    *batch, m, n, kq, kd = sch.get_loops(dense)
    rows, units = int(sch.get(m).extent), int(sch.get(n).extent)
    tile_m, tile_n = cfg["tile_m"], cfg["tile_n"]
    if rows % tile_m or units % (tile_n * block):
        raise InvalidConfig(f"{cfg} does not tile {rows} rows × {units} units (vectors of {block})")
    copy = sch.cache_write(dense, 0, "local")
    if sch.get(out).same_as(sch.get(dense)):
        out = copy
    else:
        sch.compute_inline(copy)
    *batch, m, n, kq, kd = sch.get_loops(dense)
    mo, mi = sch.split(m, factors=[None, tile_m])
    no, nt, nb = sch.split(n, factors=[None, tile_n, block])
    tiles = (no, mo) if cfg["n_outer"] else (mo, no)
    sch.reorder(*batch, *tiles, kq, mi, nt, nb, kd)
    tile = sch.fuse(*batch, *tiles)
    sch.parallel(tile)
    sch.reverse_compute_at(out, tile)
    init = sch.decompose_reduction(dense, kq)
    for b in (init, out):
        last = sch.get_loops(b)[-1]
        if not sch.get(last).same_as(sch.get(tile)):
            sch.vectorize(last)
    dot = wl.get("dot", "vnni")
    sch.tensorize(nb, intrinsic(block, dot))
    sch.unroll(mi)
    sch.unroll(nt)
    return [f"qdense_packed(m={tile_m},n={tile_n}{',n_outer' if cfg['n_outer'] else ''},{dot}{block})"]


TEMPLATE = Template(
    "x86.qdense_packed", VERSION, "llvm", applies=_applies, workload=_workload, space=_space, default=_default,
    schedule=_schedule, priority=10, supports=lambda info: dot_kind(info) is not None,
    doc="uint8 × int8 dense: register tiles of rows × 16-unit vectors, vpdpbusd over 4 k at a time (AVX-512 VNNI; "
        "else vpmaddubsw + vpmaddwd)",
)
