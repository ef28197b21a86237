"""Softmax along the last axis on x86: rows in parallel; per row a vectorized max pass, one vectorized pass
that computes exp(x - max) once into a row buffer while summing it, and a vectorized division. Reads the four
stages of `ir/ops/softmax.py`'s compute by name (its other axes are TOPI's compute: the generic schedule)."""

from __future__ import annotations

from kiln.ir.ops.softmax import SOFTMAX
from kiln.schedules.space import Config, Space
from kiln.schedules.target_info import TargetInfo
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

from . import rows as row_passes

VERSION = 1
STAGES = ("softmax_max", "softmax_exp", "softmax_sum", "softmax_norm")


def applies(group: Group) -> bool:
    return row_passes.last_axis_op(group, SOFTMAX)


def workload(group: Group, info: TargetInfo) -> Workload:
    return row_passes.row_workload(f"x86.softmax@{VERSION}", group, info)


def space(wl: Workload, info: TargetInfo) -> Space:
    """`lanes`, the vector width of every row pass, divides the row; `store_exp` keeps exp(x - max) in a row
    buffer (else it is recomputed for the sum and the division)."""
    return Space.of(lanes=row_passes.row_lanes(wl["n"], wl["lanes"]), store_exp=(True, False))


def default(wl: Workload, info: TargetInfo) -> Config:
    return {"lanes": max(row_passes.row_lanes(wl["n"], wl["lanes"])), "store_exp": True}


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    lanes, store_exp = cfg["lanes"], cfg["store_exp"]
    top, exp, total, out = (sch.get_sblock(name) for name in STAGES)
    top_part = row_passes.split_reduction(sch, top, lanes)
    total_part = row_passes.split_reduction(sch, total, lanes)
    rows = row_passes.parallel_rows(sch, out, len(sch.get_loops(out)) - 1)
    row_passes.vectorize_row(sch, out, lanes)
    if not store_exp:
        sch.compute_inline(exp)
    for b in (total, total_part, exp if store_exp else None, top, top_part):
        if b is not None:
            sch.compute_at(b, rows)
    row_passes.vectorize_partials(sch, top_part)
    row_passes.vectorize_partials(sch, total_part)
    if store_exp:
        sch.set_scope(exp, 0, "local")
        row_passes.vectorize_row(sch, exp, lanes)
    return [f"softmax(lanes={lanes}{',store_exp' if store_exp else ''})"]


TEMPLATE = Template(
    "x86.softmax", VERSION, "llvm", applies=applies, workload=workload, space=space, default=default,
    schedule=schedule, doc="rows in parallel; vectorized max, exp-and-sum and division passes per row",
)
