"""Batched matmul (nn.matmul, a[..., m, k] @ b[..., k, n], as in attention) on x86: per batch, a register tile
of `tile_m` rows × `tile_n` vectors of n accumulates while k runs outside it (rows of b are contiguous along n,
so each k step loads tile_n vectors of b and broadcasts tile_m values of a). Batches × tiles run in parallel;
the group's epilogue (scale, mask) is computed per tile from the registers. The tiling is dense_packed's."""

from __future__ import annotations

import math

from kiln.ir.ops.dense import MATMUL
from kiln.schedules.space import Config, Space
from kiln.schedules.target_info import TargetInfo
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

from .dense_packed import divisors, inline_around, register_tile, tile_registers, tiled_anchor

VERSION = 1


def applies(group: Group) -> bool:
    """Both operands at least 2-D (a 1-D operand makes a matrix-vector product: no rows or no columns to tile)."""
    anchor = group.anchor
    return tiled_anchor(group, MATMUL) and all(len(a.type.shape) >= 2 for a in anchor.args)


def workload(group: Group, info: TargetInfo) -> Workload:
    """`width`, the columns per vector, is the largest vector of the target's that divides n (no tails)."""
    anchor = group.anchor
    out = group.output[0]
    m, n = out[-2], out[-1]
    lanes = info.lanes(32)
    return Workload.of(f"x86.batch_matmul@{VERSION}", group, m=m, n=n, k=int(anchor.args[0].type.shape[-1]),
                       batches=math.prod(out[:-2]), lanes=lanes, width=max(divisors(n, lanes)))


def space(wl: Workload, info: TargetInfo) -> Space:
    n_vectors = wl["n"] // wl["width"]
    # with one row or one vector of columns there is one tile along that axis: the tile order changes nothing
    orders = (False, True) if wl["m"] > 1 and n_vectors > 1 else (False,)
    return Space.of(tile_m=divisors(wl["m"], 16), tile_n=divisors(n_vectors, 6), unroll_k=divisors(wl["k"], 4),
                    n_outer=orders)


def default(wl: Workload, info: TargetInfo) -> Config:
    """dense_packed's tile for one batch's m × n; batches are parallel work too."""
    tile = register_tile(wl["m"], wl["n"] // wl["width"], wl["k"], wl["lanes"], wl["width"],
                         min_tiles=-(-8 // wl["batches"]))
    return {**tile, "n_outer": False}


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    matmul, out = inline_around(sch, "matmul")
    tile_registers(sch, matmul, out, wl["width"], cfg)
    order = ",n_outer" if cfg["n_outer"] else ""
    return [f"batch_matmul(m={cfg['tile_m']},n={cfg['tile_n']}x{wl['width']},k={cfg['unroll_k']}{order})"]


TEMPLATE = Template(
    "x86.batch_matmul", VERSION, "llvm", applies=applies, workload=workload, space=space, default=default,
    schedule=schedule,
    doc="per batch, register tiles of rows × vectors of columns, k outside, batches × tiles in parallel",
)
