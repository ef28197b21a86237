"""TRANSITIONAL: the per-anchor template tries from before the template registry, used by codegen/lower.py for
groups whose template has not moved onto schedules/template.py yet (the generic template claims them). Each
ported template removes its entry here; the file goes when TEMPLATES is empty."""

from __future__ import annotations

import dataclasses
import logging
import math

from .x86.generic import _n_reduction_axes

log = logging.getLogger(__name__)


def legacy_schedule(prim, target, anchor):
    """(scheduled PrimFunc, steps) from the old per-anchor template, or None."""
    template = TEMPLATES.get(anchor[0] if anchor is not None else None)
    if template is not None:
        scheduled = template(prim, target, anchor[1] if anchor is not None else None)
        if scheduled is not None:
            return scheduled
    if anchor is None:
        return _try_resize(prim, target)
    return None


def _try_conv2d_direct(prim, target, attrs):
    """The x86 direct-conv template on a fresh schedule; None when it does not apply to this group."""
    from tvm import s_tir

    from .target_info import vector_lanes
    from .x86 import conv2d_direct

    sch = s_tir.Schedule(prim)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    conv_name = "conv2d_nchw" if attrs.groups == 1 else "group_conv2d_nchw"
    if conv_name not in names or len(sch.get_loops(blocks[-1])) != 4 + _n_reduction_axes(sch, blocks[-1]):
        return None
    try:
        conv = sch.get_sblock(conv_name)
        for b, name in zip(blocks[:-1], names[:-1]):
            if name == "pad_temp":
                if not any(attrs.padding):
                    sch.compute_inline(b)
                else:  # materialized once, so the inner loop loads without bounds checks
                    loops = sch.get_loops(b)
                    sch.parallel(sch.fuse(*loops[:2]))
                    sch.vectorize(loops[-1])
            elif name != conv_name:
                sch.compute_inline(b)
        out = sch.get_child_blocks(sch.get_sblock("root"))[-1]
        shape = [int(sch.get(loop).extent) for loop in sch.get_loops(out)]
        cfg = conv2d_direct.default(shape[1], shape[3], vector_lanes(target, 32))
        steps = conv2d_direct.schedule(sch, conv, out, cfg)
    except Exception as err:  # noqa: BLE001  (the template does not fit this group: fall back, and say so)
        log.info("conv2d_direct does not apply (%s); generic schedule used", str(err).splitlines()[0][:200])
        return None
    return sch.mod["main"], "+".join(steps)


