"""The CUDA schedule for any group without a template: injective groups and reductions (softmax, pooling,
layer norm, reduce ops, and convs or denses no template takes).

Every injective block but the output is inlined. An injective group is one kernel: its output loops fused,
split into blocks of `threads` and bound to blockIdx.x × threadIdx.x. A group with reductions tries, in order:
  row:        one thread block per row of the output (all axes but the last); each reduction whose result is
              one value per row is computed at that block, its reduction loop shared by the block's threads
              (a cross-thread reduction), then the row is written by the same threads (softmax, layer norm);
  per-thread: one thread per output element, each reduction of the same shape computed inside it (pooling,
              and convs or denses without a template);
  recompute:  as per-thread, each thread recomputing the part of a reduction it needs (anything else; slow).
A group is always one kernel: a stage between two kernels would need global memory, which a CUDA kernel cannot
allocate.
Every mode binds every block, so no kernel runs on a single thread unless its output has one element.
"""

from __future__ import annotations

import logging
import math

from kiln.ir.op import OpPattern
from kiln.schedules.space import Config, Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

from kiln.errors import ScheduleError

from .threads import WARP, bind_spread, extent, n_reduction_axes

log = logging.getLogger(__name__)

VERSION = 1
NAME = "cuda.generic"
# threads per block: of an injective or per-thread kernel, or (rounded down to whole warps, at most the row's
# length) of the block sharing one row's reductions. One knob serves both, since a kernel is in one mode only;
# 256 was the default of each.
THREADS = (32, 64, 128, 256, 512, 1024)
DEFAULT_THREADS = 256


def workload(group: Group, info=None) -> Workload:
    return Workload.of(f"{NAME}@{VERSION}", group, elements=math.prod(group.output[0]),
                       injective=all(c.op.pattern <= OpPattern.INJECTIVE for c in group.calls))


def _thread_counts(wl: Workload) -> list[int]:
    """An injective kernel never has more threads than elements, so of the counts at or above its element
    count only the smallest is kept (the others give the same kernel). Which mode a reduction group takes
    (and so which extent caps its threads) is decided while scheduling, so it keeps every count."""
    if not wl["injective"]:
        return list(THREADS)
    return [t for t in THREADS if t < wl["elements"]] + [next((t for t in THREADS if t >= wl["elements"]),
                                                              THREADS[-1])]


def space(wl: Workload, info=None) -> Space:
    return Space.of(threads=_thread_counts(wl))


def default(wl: Workload, info=None) -> Config:
    counts = _thread_counts(wl)
    # a smaller count in place of 256 is at least the element count: the same kernel
    return {"threads": DEFAULT_THREADS if DEFAULT_THREADS in counts else counts[-1]}


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    """Inline what can be, then the first mode that fits the group (the module docstring)."""
    threads = cfg.get("threads", DEFAULT_THREADS)  # {}: dispatch's fallback for a failed template
    if not _root_blocks(sch):
        return ["empty"]
    rest = _inline_injective(sch)
    out = rest[-1]
    if len(rest) == 1 and not n_reduction_axes(sch, out):
        loops = sch.get_loops(out)
        if not loops:
            return [_scalar(sch, out)]
        bind_spread(sch, loops, threads)
        return [f"injective(threads={min(threads, _numel(sch, out))})"]
    for mode, strict in ((_row, True), (_per_thread, True), (_per_thread, False)):
        attempt = sch.copy()  # a mode that does not fit leaves `sch` as it was
        try:
            how = mode(attempt, _root_blocks(attempt), threads, strict)
        except Exception as err:  # noqa: BLE001  (TVM's ScheduleError: this mode does not fit the group)
            log.debug("%s does not apply: %s", mode.__name__, str(err).splitlines()[0][:200])
            continue
        if how:
            return [mode(sch, _root_blocks(sch), threads, strict)]
    if len(rest) > 1:  # intermediates between kernels would need global memory a CUDA kernel cannot allocate
        raise ScheduleError(f"no CUDA schedule fits this group of {len(rest)} stages")
    _one_reduction(sch, out, threads)
    return ["reduction"]


