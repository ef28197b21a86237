"""Direct conv2d on NCHW for CUDA (plain, grouped and depthwise), the group's epilogue fused in.

Each thread block computes a tile of `tile_oc × tile_oh × tile_ow` outputs, each thread `per thread` of them in
local (register) accumulators. The reduction walks the input channels `tile_ic` at a time; for each step the
block's threads cooperatively copy the input window (padding applied on the way) and the weights it needs into
shared memory, then every thread accumulates from there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kiln.errors import InvalidConfig

from .threads import (
    MAX_ACCUMULATORS,
    MAX_THREADS,
    SHARED_BYTES,
    auto_unroll,
    buildable_configs,
    check_tiles,
    cooperative_fetch,
    divisors,
    largest_divisor,
)

VERSION = 1


@dataclass(frozen=True)
class Workload:
    n: int
    oc: int
    oh: int
    ow: int
    ic: int  # input channels per group: the reduction's channel extent
    kh: int
    kw: int
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    dtype_bytes: int = 4


@dataclass(frozen=True)
class Config:
    tile_oc: tuple[int, int]  # (threads, outputs per thread) along output channels
    tile_oh: tuple[int, int]  # (threads, outputs per thread) along output rows
    tile_ow: tuple[int, int]  # (threads, outputs per thread) along output columns
    tile_ic: int  # input channels staged in shared memory per reduction step
    unroll: int  # TVM's auto-unroll limit (0: no unrolling)

    @property
    def threads(self) -> int:
        return self.tile_oc[0] * self.tile_oh[0] * self.tile_ow[0]


def _pairs(extent: int, max_threads: int, max_inner: int) -> list[tuple[int, int]]:
    return [(t, i) for t in divisors(extent, max_threads) for i in divisors(extent // t, max_inner)]


def space(wl: Workload) -> dict[str, list]:
    """Every knob's values; `check` says which combinations build."""
    return {"tile_oc": _pairs(wl.oc, 64, 8), "tile_oh": _pairs(wl.oh, 16, 4), "tile_ow": _pairs(wl.ow, 32, 4),
            "tile_ic": divisors(wl.ic, 64), "unroll": [0, 16, 64, 256]}


