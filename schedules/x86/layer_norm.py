"""Layer norm over the last axis on x86: rows in parallel; per row a vectorized sum, a vectorized sum of
squared deviations from the mean, and the vectorized normalized, scaled output. Reads the stages of
`ir/ops/norm.py`'s compute by name (a norm over more axes reduces over several: the generic schedule)."""

from __future__ import annotations

from kiln.ir.ops.norm import LAYER_NORM
from kiln.schedules.space import Config, Space
from kiln.schedules.target_info import TargetInfo
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

from . import rows as row_passes

VERSION = 1
STAGES = ("layer_norm_sum", "layer_norm_var_sum", "layer_norm")


def applies(group: Group) -> bool:
    return row_passes.last_axis_op(group, LAYER_NORM)


def workload(group: Group, info: TargetInfo) -> Workload:
    return row_passes.row_workload(f"x86.layer_norm@{VERSION}", group, info)


def space(wl: Workload, info: TargetInfo) -> Space:
    """`lanes`, the vector width of every row pass, divides the row."""
    return Space.of(lanes=row_passes.row_lanes(wl["n"], wl["lanes"]))


def default(wl: Workload, info: TargetInfo) -> Config:
    return {"lanes": max(row_passes.row_lanes(wl["n"], wl["lanes"]))}


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    lanes = cfg["lanes"]
    total, squares, norm = (sch.get_sblock(name) for name in STAGES)
    total_part = row_passes.split_reduction(sch, total, lanes)
    squares_part = row_passes.split_reduction(sch, squares, lanes)
    rows = row_passes.parallel_rows(sch, norm, len(sch.get_loops(norm)) - 1)
    row_passes.vectorize_row(sch, norm, lanes)
    for b in (squares, squares_part, total, total_part):
        if b is not None:
            sch.compute_at(b, rows)
    row_passes.vectorize_partials(sch, total_part)
    row_passes.vectorize_partials(sch, squares_part)
    return [f"layer_norm(lanes={lanes})"]


TEMPLATE = Template(
    "x86.layer_norm", VERSION, "llvm", applies=applies, workload=workload, space=space, default=default,
    schedule=schedule, doc="rows in parallel; vectorized sum, squared-deviation and output passes per row",
)
