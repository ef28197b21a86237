"""The generic CPU schedule, for any fused group no other template claims (elementwise and injective groups,
reductions, pooling and convs without a template): the last template tried.

Every block but the output and the reductions is inlined; the output's outer loops are fused and run in
parallel, its innermost loop vectorized; a reduction (the conv, dense or pool anchor) is computed per parallel
iteration of the output, with its reduction loops outside its vectorized innermost spatial loop. A step that
TVM rejects for a group is skipped, so the group still builds, only slower; the steps say which applied.
"""

from __future__ import annotations

from kiln.schedules.loops import n_reduction_axes
from kiln.schedules.space import Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Workload

VERSION = 1
PARALLEL_MIN_ITERATIONS = 64  # enough outer iterations to keep every core of a small CPU busy


def schedule(sch, wl: Workload, cfg) -> list[str]:
    steps: list[str] = []
    if not _try(lambda: sch.get_sblock("root")):  # a te.extern loop nest (scatter, scan): parallel as written
        return ["extern"]
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if not blocks:
        return ["empty"]
    out = blocks[-1]
    reductions = [b for b in blocks[:-1] if n_reduction_axes(sch, b)]
    staged = _inputs_of_tuple_reductions(sch, [*reductions, out])
    for b in blocks[:-1]:
        if b not in reductions and sch.get(b).name_hint not in staged:
            _try(lambda b=b: sch.compute_inline(b))
    lanes = wl["lanes"]
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(b).name_hint in staged:  # computed once, in parallel and vectorized, before the reduction
            _try(lambda b=b: _vectorize(sch, sch.get_loops(b)[-1], lanes, steps))
            _try(lambda b=b: _parallel_outer(sch, sch.get_loops(b), steps))
    if n_reduction_axes(sch, out):
        for b in reductions:  # a reduction of partial results (reduce.py's whole-tensor max/min): the parts first
            _try(lambda b=b: _schedule_reduction(sch, b, lanes, steps, parallel=True))
        _schedule_reduction(sch, out, lanes, steps, parallel=True)
        return steps
    loops = sch.get_loops(out)
    if not loops:
        return ["scalar"]
    if any(int(sch.get(loop).extent) == 0 for loop in loops):  # a zero-size output: nothing to run
        return ["empty"]
    # the anchor is computed per parallel iteration only over loops it shares with the output: a statistic of a
    # normalization (n, c, 1, 1) computed inside a loop over (n, c, h) would be recomputed for every h
    shared = _shared_prefix(sch, reductions[-1], loops) if reductions else len(loops)
    if not reductions and _tile_transpose(sch, out, lanes, steps):
        return steps
    par = _parallel_outer(sch, loops, steps, max_loops=max(shared, 1))
    _vectorize(sch, sch.get_loops(out)[-1], lanes, steps)
    rest = reductions
    if reductions and par is not None and shared:
        anchor = reductions[-1]
        if _try(lambda: sch.compute_at(anchor, par)):
            steps.append("anchor_at_parallel")
            _schedule_reduction(sch, anchor, lanes, steps, parallel=False)
            rest = reductions[:-1]
    for b in rest:
        _schedule_reduction(sch, b, lanes, steps, parallel=True)
    return steps


def _transposed_axis(sch, block, lanes: int) -> int | None:
    """The output axis to tile with the innermost one when some input is read across its rows: that input's
    contiguous (last) dim follows another output axis, and the innermost output axis strides through one of its
    outer dims (a transpose's `[s, h*64 + d] -> [h, d, s]`). Vectorizing the innermost axis alone then gathers
    one element from each of `lanes` rows far apart, a cache line each, for every element."""
    from tvm.tirx.analysis import undefined_vars

    b = sch.get(block)
    loops = sch.get_loops(block)
    ivs = [iv.var for iv in b.iter_vars]
    if len(ivs) != len(loops) or len(ivs) < 2:
        return None
    extents = [int(sch.get(loop).extent) for loop in loops]
    if extents[-1] % lanes:  # whole tiles only: a guarded tail would keep the inner loop from vectorizing
        return None
    inner = ivs[-1]
    for read in b.reads:
        region = read.region
        if len(region) < 2 or not all(_is_one(r.extent) for r in region):
            continue
        last = undefined_vars(region[-1].min)
        if any(v.same_as(inner) for v in last):
            continue
        if not any(v.same_as(inner) for r in region[:-1] for v in undefined_vars(r.min)):
            continue
        contiguous = [i for i, v in enumerate(ivs[:-1]) if extents[i] % lanes == 0
                      and any(u.same_as(v) for u in last)]
        if contiguous:
            return contiguous[-1]
    return None


def _is_one(extent) -> bool:
    try:
        return int(extent) == 1
    except TypeError:
        return False


def _tile_transpose(sch, block, lanes: int, steps: list[str]) -> bool:
    """A `lanes × lanes` tile of a transpose in each inner iteration: the tile's rows of the input stay in L1
    while its columns are gathered into vectors, so each cache line is fetched once rather than once per
    element (BERT's key transpose, 128 × 768: 50-69 µs untiled, 8-10 µs tiled, Zen 5, 2026-12-03)."""
    axis = _transposed_axis(sch, block, lanes)
    if axis is None:
        return False
    loops = sch.get_loops(block)
    ao, ai = sch.split(loops[axis], factors=[None, lanes])
    so, si = sch.split(loops[-1], factors=[None, lanes])
    outer = [*loops[:axis], ao, *loops[axis + 1:-1], so]
    sch.reorder(*outer, ai, si)
    _parallel_outer(sch, outer, steps, keep_inner=False)
    if _try(lambda: sch.vectorize(si)):
        steps.append("vectorize")
    steps.append("transpose_tiles")
    return True


