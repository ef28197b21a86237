"""Direct conv2d on NCHW for x86, with the group's epilogue (bias, residual add, activation) fused in.

Output width is vectorized and an output-channel block unrolled, so a tile of `tile_oc × tile_ow` accumulators
stays in registers while the reduction (input channels × kernel window) runs outside it; the input's padding is
materialized once so the inner loop loads without bounds checks. The knobs are the two tile sizes, or
`direct=False`: the generic schedule, which the default keeps when no tile above 1 fits (a prime width or
channel count) or nothing is summed (a 1x1 conv of one channel per group).

A pointwise conv (1x1, stride 1, unpadded) reads its input plane as one contiguous row, so `flat=True` tiles
the flattened plane in whole vectors instead of the width: ShuffleNet's grouped 1x1 convs at 28×28 otherwise
vectorize 14 of 16 lanes, which LLVM loads in three pieces (8 + 4 + 2) and reassembles, for every accumulator.
The flat tile is `tile_oc` channels of one group (they share each input vector) × `tile_v` vectors.

A pointwise conv whose plane is not whole vectors (ShuffleNet's 14×14 and 7×7: 196 and 49 of 16 lanes) has the
flat tile too, over its plane padded to whole tiles (`plane_tail` in the workload, and `padded_plane`): the op's
compute is then built over the padded plane (ir/ops/conv.py), its input copied into it first, and the epilogue
writes the valid prefix of each plane, its last partial vector in a loop of its own. The width tiles' 14 or 7
lanes are split by LLVM into 8 + 4 + 2 or 4 + 2 + 1 on every accumulator; padded, the 272-channel 14×14 conv
ran at 0.76-0.89x and the 544-channel 7×7 one at 0.38-0.52x their width-tile time (Zen 5, the kernel alone,
per-round ratios), though padding adds 14% and 31% to their work. A predicated last vector instead (TVM's
buffer-level predication) masked the accumulators too and ran 1.4-6x slower than the width tiles.

A grouped conv's tiles can run channel tiles innermost (`oc_inner`): the next tile of the same group reads the
input slab the last one left in L1, where tiles in channel order walk the whole plane first and read the group's
input from L2 once per channel tile, which is what bounds a conv that sums only 34 or 68 inputs. A group's
weights (a few KB) stay cached either way. On ShuffleNet's 136-channel 28×28 grouped 1x1 conv (AMD Zen 5, the
kernel in sequence): 34 → 21 µs at the default flat tile, against ONNX Runtime's 36 µs node.
"""

from __future__ import annotations

from kiln.ir.ops.conv import CONV2D
from kiln.schedules.loops import divisors
from kiln.schedules.space import Config, Space
from kiln.schedules.template import Template
from kiln.schedules.workload import Group, Workload
from kiln.schedules.x86 import generic
from kiln.schedules.x86.conv2d_nchwc import finish_tile, prepare

VERSION = 3  # 2: the flat pointwise branch (workload gains pointwise, plane, group_channels); 3: oc_inner
NAME = "x86.conv2d_direct"
MAX_ACCUMULATORS = 8  # accumulator vectors: leaves registers for the input vector and broadcast weights


def applies(group: Group) -> bool:
    """A 2-D NCHW conv with injective producers (inlined into its input) and elementwise epilogues of its output's
    shape (computed per tile)."""
    return group.anchored_by(CONV2D)


def workload(group: Group, info) -> Workload:
    conv = group.anchor
    w = conv.args[1].type
    _, oc, oh, ow = (int(d) for d in conv.type.shape)
    a = conv.attrs
    pointwise = (int(w.shape[2]), int(w.shape[3])) == (1, 1) and tuple(a.strides) == (1, 1) and not any(a.padding)
    reduction = int(w.shape[1]) * int(w.shape[2]) * int(w.shape[3])
    lanes = info.lanes(32)
    # only where it holds, so every other task keeps its key (and its records)
    tail = {"plane_tail": True} if pointwise and reduction > 1 and (oh * ow) % lanes else {}
    return Workload.of(f"{NAME}@{VERSION}", group, lanes=lanes, registers=info.vector_registers,
                       out_channels=oc, out_w=ow, groups=a.groups, padded=any(a.padding),
                       reduction=reduction, pointwise=pointwise, plane=oh * ow, group_channels=oc // a.groups,
                       **tail)


def _tiles(n: int, upto: int) -> list[int]:
    """Tile sizes above 1 (compute_at drops a unit tile loop, and the tile then has no vector or no rows)."""
    return [d for d in divisors(n, upto) if d > 1]