def _prepare(sch, anchor_name: str, pad_names=("pad",)):
    """Inline every block but the anchor; materialize padding once (parallel, vectorized) so the anchor's
    inner loop loads without bounds checks. Returns the anchor and the group's output block."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    if anchor_name not in names:
        raise LookupError(f"no {anchor_name} block")
    for b, name in zip(blocks[:-1], names[:-1]):
        if name in pad_names:
            loops = sch.get_loops(b)
            sch.parallel(sch.fuse(*loops[:3]))
            sch.vectorize(loops[-1])
        elif name != anchor_name:
            sch.compute_inline(b)
    return sch.get_sblock(anchor_name), sch.get_child_blocks(sch.get_sblock("root"))[-1]


def _has_block(sch, name: str) -> bool:
    return any(sch.get(b).name_hint == name for b in sch.get_child_blocks(sch.get_sblock("root")))


def _nbytes(buffer) -> int:
    n = 1
    for d in buffer.shape:
        n *= int(d)
    return n * 4


def _attempt(template: str, prim, apply):
    """Run `apply(sch) -> steps` on a fresh schedule of `prim`; None (and a log line naming the template) when
    it does not fit the group, so the caller falls back to the generic schedule."""
    from tvm import s_tir

    sch = s_tir.Schedule(prim)
    try:
        steps = apply(sch)
    except Exception as err:  # noqa: BLE001  (TVM's ScheduleError and friends: the template does not fit)
        log.info("%s does not apply (%s); generic schedule used", template, str(err).splitlines()[0][:200])
        return None
    if steps is None:  # not this template's kind of group: nothing to say
        return None
    return sch.mod["main"], "+".join(steps)


def _try_conv2d_nchwc(prim, target, attrs):
    from .target_info import vector_lanes
    from .x86 import conv2d_nchwc

    im2col = attrs.algorithm == "im2col"

    def apply(sch):
        depthwise = _has_block(sch, "depthwise_nchwc")
        if depthwise and _has_block(sch, "conv2d_nchwc"):
            return _depthwise_pointwise(sch, target)  # a depthwise conv fused into its 1x1 consumer
        # padding is materialized once for a conv (each input value feeds many output channels) but read in
        # place, bounds-checked, by a depthwise conv: copying would double its memory traffic (2-3x slower)
        pad_names = ("im2col",) if im2col else () if depthwise else ("pad",)
        conv, out = _prepare(sch, "depthwise_nchwc" if depthwise else "conv2d_nchwc", pad_names=pad_names)
        shape = [int(sch.get(loop).extent) for loop in sch.get_loops(out)]
        cfg = conv2d_nchwc.default(shape[3], shape[1], vector_lanes(target, 32), depthwise, block=shape[4])
        reads = {len(r.source.shape): r.source for r in sch.get(conv).reads}
        weight_bytes = _nbytes(reads[6]) if 6 in reads else 0
        cfg = dataclasses.replace(cfg, rows_outer=conv2d_nchwc.rows_outer(
            weight_bytes=weight_bytes, input_bytes=_nbytes(reads[5]) if 5 in reads else 0))
        if not depthwise and not im2col:
            in_blocks = int(reads[6].shape[1])
            cfg = dataclasses.replace(cfg, k_chunk=conv2d_nchwc.k_chunk(cfg, weight_bytes, shape[1], in_blocks))
        steps = conv2d_nchwc.schedule(sch, conv, out, cfg)
        return ["im2col+" + steps[0]] if im2col else steps

    return _attempt("conv2d_nchwc", prim, apply)


def _depthwise_pointwise(sch, target) -> list[str]:
    """The fused depthwise + 1x1 template on a group holding both (passes/fuse_ops.py makes them)."""
    from .target_info import vector_lanes
    from .x86 import depthwise_pointwise

    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    i_dw, i_conv = names.index("depthwise_nchwc"), names.index("conv2d_nchwc")
    between = blocks[i_dw + 1:i_conv]
    for b in [*blocks[:i_dw], *between[:-1], *blocks[i_conv + 1:-1]]:
        sch.compute_inline(b)  # padding read in place (bounds-checked); epilogues into their consumers
    dw, conv = blocks[i_dw], blocks[i_conv]
    row = between[-1] if between else dw
    out = sch.get_child_blocks(sch.get_sblock("root"))[-1]
    shape = [int(sch.get(loop).extent) for loop in sch.get_loops(out)]
    cfg = depthwise_pointwise.default(shape[3], shape[1], vector_lanes(target, 32), block=shape[4])
    return depthwise_pointwise.schedule(sch, dw, row, conv, out, cfg)


def _try_pool_nchwc(prim, target, attrs):
    from .x86 import pool_nchwc

    def apply(sch):
        anchor = next(b for b in sch.get_child_blocks(sch.get_sblock("root"))
                      if sch.get(b).name_hint in pool_nchwc.ANCHORS)
        loops = [int(sch.get(loop).extent) for loop in sch.get_loops(anchor)]
        window = 1
        for extent in loops[5:]:
            window *= extent
        return pool_nchwc.schedule(sch, pool_nchwc.default(loops[3], window))

    return _attempt("pool_nchwc", prim, apply)


def _try_winograd(prim, target, attrs):
    from .target_info import vector_lanes
    from .x86 import winograd

    def apply(sch):
        tiles = int(sch.get(sch.get_loops(sch.get_sblock("wino_M"))[2]).extent)
        return winograd.schedule(sch, winograd.default(tiles, vector_lanes(target, 32), attrs.tile))

    return _attempt("winograd", prim, apply)


def _try_dense_packed(prim, target, attrs):
    from .target_info import vector_lanes
    from .x86 import dense_packed

    def apply(sch):
        if not _has_block(sch, "dense_packed"):
            return None
        dense, out = _prepare(sch, "dense_packed", pad_names=())
        loops = sch.get_loops(out)
        extents = [int(sch.get(loop).extent) for loop in loops[:len(loops) - _n_reduction_axes(sch, out)]]
        if len(extents) < 2:
            return None
        k = int(sch.get(sch.get_loops(dense)[-1]).extent)
        batches = math.prod(extents[:-2])
        cfg = dense_packed.default(extents[-2], extents[-1] // attrs.block, k, lanes=vector_lanes(target, 32),
                                   block=attrs.block, min_tiles=-(-8 // batches))
        return dense_packed.schedule(sch, dense, out, attrs.block, cfg)

    return _attempt("dense_packed", prim, apply)


def _try_batch_matmul(prim, target, attrs):
    from .target_info import vector_lanes
    from .x86 import batch_matmul

    def apply(sch):
        if not _has_block(sch, "matmul") or _n_reduction_axes(sch, sch.get_sblock("matmul")) != 1:
            return None
        matmul, out = _prepare(sch, "matmul", pad_names=())
        *batch, m, n = [int(sch.get(loop).extent) for loop in sch.get_loops(out)]
        k = int(sch.get(sch.get_loops(matmul)[-1]).extent)
        cfg = batch_matmul.default(m, n, k, vector_lanes(target, 32), batches=math.prod(batch))
        return batch_matmul.schedule(sch, matmul, out, cfg)

    return _attempt("batch_matmul", prim, apply)


def _try_rowwise(prim, target, attrs=None):
    """The softmax or layer-norm template, when the group holds its stages (a last-axis softmax, a layer norm
    over one last axis)."""
    from .target_info import vector_lanes
    from .x86 import layer_norm, softmax

    def apply(sch):
        names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
        template = (softmax if set(softmax.STAGES) <= names
                    else layer_norm if set(layer_norm.STAGES) <= names else None)
        if template is None:
            return None
        out = sch.get_sblock(template.STAGES[-1])
        n = int(sch.get(sch.get_loops(out)[-1]).extent)
        return template.schedule(sch, template.default(n, vector_lanes(target, 32)))

    return _attempt("softmax/layer_norm", prim, apply)


def _try_conv2d_transpose(prim, target, attrs):
    from .target_info import vector_lanes
    from .x86 import conv2d_transpose

    def apply(sch):
        if not _has_block(sch, conv2d_transpose.ANCHOR):
            return None
        out = sch.get_child_blocks(sch.get_sblock("root"))[-1]
        shape = [int(sch.get(loop).extent) for loop in sch.get_loops(out)]
        cfg = conv2d_transpose.default(shape[1], shape[3], vector_lanes(target, 32))
        return conv2d_transpose.schedule(sch, cfg)

    return _attempt("conv2d_transpose", prim, apply)


def _try_resize(prim, target, attrs=None):
    """The resize template, when the group holds an image.resize (its tables and epilogues around it)."""
    from .target_info import vector_lanes
    from .x86 import resize

    def apply(sch):
        if not _has_block(sch, resize.ANCHOR):
            return None
        out = sch.get_child_blocks(sch.get_sblock("root"))[-1]
        loops = sch.get_loops(out)
        width = int(sch.get(loops[-1]).extent) if loops else 1
        return resize.schedule(sch, resize.default(width, vector_lanes(target, 32)))

    return _attempt("resize", prim, apply)


# the template each group's anchor op (its conv, dense, pool; None for anchorless reductions such as softmax and
# layer norm) is scheduled with; a template that does not fit returns None and the generic schedule runs
TEMPLATES = {
    "nn.conv2d": _try_conv2d_direct,
    "nn.conv2d_nchwc": _try_conv2d_nchwc,
    "nn.conv2d_winograd_nchwc": _try_winograd,
    "nn.pool2d_nchwc": _try_pool_nchwc,
    "nn.global_avg_pool_nchwc": _try_pool_nchwc,
    "nn.dense_packed": _try_dense_packed,
    "nn.matmul": _try_batch_matmul,
    "nn.conv2d_transpose": _try_conv2d_transpose,
    None: _try_rowwise,
}