def _inputs_of_tuple_reductions(sch, blocks) -> set[str]:
    """Names of the blocks an arg-max or arg-min reads. Their combiner refers to the value it compares several
    times, so a producer inlined into it is copied into the update several times over, nested producers
    multiplicatively: erf(erf(x)) under an arg-min kept LLVM busy for minutes (found by fuzzing). Such a
    producer stays a stage of its own."""
    names = set()
    for b in blocks:
        if len(sch.get(b).writes) > 1:
            names |= {sch.get(p).name_hint for p in sch.get_producers(b)}
    return names


def _try(step) -> bool:
    try:
        step()
        return True
    except Exception:  # noqa: BLE001  (TVM's ScheduleError and friends: the step does not apply here)
        return False


def _shared_prefix(sch, block, loops) -> int:
    """How many of `loops`, from the outside, match the leading dims of what `block` writes."""
    shape = [int(d) for d in sch.get(block).writes[0].source.shape]
    extents = [int(sch.get(loop).extent) for loop in loops]
    k = 0
    while k < min(len(shape), len(extents)) and shape[k] == extents[k]:
        k += 1
    return k


def _parallel_outer(sch, loops, steps, keep_inner: bool = True, max_loops: int | None = None):
    """Fuse outer loops until there is enough work to share (at most `max_loops` of them); run that loop in
    parallel. `keep_inner` leaves the innermost loop out of the fusion, for vectorizing."""
    extents = [int(sch.get(loop).extent) for loop in loops]
    if len(loops) == 1:
        if extents[0] < 2 * PARALLEL_MIN_ITERATIONS:
            return None
        outer, _ = sch.split(loops[0], factors=[None, PARALLEL_MIN_ITERATIONS])
        sch.parallel(outer)
        steps.append("parallel")
        return outer
    k, work = 1, extents[0]
    while (k < len(loops) - (1 if keep_inner else 0) and work < PARALLEL_MIN_ITERATIONS
           and (max_loops is None or k < max_loops)):
        work *= extents[k]
        k += 1
    fused = sch.fuse(*loops[:k]) if k > 1 else loops[0]
    sch.parallel(fused)
    steps.append("parallel")
    return fused


def _vectorize(sch, loop, lanes, steps) -> None:
    extent = int(sch.get(loop).extent)
    if extent < 2:
        return
    if extent > lanes:
        _, loop = sch.split(loop, factors=[None, lanes])
    if _try(lambda: sch.vectorize(loop)):
        steps.append("vectorize")


def _schedule_reduction(sch, block, lanes, steps, parallel: bool) -> None:
    """Reduction loops moved outside the innermost spatial loop longer than 1, which is split to the vector width
    and vectorized before the init is split off (TVM refuses to vectorize a reduction block without its init);
    with `parallel`, the spatial loops outside that vector run in parallel."""
    n_red = n_reduction_axes(sch, block)
    loops = sch.get_loops(block)
    spatial, reduce = loops[:-n_red], loops[-n_red:]
    if not parallel:
        spatial = spatial[1:]  # the first is the consumer's parallel loop this block was computed at
    wide = [i for i, loop in enumerate(spatial) if int(sch.get(loop).extent) > 1]
    if not wide:
        _vector_partials(sch, block, reduce, lanes, steps)
        return
    inner = spatial[wide[-1]]
    io, ii = sch.split(inner, factors=[None, min(lanes, int(sch.get(inner).extent))])
    if parallel:
        _parallel_outer(sch, [*spatial[:wide[-1]], io], steps, keep_inner=False)
    if not _try(lambda: sch.reorder(*reduce, ii)):
        return
    if _try(lambda: sch.vectorize(ii)):
        steps.append("reduction_vectorized")
    init = sch.decompose_reduction(block, reduce[0])
    _try(lambda: sch.vectorize(sch.get_loops(init)[-1]))


def _vector_partials(sch, block, reduce, lanes, steps) -> None:
    """A reduction with no output elements to vectorize across (a row's sum, a total): its innermost reduction
    loop split into `lanes` partial results kept in one vector (rfactor, the lanes as the last axis), combined by
    a short scalar step after."""
    if int(sch.get(reduce[-1]).extent) < 2 * lanes:
        return
    _, ki = sch.split(reduce[-1], factors=[None, lanes])
    ndim = len(sch.get(block).writes[0].source.shape)
    try:
        rf = sch.rfactor(ki, ndim)
    except Exception:  # noqa: BLE001  (not a reduction rfactor can split: leave it scalar)
        return
    loops = sch.get_loops(rf)
    if _try(lambda: sch.vectorize(loops[-1])):
        steps.append("reduction_vectorized")
    init = sch.decompose_reduction(rf, loops[-1 - len(reduce)])
    _try(lambda: sch.vectorize(sch.get_loops(init)[-1]))


TEMPLATE = Template(
    "x86.generic", VERSION, "llvm",
    applies=lambda group: True,
    workload=lambda group, info: Workload.of(f"x86.generic@{VERSION}", group, lanes=info.lanes(32)),
    space=lambda wl, info: Space.of(),
    default=lambda wl, info: {},
    schedule=schedule,
    priority=-100,
    doc="parallel outer loops, vectorized inner loop, reductions computed per parallel iteration",
)