def _width_tiles(n: int, lanes: int) -> list[int]:
    """Vectorized width tiles: one vector or less, or whole vectors. A width between (28 of 16 lanes) is a
    vector type LLVM legalizes badly: on a 136-channel 28×28 grouped 1x1 conv, 9.0 ms against 0.59 ms at 14."""
    return [d for d in _tiles(n, 2 * lanes) if d <= lanes or d % lanes == 0]


def _flat_vectors(wl: Workload) -> int:
    """Whole vectors in a pointwise conv's output plane; 0 when it has a tail (or the conv is not pointwise).
    Narrower vectors that leave no tail (14×14 is 49 of 4 lanes) ran 2× slower than the width tiles' 14 of 16
    lanes (0.20-0.26 against 0.11 ms, ShuffleNet's 272-channel conv), so the space has none."""
    if not wl["pointwise"] or wl["reduction"] == 1 or wl["plane"] % wl["lanes"]:
        return 0
    return wl["plane"] // wl["lanes"]


def _grouped(wl: Workload) -> bool:
    return wl["groups"] > 1


def _flat_branches(wl: Workload, vectors: list[int], orders: dict) -> list[Space]:
    """One branch per channel tile (a group's channels, which share each input vector), with those of `vectors`
    whose accumulators fit beside the input vectors and the broadcast weight; `orders` the channel-tile orders."""
    budget = wl["registers"] - 4
    branches = []
    for oc in divisors(wl["group_channels"], 8):
        tile_v = [v for v in vectors if 1 < oc * v <= budget]
        if tile_v:
            branches.append(Space.of(direct=True, flat=True, tile_oc=[oc], tile_v=tile_v, **orders))
    return branches


def _flat_space(wl: Workload) -> list[Space]:
    """The flat tiles of a plane of whole vectors; a grouped conv's channel tiles in either order."""
    vectors = _flat_vectors(wl)
    if not vectors:
        return []
    return _flat_branches(wl, divisors(vectors, 8), {"oc_inner": [False, True] if _grouped(wl) else [False]})


MAX_PLANE_PADDING = 1 / 3  # at most this much work added by padding the plane to whole tiles