def _root_blocks(sch):
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _inline_injective(sch):
    """Inline every non-output block without reduction axes; the blocks left at the root, in order."""
    blocks = _root_blocks(sch)
    for b in blocks[:-1]:
        if not n_reduction_axes(sch, b):
            try:
                sch.compute_inline(b)
            except Exception as err:  # noqa: BLE001  (TVM refuses, e.g. for an opaque block: it stays a stage)
                log.debug("block %s stays a stage: %s", sch.get(b).name_hint, str(err).splitlines()[0][:200])
    return _root_blocks(sch)


def _shape(sch, block) -> tuple[int, ...]:
    return tuple(int(d) for d in sch.get(block).writes[0].source.shape)


def _numel(sch, block) -> int:
    n = 1
    for d in _shape(sch, block):
        n *= d
    return n


def _scalar(sch, block) -> str:
    """A zero-rank output: a single-element kernel, nothing to spread."""
    loop = sch.add_unit_loop(block)
    sch.bind(loop, "threadIdx.x")
    return "scalar"


def _row(sch, rest, row_threads: int, strict: bool = True) -> str | None:
    out, reductions = rest[-1], rest[:-1]
    if n_reduction_axes(sch, out) or not reductions:
        return None
    shape = _shape(sch, out)
    if len(shape) < 1 or shape[-1] < 2:
        return None
    rows = shape[:-1]
    for r in reductions:
        s = _shape(sch, r)
        if not n_reduction_axes(sch, r) or (s != rows and s != (*rows, 1)):
            return None
    threads = _row_threads(shape[-1], row_threads)
    loops = sch.get_loops(out)
    last = loops[-1]
    row = None
    if len(loops) > 1:
        row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        sch.bind(row, "blockIdx.x")
    _, tx = sch.split(last, factors=[None, threads])
    sch.bind(tx, "threadIdx.x")
    for r in reversed(reductions):
        _set_scope(sch, r, "shared")  # one value per row, read by every thread of the block
        if row is not None:
            sch.compute_at(r, row)
        n_red = n_reduction_axes(sch, r)
        red = sch.get_loops(r)[-n_red:]
        fused = sch.fuse(*red) if len(red) > 1 else red[0]
        _, rtx = sch.split(fused, factors=[None, threads])
        sch.bind(rtx, "threadIdx.x")
    return f"row(threads={threads},reductions={len(reductions)})"


def _row_threads(length: int, upto: int) -> int:
    """A whole number of warps, no more than the row needs."""
    t = WARP
    while t * 2 <= min(upto, length):
        t *= 2
    return t


def _per_thread(sch, rest, threads: int, strict: bool) -> str | None:
    """`strict`: only when each reduction has one value per output element; otherwise a thread recomputes
    the part of a reduction its output element needs (slow, but every group then schedules)."""
    out, reductions = rest[-1], rest[:-1]
    if strict and any(_numel(sch, r) != _numel(sch, out) for r in reductions):
        return None
    n_red = n_reduction_axes(sch, out)
    loops = sch.get_loops(out)
    spatial = loops[:len(loops) - n_red]
    if not spatial:
        return None
    _, tx = bind_spread(sch, spatial, threads)
    for r in reversed(reductions):
        sch.compute_at(r, tx)
        _set_scope(sch, r, "local")
    name = "per_thread" if strict else "per_thread_recompute"
    return f"{name}(threads={min(threads, _numel(sch, out))})"


def _set_scope(sch, block, scope: str) -> None:
    """Every buffer the block writes: an arg-max reduction writes two (index and value), and one left global
    would be an allocation a CUDA kernel cannot make."""
    for i in range(len(sch.get(block).writes)):
        sch.set_scope(block, i, scope)


def _one_reduction(sch, block, threads: int) -> None:
    """A lone reduction block: one thread per output element, or all threads on one value."""
    n_red = n_reduction_axes(sch, block)
    loops = sch.get_loops(block)
    spatial, reduce = loops[:len(loops) - n_red], loops[len(loops) - n_red:]
    if spatial:
        bind_spread(sch, spatial, threads)
    else:  # a full reduction to one value: the block's threads share it
        fused = sch.fuse(*reduce) if len(reduce) > 1 else reduce[0]
        _, tx = sch.split(fused, factors=[None, _row_threads(extent(sch, fused), threads)])
        sch.bind(tx, "threadIdx.x")


TEMPLATE = Template(
    NAME, VERSION, "cuda",
    applies=lambda group: True, workload=workload, space=space, default=default, schedule=schedule,
    priority=-100,
    doc="injective groups spread over blocks of threads; reductions one row per block or one output per thread",
)