def shared_bytes(wl: Workload, cfg: Config) -> int:
    block_oc = cfg.tile_oc[0] * cfg.tile_oc[1]
    oc_per_group = wl.oc // wl.groups
    groups_in_block = -(-block_oc // oc_per_group)
    in_channels = (groups_in_block - 1) * wl.ic + cfg.tile_ic  # the bounding box TVM allocates
    in_h = (cfg.tile_oh[0] * cfg.tile_oh[1] - 1) * wl.stride[0] + (wl.kh - 1) * wl.dilation[0] + 1
    in_w = (cfg.tile_ow[0] * cfg.tile_ow[1] - 1) * wl.stride[1] + (wl.kw - 1) * wl.dilation[1] + 1
    weights = block_oc * cfg.tile_ic * wl.kh * wl.kw
    return (in_channels * in_h * in_w + weights) * wl.dtype_bytes


def check(wl: Workload, cfg: Config) -> None:
    check_tiles("conv2d_direct.cuda", cfg, {"tile_oc": wl.oc, "tile_oh": wl.oh, "tile_ow": wl.ow})
    if wl.ic % cfg.tile_ic:
        raise InvalidConfig(f"conv2d_direct.cuda: tile_ic={cfg.tile_ic} does not divide {wl.ic} input channels")
    if cfg.threads > MAX_THREADS:
        raise InvalidConfig(f"conv2d_direct.cuda: {cfg.threads} threads per block, the limit is {MAX_THREADS}")
    if cfg.tile_oc[1] * cfg.tile_oh[1] * cfg.tile_ow[1] > MAX_ACCUMULATORS:
        raise InvalidConfig(f"conv2d_direct.cuda: more than {MAX_ACCUMULATORS} accumulators per thread")
    if shared_bytes(wl, cfg) > SHARED_BYTES:
        raise InvalidConfig(f"conv2d_direct.cuda: tiles need {shared_bytes(wl, cfg)} bytes of shared memory, "
                            f"the limit is {SHARED_BYTES}")


def configs(wl: Workload):
    """Every buildable config, in knob order (for a tuner's enumeration and the tests' samples)."""
    return buildable_configs(space(wl), Config, check, wl)


def default(wl: Workload) -> Config:
    # about 64 threads over the output plane and the rest of 256 over channels, 4 channels per thread: a
    # weight tile reused by a whole tile of pixels, an input tile reused by every channel of the block
    t_ow = largest_divisor(wl.ow, 16)
    t_oh = largest_divisor(wl.oh, max(1, 64 // t_ow))
    t_oc = largest_divisor(wl.oc, min(64, max(1, 256 // (t_ow * t_oh))))
    i_oc = largest_divisor(wl.oc // t_oc, 4)
    tile_ic = largest_divisor(wl.ic, 16)
    cfg = Config((t_oc, i_oc), (t_oh, 1), (t_ow, 1), tile_ic, unroll=64)
    while shared_bytes(wl, cfg) > SHARED_BYTES:  # give up channel depth down to 4, then channels per thread
        if cfg.tile_ic > 4 or (cfg.tile_oc[1] == 1 and cfg.tile_ic > 1):
            cfg = replace(cfg, tile_ic=largest_divisor(wl.ic, cfg.tile_ic - 1))
        elif cfg.tile_oc[1] > 1:
            cfg = replace(cfg, tile_oc=(t_oc, largest_divisor(wl.oc // t_oc, cfg.tile_oc[1] - 1)))
        else:
            break
    check(wl, cfg)
    return cfg


def schedule(sch, conv, out, wl: Workload, cfg: Config) -> list[str]:
    """Schedule `conv` (n, oc, oh, ow | ic, kh, kw) at the thread tiles of `out`, the group's output block,
    which is `conv` itself when the group has no epilogue."""
    check(wl, cfg)
    reads = sch.get(conv).reads
    pad = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
           if sch.get(b).writes[0].source.same_as(reads[0].source)]
    copy = sch.cache_write(conv, 0, "local")
    if sch.get(out).same_as(sch.get(conv)):
        out = copy  # no epilogue: the copy out of the accumulators is the output stage
    else:
        sch.compute_inline(copy)
    n, f, y, x = sch.get_loops(out)
    fo, ft, fi = sch.split(f, factors=[None, *cfg.tile_oc])
    yo, yt, yi = sch.split(y, factors=[None, *cfg.tile_oh])
    xo, xt, xi = sch.split(x, factors=[None, *cfg.tile_ow])
    sch.reorder(n, fo, yo, xo, ft, yt, xt, fi, yi, xi)
    bx, tx = sch.fuse(n, fo, yo, xo), sch.fuse(ft, yt, xt)
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.compute_at(conv, tx, preserve_unit_loops=True)  # keeps a 1x1 kernel's unit loops in place
    loops = sch.get_loops(conv)
    rc, ry, rx = loops[-3:]
    spatial = loops[2:-3]
    rco, rci = sch.split(rc, factors=[None, cfg.tile_ic])
    sch.reorder(rco, rci, ry, rx, *spatial)
    data_shared = sch.cache_read(conv, 0, "shared")
    weight_shared = sch.cache_read(conv, 1, "shared")
    if pad:  # padding happens while the window is copied to shared memory
        sch.compute_inline(pad[0])
    cooperative_fetch(sch, data_shared, rco, cfg.threads)
    cooperative_fetch(sch, weight_shared, rco, cfg.threads)
    sch.decompose_reduction(conv, rco)
    auto_unroll(sch, bx, cfg.unroll)
    return [(f"conv2d_direct.cuda(oc={cfg.tile_oc},oh={cfg.tile_oh},ow={cfg.tile_ow},ic={cfg.tile_ic},"
            f"threads={cfg.threads})")]
