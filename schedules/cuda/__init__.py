"""CUDA schedules: templates for conv2d and dense/matmul that bind blockIdx/threadIdx and stage tiles through
shared memory, and a generic schedule (injective and reduction groups) for everything else.

A template that does not fit a group (an unusual epilogue, a shape no config divides) falls back to the
generic schedule, and the fallback is logged: correct either way, only slower.
"""

from __future__ import annotations

import logging

from kiln.errors import InvalidConfig

from . import conv2d_direct, dense_tiled, generic
from .threads import n_reduction_axes

log = logging.getLogger(__name__)

CONV_BLOCKS = ("conv2d_nchw", "group_conv2d_nchw")
GEMM_BLOCKS = {"nn.dense": "dense", "nn.dense_packed": "dense_packed", "nn.matmul": "matmul"}


def schedule_group(prim, target, anchor=None):
    """(scheduled PrimFunc, description) of one fused group for a CUDA target; `anchor` is (op name, attrs) of
    its conv/dense, if it has one."""
    if anchor is not None:
        name, _attrs = anchor
        template = None
        if name == "nn.conv2d":
            template = _conv2d
        elif name in GEMM_BLOCKS:
            template = _gemm
        if template is not None:
            try:
                return template(prim, anchor)
            except (InvalidConfig, _NotApplicable) as err:
                log.info("%s: CUDA template does not apply (%s); generic schedule used", name, err)
            except Exception as err:  # noqa: BLE001  (TVM's ScheduleError: the template does not fit this group)
                log.info("%s: CUDA template failed (%s); generic schedule used", name,
                         str(err).splitlines()[0][:200])
    return generic.schedule(prim)


class _NotApplicable(Exception):
    pass


def _prepare(prim, anchor_names, keep=()):
    """A schedule with every block but the anchor, the output and `keep` inlined; (sch, anchor, out)."""
    from tvm import s_tir

    sch = s_tir.Schedule(prim)
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in blocks]
    hits = [b for b, name in zip(blocks, names) if name in anchor_names]
    if len(hits) != 1:
        raise _NotApplicable(f"expected one of {anchor_names} in the group, found blocks {names}")
    anchor = hits[0]
    for b, name in zip(blocks[:-1], names[:-1]):
        if name not in anchor_names and name not in keep:
            sch.compute_inline(b)
    rest = list(sch.get_child_blocks(sch.get_sblock("root")))
    out = rest[-1]
    if len(sch.get_loops(out)) != len(_shape(sch, out)) + (n_reduction_axes(sch, out)):
        raise _NotApplicable("the output block is not a plain loop nest")
    return sch, anchor, out


def _shape(sch, block) -> tuple[int, ...]:
    return tuple(int(d) for d in sch.get(block).writes[0].source.shape)


def _conv2d(prim, anchor):
    attrs = anchor[1]
    sch, conv, out = _prepare(prim, CONV_BLOCKS, keep=("pad_temp",))
    n, oc, oh, ow = _shape(sch, conv)
    if _shape(sch, out) != (n, oc, oh, ow):
        raise _NotApplicable(f"epilogue changes the shape to {_shape(sch, out)}")
    weight = sch.get(conv).reads[1].source
    _, ic, kh, kw = (int(d) for d in weight.shape)
    wl = conv2d_direct.Workload(n, oc, oh, ow, ic, kh, kw, tuple(attrs.strides), tuple(attrs.dilation),
                                attrs.groups, dtype_bytes=_dtype_bytes(weight.dtype))
    steps = conv2d_direct.schedule(sch, conv, out, wl, conv2d_direct.default(wl))
    return sch.mod["main"], "+".join(steps)


def _gemm(prim, anchor):
    sch, gemm, out = _prepare(prim, (GEMM_BLOCKS[anchor[0]],))
    shape = _shape(sch, gemm)
    if len(shape) < 2 or _shape(sch, out) != shape:
        raise _NotApplicable(f"output {shape} with epilogue {_shape(sch, out)}")
    batch = 1
    for d in shape[:-2]:
        batch *= d
    k = int(sch.get(sch.get_loops(gemm)[-1]).extent)
    wl = dense_tiled.Workload(batch, shape[-2], shape[-1], k,
                              dtype_bytes=_dtype_bytes(sch.get(gemm).reads[0].source.dtype))
    steps = dense_tiled.schedule(sch, gemm, out, wl, dense_tiled.default(wl))
    return sch.mod["main"], "+".join(steps)


def _dtype_bytes(dtype) -> int:
    import tvm

    return max(1, tvm.DataType(str(dtype)).bits // 8)