def padded_plane(wl: Workload, cfg: Config) -> int:
    """The plane the conv is computed over for `cfg`: whole tiles of tile_v vectors for a flat tile of a plane
    with a tail; 0 (as the op says) otherwise."""
    if not wl.get("plane_tail") or not cfg.get("flat"):
        return 0
    tile = cfg["tile_v"] * wl["lanes"]
    return -(-wl["plane"] // tile) * tile


def _padded_space(wl: Workload) -> list[Space]:
    """The flat tiles of a plane with a tail, over the plane padded to whole tiles (at most MAX_PLANE_PADDING
    more work)."""
    if not wl.get("plane_tail"):
        return []
    most = wl["plane"] * (1 + MAX_PLANE_PADDING)
    vectors = [v for v in range(1, 9) if padded_plane(wl, {"flat": True, "tile_v": v}) <= most]
    return _flat_branches(wl, vectors, {"oc_inner": [False, True]} if _grouped(wl) else {})


def _width_space(wl: Workload) -> list[Space]:
    """Channel tiles × width tiles; a grouped conv's channel tiles innermost only with tiles of its group."""
    tile_ow = _width_tiles(wl["out_w"], wl["lanes"])
    tile_oc = _tiles(wl["out_channels"], 16)
    if not tile_oc or not tile_ow or wl["reduction"] == 1:
        return []
    if not _grouped(wl):
        return [Space.of(direct=True, tile_oc=tile_oc, tile_ow=tile_ow)]
    branches = [Space.of(direct=True, tile_oc=tile_oc, tile_ow=tile_ow, oc_inner=[False])]
    in_group = _tiles(wl["group_channels"], 16)
    if in_group:
        branches.append(Space.of(direct=True, tile_oc=in_group, tile_ow=tile_ow, oc_inner=[True]))
    return branches


def space(wl: Workload, info=None) -> Space:
    """The direct tiles, the flat tiles of a pointwise conv, and the generic schedule (the only choice when no
    tile fits, or nothing is summed)."""
    return Space.union(*_width_space(wl), *_flat_space(wl), *_padded_space(wl), Space.of(direct=False))


def _flat_default(wl: Workload) -> Config | None:
    """The most accumulators up to half the registers (fewest above), then the most vectors (each broadcast
    weight is reused across the vectors, each input vector across the channels); channel tiles innermost in a
    grouped conv."""
    half = wl["registers"] // 2

    def rank(cfg: Config) -> tuple:
        n = cfg["tile_oc"] * cfg["tile_v"]
        return (n <= half, n if n <= half else -n, cfg["tile_v"], cfg["oc_inner"])

    return max((cfg for branch in _flat_space(wl) for cfg in branch), key=rank, default=None)


def _padded_default(wl: Workload) -> Config | None:
    """As `_flat_default`, after the least padding: at most 15% more work if any tile allows it, then the
    most accumulators up to half the registers, then the squarest tile (4 × 4 vectors over 8 × 2)."""
    half = wl["registers"] // 2

    def rank(cfg: Config) -> tuple:
        n = cfg["tile_oc"] * cfg["tile_v"]
        light = padded_plane(wl, cfg) <= wl["plane"] * 1.15
        return (n <= half, light, n if n <= half else -n, min(cfg["tile_oc"], cfg["tile_v"]),
                cfg.get("oc_inner", False))

    return max((cfg for branch in _padded_space(wl) for cfg in branch), key=rank, default=None)


def default(wl: Workload, info=None) -> Config:
    """The flat tile where there is one (over a padded plane where the plane has a tail); else the widest
    tiles, in channel order (on the width tiles neither order won on ShuffleNet's 14×14 convs: 45 against 46 µs
    at their best tiles)."""
    flat = _flat_default(wl) or _padded_default(wl)
    if flat is not None:
        return flat
    tile_oc = max(_tiles(wl["out_channels"], MAX_ACCUMULATORS), default=1)
    tile_ow = max(_tiles(wl["out_w"], wl["lanes"]), default=1)
    if tile_oc == 1 or tile_ow == 1 or wl["reduction"] == 1:
        return {"direct": False}
    cfg = {"direct": True, "tile_oc": tile_oc, "tile_ow": tile_ow}
    return {**cfg, "oc_inner": False} if _grouped(wl) else cfg


def _channel_tiles(sch, oc, wl: Workload, cfg: Config):
    """The output-channel loop split as (outer, a group's tiles, tile): (tiles, None, tile_oc) in channel order,
    (groups, tiles of a group, tile_oc) for channel tiles innermost."""
    if cfg.get("oc_inner"):
        return sch.split(oc, factors=[wl["groups"], wl["group_channels"] // cfg["tile_oc"], cfg["tile_oc"]])
    oco, oci = sch.split(oc, factors=[None, cfg["tile_oc"]])
    return oco, None, oci


def _order_tag(cfg: Config) -> str:
    return ",oc_inner" if cfg.get("oc_inner") else ""


def _conv_name(wl: Workload) -> str:
    return "conv2d_nchw" if wl["groups"] == 1 else "group_conv2d_nchw"  # topi's block names (and ir/ops/conv.py's)


def _prepare(sch, wl: Workload):
    """Every block but the conv inlined; NCHW padding (4-D: n and c run in parallel) materialized once."""
    return prepare(sch, _conv_name(wl), pad_names=("pad_temp",) if wl["padded"] else (), parallel_loops=2)


def _prepare_local(sch, wl: Workload):
    """`_prepare`, with the conv accumulating into a tile-sized local buffer (registers, once unrolled) instead
    of the full output; (conv, output block)."""
    conv_block, out_block = _prepare(sch, wl)
    copy = sch.cache_write(conv_block, 0, "local")
    if sch.get(out_block).same_as(sch.get(conv_block)):
        return conv_block, copy  # no epilogue: the copy out of the accumulators is the output stage
    sch.compute_inline(copy)
    return conv_block, out_block


def schedule(sch, wl: Workload, cfg: Config) -> list[str]:
    """The conv (n, oc, oh, ow | rc, ry, rx) computed per tile of the output's loops."""
    cfg = space(wl).check(cfg)
    if not cfg["direct"]:
        return generic.schedule(sch, wl, {})
    if cfg.get("flat"):
        return _schedule_flat_padded(sch, wl, cfg) if wl.get("plane_tail") else _schedule_flat(sch, wl, cfg)
    conv_block, out_block = _prepare_local(sch, wl)
    steps = []
    n, oc, oh, ow = sch.get_loops(out_block)[:4]
    oco, ocg, oci = _channel_tiles(sch, oc, wl, cfg)
    owo, owi = sch.split(ow, factors=[None, cfg["tile_ow"]])
    inner = [owo] if ocg is None else [owo, ocg]  # a group's channel tiles under the width tile
    sch.reorder(n, oco, oh, *inner, oci, owi)
    sch.parallel(sch.fuse(n, oco, oh))
    steps.append(f"direct(oc={cfg['tile_oc']},ow={cfg['tile_ow']}{_order_tag(cfg)})")
    sch.compute_at(conv_block, inner[-1])
    # under the tile: the two spatial loops, then the reduction loops (unit ones dropped by compute_at)
    loops = sch.get_loops(conv_block)[1 + len(inner):]
    c_oci, c_owi, reduce = loops[0], loops[1], loops[2:]
    sch.reorder(*reduce, c_oci, c_owi)
    sch.unroll(c_oci)
    sch.vectorize(c_owi)
    init = sch.decompose_reduction(conv_block, reduce[0])  # after vectorize: TVM checks dataflow on the whole block
    init_loops = sch.get_loops(init)
    sch.vectorize(init_loops[-1])
    sch.vectorize(sch.get_loops(out_block)[-1])
    return steps


def _schedule_flat(sch, wl: Workload, cfg: Config) -> list[str]:
    """The conv and the output as (n, c, plane) blocks; a tile_oc × tile_v-vector accumulator tile per step."""
    conv_block, out_block = _prepare_local(sch, wl)
    ow = wl["out_w"]
    sch.transform_layout(conv_block, ("write", 0), lambda n, c, h, w: (n, c, h * ow + w))
    sch.transform_block_layout(conv_block, lambda n, c, h, w, rc, ry, rx: (n, c, h * ow + w, rc, ry, rx))
    sch.transform_block_layout(out_block, lambda n, c, h, w: (n, c, h * ow + w))
    n, oc, p = sch.get_loops(out_block)
    oco, ocg, oci = _channel_tiles(sch, oc, wl, cfg)
    po, pi, pv = sch.split(p, factors=[None, cfg["tile_v"], wl["lanes"]])
    outer = [n, oco, po] if ocg is None else [n, oco, po, ocg]  # a group's channel tiles under the plane tile
    sch.reorder(*outer, oci, pi, pv)
    tile = sch.fuse(*outer)
    sch.parallel(tile)
    sch.compute_at(conv_block, tile, preserve_unit_loops=True)  # a tile of one channel keeps its loop
    _, c_oc, c_p, *reduce = sch.get_loops(conv_block)[1:]  # under the tile: n (unit), channels, plane, reduction
    c_pi, c_pv = sch.split(c_p, factors=[cfg["tile_v"], wl["lanes"]])
    sch.reorder(*reduce, c_oc, c_pi, c_pv)
    sch.unroll(c_oc)
    sch.unroll(c_pi)
    sch.vectorize(c_pv)
    init = sch.decompose_reduction(conv_block, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(out_block)[-1])
    return [f"direct_flat(oc={cfg['tile_oc']},v={cfg['tile_v']}x{wl['lanes']}{_order_tag(cfg)})"]


def _schedule_flat_padded(sch, wl: Workload, cfg: Config) -> list[str]:
    """The conv built over a padded plane (`padded_plane`): the input copied into it, then the flat tiles over
    the whole padded plane (no tail), then the epilogue over the valid prefix of each plane, its whole vectors
    apart from its last, partial one."""
    root = sch.get_sblock("root")
    for b in sch.get_child_blocks(root)[:-1]:
        if sch.get(b).name_hint not in ("pad_temp", _conv_name(wl)):
            sch.compute_inline(b)  # plane_trim and the epilogue, into the output block
    pad, conv = sch.get_sblock("pad_temp"), sch.get_sblock(_conv_name(wl))
    out = sch.get_child_blocks(root)[-1]
    lanes, plane = wl["lanes"], wl["plane"]
    whole = plane // lanes * lanes

    def per_plane(block) -> None:
        """(n, c) in parallel; the plane's whole vectors vectorized, its tail a loop of its own."""
        n, c, p = sch.get_loops(block)
        sch.parallel(sch.fuse(n, c))
        if whole:
            head, _ = sch.loop_partition(p, [whole, None])
            sch.vectorize(sch.split(head, factors=[None, lanes])[1])

    per_plane(pad)
    local = sch.cache_write(conv, 0, "local")
    n, oc, p, red = sch.get_loops(conv)
    oco, ocg, oci = _channel_tiles(sch, oc, wl, cfg)
    po, pi, pv = sch.split(p, factors=[None, cfg["tile_v"], lanes])
    outer = [n, oco, po] if ocg is None else [n, oco, po, ocg]
    sch.reorder(*outer, red, oci, pi, pv)
    tile = sch.fuse(*outer)
    sch.parallel(tile)
    finish_tile(sch, conv, local, [oci, pi], pv, at=tile, first=red)
    ow = wl["out_w"]
    sch.transform_block_layout(out, lambda n, c, h, w: (n, c, h * ow + w))
    per_plane(out)
    padded = padded_plane(wl, cfg)
    return [f"direct_flat(plane={plane}->{padded},oc={cfg['tile_oc']},v={cfg['tile_v']}x{lanes}{_order_tag(cfg)})"]


TEMPLATE = Template(
    NAME, VERSION, "llvm",
    applies=applies, workload=workload, space=space, default=default, schedule=schedule, padded_plane=padded_plane,
    doc="direct NCHW conv2d: a tile_oc x tile_ow accumulator tile, padding materialized once",
)
