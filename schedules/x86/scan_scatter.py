"""Scans and scatters on x86 (cumsum, cumprod, scatter_elements, scatter_nd): the contiguous loops vectorized.

Their computes are te.extern loop nests (ir/ops/transform.py), parallel as written; TVM's schedule primitives
reach only the loops around a block, and refuse to vectorize around one that reads what it writes (a scan step
reads the previous step's row). So the compute puts each statement whose innermost loop has independent,
unit-stride iterations (the copy of the data, a scan step across the axes after the scanned one, a scatter_nd
row) in a block named CONTIGUOUS, and this template splits that loop to the vector width and marks the inner part
vectorized by replacing the loop (the check that refuses it does not know the iterations are independent). The
scatter updates themselves go to data-dependent places and stay scalar.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.ops.transform import CONTIGUOUS, CUMPROD, CUMSUM, SCATTER_ELEMENTS, SCATTER_ND
from kiln.schedules.space import Config, Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

VERSION = 1
NAME = "x86.scan_scatter"
OPS = (CUMSUM, CUMPROD, SCATTER_ELEMENTS, SCATTER_ND)
NAMES = {op.name for op in OPS}


def applies(group: Group) -> bool:
    return group.has(*OPS)


def workload(group: Group, info) -> Workload:
    _, dtype = group.output
    bits = 16 if dtype == "bfloat16" else 8 * np.dtype(dtype).itemsize  # NumPy knows bfloat16 only via ml_dtypes
    return Workload.of(f"{NAME}@{VERSION}", group, lanes=info.lanes(bits))


def space(wl: Workload, info=None) -> Space:
    return Space.of(vector=[1, wl["lanes"], 2 * wl["lanes"]])  # 1: the loops stay scalar


def default(wl: Workload, info=None) -> Config:
    return {"vector": wl["lanes"]}


def _contiguous_blocks(sch, block) -> list:
    out = []
    for child in sch.get_child_blocks(block):
        out += [child] if sch.get(child).name_hint == CONTIGUOUS else _contiguous_blocks(sch, child)
    return out


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    from tvm import tirx as tir

    cfg = space(wl).check(cfg)
    (extern,) = [name for name in wl.ops if name in NAMES]  # te.extern's block carries the op's name
    blocks = _contiguous_blocks(sch, sch.get_sblock(extern))
    width, done = cfg["vector"], 0
    for block in blocks:
        loop = sch.get_loops(block)[-1]
        extent = int(sch.get(loop).extent)
        if width < 2 or extent < 2:
            continue
        if extent > width:
            _, loop = sch.split(loop, factors=[None, width])
        sref = sch.get_sref(loop)
        old = sref.stmt
        sch.state.replace(sref, tir.For(old.loop_var, old.min, old.extent, tir.ForKind.VECTORIZED, old.body,
                                        old.thread_binding, old.annotations))
        done += 1
    return [f"extern+vectorized({done} of {len(blocks)}, {width})"]


TEMPLATE = Template(
    NAME, VERSION, "llvm",
    applies=applies, workload=workload, space=space, default=default, schedule=schedule,
    doc="cumsum/cumprod/scatter extern nests: their contiguous loops split to the vector width and vectorized",
)
