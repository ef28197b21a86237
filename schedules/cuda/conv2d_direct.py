"""Direct conv2d on NCHW for CUDA (plain, grouped and depthwise), the group's epilogue fused in.

Each thread block computes a tile of `oc × oh × ow` outputs (`<axis>_threads` threads along each axis, each
thread `<axis>_per_thread` outputs of it in local (register) accumulators). The reduction walks the input
channels `tile_ic` at a time; for each step the block's threads cooperatively copy the input window (padding
applied on the way) and the weights it needs into shared memory, then every thread accumulates from there.
"""

from __future__ import annotations

from kiln.ir.ops.conv import CONV2D
from kiln.schedules.space import Config, Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload

from kiln.errors import InvalidConfig

from .threads import (
    MAX_ACCUMULATORS,
    MAX_THREADS,
    SHARED_BYTES,
    auto_unroll,
    check_tiles,
    cooperative_fetch,
    divisors,
    dtype_bytes,
    epilogue_group,
    largest_divisor,
    prepare,
    thread_pairs,
)

VERSION = 1
NAME = "cuda.conv2d_direct"
UNROLL = (0, 16, 64, 256)  # TVM's auto-unroll limit (0: no unrolling)
AXES = ("oc", "oh", "ow")
# (most threads, most outputs per thread) along each output axis; oh goes to 64 threads so that the default
# (up to 64 threads over the output plane) lies in the space when the rows are only 1 or 2 outputs wide
LIMITS = {"oc": (64, 8), "oh": (64, 4), "ow": (32, 4)}


def workload(group: Group, info=None) -> Workload:
    conv = group.anchor
    n, oc, oh, ow = (int(d) for d in conv.type.shape)
    w = conv.args[1].type
    _, ic, kh, kw = (int(d) for d in w.shape)
    a = conv.attrs
    return Workload.of(f"{NAME}@{VERSION}", group, n=n, oc=oc, oh=oh, ow=ow, ic=ic, kh=kh, kw=kw,
                       strides=tuple(a.strides), dilation=tuple(a.dilation), groups=a.groups,
                       dtype_bytes=dtype_bytes(w.dtype))


def threads(cfg: Config) -> int:
    return cfg["oc_threads"] * cfg["oh_threads"] * cfg["ow_threads"]


