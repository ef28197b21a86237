"""Row-wise passes shared by the softmax and layer-norm templates: a group's output rows run in parallel and
every stage of a row is computed inside that loop; a reduction along the row keeps `lanes` partial results in
one vector (rfactor), combined by a short scalar step at the end."""

from __future__ import annotations

import math

from kiln.schedules.loops import divisors, n_reduction_axes
from kiln.schedules.target_info import TargetInfo
from kiln.schedules.workload import Group, Workload

from kiln.errors import InvalidConfig


def last_axis_op(group: Group, op) -> bool:
    """The group is `op` alone over the last axis of an input with at least one row dim (and no empty dim)."""
    if len(group.calls) != 1 or group.calls[0].op is not op:
        return False
    call = group.calls[0]
    shape = tuple(int(d) for d in call.args[0].type.shape)
    return len(shape) >= 2 and call.attrs.axis == len(shape) - 1 and 0 not in shape


def row_workload(name: str, group: Group, info: TargetInfo) -> Workload:
    """`rows` rows of `n` (the group's output, whose last axis is the row); `lanes` the target's vector."""
    *rows, n = group.output[0]
    return Workload.of(name, group, rows=math.prod(rows), n=n, lanes=info.lanes(32))


def row_lanes(n: int, upto: int) -> list[int]:
    """Vector widths that divide a row of n: the row passes have no tails."""
    return divisors(n, upto)


def split_reduction(sch, block, lanes: int):
    """rfactor the block's single reduction loop into `lanes` partial results; returns the partial block, or
    None for one lane (a scalar reduction)."""
    if n_reduction_axes(sch, block) != 1:
        raise InvalidConfig(f"{sch.get(block).name_hint} reduces over more than one axis")
    *_, k = sch.get_loops(block)
    n = int(sch.get(k).extent)
    if n % lanes:
        raise InvalidConfig(f"{lanes} lanes do not divide a row of {n}")
    if lanes == 1:
        return None
    _, ki = sch.split(k, factors=[None, lanes])
    return sch.rfactor(ki, 0)


def vectorize_partials(sch, partial) -> None:
    """The partial block under the row loop: reduce along the row, `lanes` at a time, into one vector."""
    if partial is None:
        return
    under = sch.get_loops(partial)[1:]  # below the row loop: the lane loop, then k / lanes (left out if 1)
    lane = under[0]
    sch.vectorize(lane)
    if len(under) == 2:
        sch.reorder(under[1], lane)
        init = sch.decompose_reduction(partial, under[1])
        sch.vectorize(sch.get_loops(init)[-1])


def combine_as_tree(sch, block) -> list:
    """Rewrite the block that reduces a row's `lanes` partials (before it moves under the row loop) to combine
    them in halves: 16 → 8 → 4 → 2 as vector ops, then one scalar step. Combined one by one, the partials were a
    chain of 15 dependent scalar adds or maxes per row (about 60 cycles of latency), as long as the vector work
    of a 128-wide softmax row. Returns the new partial blocks, consumers first (the one `block` reads, then the
    one that one reads, ...): each is to be computed at the row loop in that order and vectorized
    (`vectorize_partials`)."""
    made = []
    while True:
        k = sch.get_loops(block)[-1]  # the block's reduction over what is left: halved at each step
        n = int(sch.get(k).extent)
        if n <= 2 or n % 2:
            return made[::-1]
        _, half = sch.split(k, factors=[2, n // 2])
        made.append(sch.rfactor(half, 0))


def vectorize_row(sch, block, lanes: int) -> None:
    """An elementwise stage under the row loop: its row loop split to `lanes` and vectorized."""
    *_, j = sch.get_loops(block)
    if lanes > 1:
        _, ji = sch.split(j, factors=[None, lanes])
        sch.vectorize(ji)


def parallel_rows(sch, out_block, n_row_dims: int):
    """Fuse the output's leading `n_row_dims` loops into one parallel loop over rows; returns it."""
    loops = sch.get_loops(out_block)
    if n_row_dims < 1 or len(loops) != n_row_dims + 1:
        raise InvalidConfig(f"expected {max(n_row_dims, 1)} row loops and one along the row, got {len(loops)}")
    rows = sch.fuse(*loops[:n_row_dims]) if n_row_dims > 1 else loops[0]
    sch.parallel(rows)
    return rows