def shared_bytes(wl: Workload, cfg: Config) -> int:
    block_oc = cfg["oc_threads"] * cfg["oc_per_thread"]
    groups_in_block = -(-block_oc // (wl["oc"] // wl["groups"]))
    in_channels = (groups_in_block - 1) * wl["ic"] + cfg["tile_ic"]  # the bounding box TVM allocates
    (sh, sw), (dh, dw) = wl["strides"], wl["dilation"]
    in_h = (cfg["oh_threads"] * cfg["oh_per_thread"] - 1) * sh + (wl["kh"] - 1) * dh + 1
    in_w = (cfg["ow_threads"] * cfg["ow_per_thread"] - 1) * sw + (wl["kw"] - 1) * dw + 1
    weights = block_oc * cfg["tile_ic"] * wl["kh"] * wl["kw"]
    return (in_channels * in_h * in_w + weights) * wl["dtype_bytes"]


def check(wl: Workload, cfg: Config) -> None:
    check_tiles(NAME, cfg, {axis: wl[axis] for axis in AXES})
    if wl["ic"] % cfg["tile_ic"]:
        raise InvalidConfig(f"{NAME}: tile_ic={cfg['tile_ic']} does not divide {wl['ic']} input channels")
    if threads(cfg) > MAX_THREADS:
        raise InvalidConfig(f"{NAME}: {threads(cfg)} threads per block, the limit is {MAX_THREADS}")
    if cfg["oc_per_thread"] * cfg["oh_per_thread"] * cfg["ow_per_thread"] > MAX_ACCUMULATORS:
        raise InvalidConfig(f"{NAME}: more than {MAX_ACCUMULATORS} accumulators per thread")
    if shared_bytes(wl, cfg) > SHARED_BYTES:
        raise InvalidConfig(f"{NAME}: tiles need {shared_bytes(wl, cfg)} bytes of shared memory, "
                            f"the limit is {SHARED_BYTES}")


def space(wl: Workload, info=None) -> Space:
    """Every config that passes `check`: one branch per thread tile (an (oc, oh, ow) × (threads, per thread)
    choice within MAX_THREADS and MAX_ACCUMULATORS); in it, tile_ic lists only the channel depths whose
    shared-memory tiles fit SHARED_BYTES (the bytes grow with tile_ic), and every unroll builds. A tile with
    no fitting depth has no branch."""
    branches = []
    oc, oh, ow = (thread_pairs(wl[axis], *LIMITS[axis]) for axis in AXES)
    for toc, ioc in oc:
        for toh, ioh in oh:
            for tow, iow in ow:
                if toc * toh * tow > MAX_THREADS or ioc * ioh * iow > MAX_ACCUMULATORS:
                    continue
                tile = {"oc_threads": toc, "oc_per_thread": ioc, "oh_threads": toh, "oh_per_thread": ioh,
                        "ow_threads": tow, "ow_per_thread": iow}
                depths = [c for c in divisors(wl["ic"], 64)
                          if shared_bytes(wl, {**tile, "tile_ic": c}) <= SHARED_BYTES]
                if depths:
                    branches.append(Space.of(**tile, tile_ic=depths, unroll=UNROLL))
    return Space.union(*branches)


def default(wl: Workload, info=None) -> Config:
    # about 64 threads over the output plane and the rest of 256 over channels, 4 channels per thread: a
    # weight tile reused by a whole tile of pixels, an input tile reused by every channel of the block
    oc, oh, ow, ic = wl["oc"], wl["oh"], wl["ow"], wl["ic"]
    t_ow = largest_divisor(ow, 16)
    t_oh = largest_divisor(oh, max(1, 64 // t_ow))
    t_oc = largest_divisor(oc, min(64, max(1, 256 // (t_ow * t_oh))))
    cfg = {"oc_threads": t_oc, "oc_per_thread": largest_divisor(oc // t_oc, 4), "oh_threads": t_oh,
           "oh_per_thread": 1, "ow_threads": t_ow, "ow_per_thread": 1, "tile_ic": largest_divisor(ic, 16),
           "unroll": 64}
    while shared_bytes(wl, cfg) > SHARED_BYTES:  # give up channel depth down to 4, then channels per thread
        if cfg["tile_ic"] > 4 or (cfg["oc_per_thread"] == 1 and cfg["tile_ic"] > 1):
            cfg["tile_ic"] = largest_divisor(ic, cfg["tile_ic"] - 1)
        elif cfg["oc_per_thread"] > 1:
            cfg["oc_per_thread"] = largest_divisor(oc // t_oc, cfg["oc_per_thread"] - 1)
        else:
            break
    check(wl, cfg)
    return cfg


def applies(group: Group) -> bool:
    """A conv2d with elementwise/broadcast ops around it, whose default tiles fit shared memory (a huge
    kernel window in float64 may not: the generic schedule takes it)."""
    if not epilogue_group(group, (CONV2D,)) or len(group.anchor.type.shape) != 4:
        return False
    wl = workload(group)
    try:
        default(wl)
    except InvalidConfig:
        return False
    return True


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    """The conv (n, oc, oh, ow | ic, kh, kw) at the thread tiles of the group's output block, which is the
    conv's own copy out of its accumulators when the group has no epilogue."""
    check(wl, cfg)
    conv, out = prepare(sch, keep_input=True)  # the padded window stays a block: it is fetched to shared
    reads = sch.get(conv).reads
    pad = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
           if sch.get(b).writes[0].source.same_as(reads[0].source)]
    copy = sch.cache_write(conv, 0, "local")
    if sch.get(out).same_as(sch.get(conv)):
        out = copy  # no epilogue: the copy out of the accumulators is the output stage
    else:
        sch.compute_inline(copy)
    n, f, y, x = sch.get_loops(out)
    fo, ft, fi = sch.split(f, factors=[None, cfg["oc_threads"], cfg["oc_per_thread"]])
    yo, yt, yi = sch.split(y, factors=[None, cfg["oh_threads"], cfg["oh_per_thread"]])
    xo, xt, xi = sch.split(x, factors=[None, cfg["ow_threads"], cfg["ow_per_thread"]])
    sch.reorder(n, fo, yo, xo, ft, yt, xt, fi, yi, xi)
    bx, tx = sch.fuse(n, fo, yo, xo), sch.fuse(ft, yt, xt)
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.compute_at(conv, tx, preserve_unit_loops=True)  # keeps a 1x1 kernel's unit loops in place
    loops = sch.get_loops(conv)
    rc, ry, rx = loops[-3:]
    spatial = loops[2:-3]
    rco, rci = sch.split(rc, factors=[None, cfg["tile_ic"]])
    sch.reorder(rco, rci, ry, rx, *spatial)
    # for the conv only: an epilogue that reads the same input keeps reading it from global memory
    # (one that read the shared copy outside its tile loop failed compute_at; found by fuzzing)
    data_shared = sch.cache_read(conv, 0, "shared", consumer_blocks=[conv])
    weight_shared = sch.cache_read(conv, 1, "shared", consumer_blocks=[conv])
    if pad:  # padding happens while the window is copied to shared memory
        sch.compute_inline(pad[0])
    cooperative_fetch(sch, data_shared, rco, threads(cfg))
    cooperative_fetch(sch, weight_shared, rco, threads(cfg))
    sch.decompose_reduction(conv, rco)
    auto_unroll(sch, bx, cfg["unroll"])
    tiles = ",".join(f"{axis}=({cfg[axis + '_threads']}, {cfg[axis + '_per_thread']})" for axis in AXES)
    return [f"conv2d_direct.cuda({tiles},ic={cfg['tile_ic']},threads={threads(cfg)})"]


TEMPLATE = Template(
    NAME, VERSION, "cuda",
    applies=applies, workload=workload, space=space, default=default, schedule=schedule,
    doc=("thread-block tiles of oc × oh × ow with register accumulators; input window and weights staged "
         "in shared memory tile_ic channels at a time"),
)
