"""Alter op layout: run conv chains in the blocked NCHW[b]c layout, with conv weights packed at compile time.

A conv2d (groups 1, or depthwise) whose output channels split into blocks becomes nn.conv2d_nchwc; the values
between convs stay blocked as long as their consumers are layout-agnostic: elementwise ops (a per-channel
constant operand is repacked at compile time), residual adds of two blocked values, max/avg pooling, global
average pooling, and channel concatenation. A layout_transform back to NCHW is inserted only where a value
reaches an op that needs NCHW (or the function's output), once per value; a transform into a blocked layout
of a value that was just transformed out of it is dropped, so adjacent transforms cancel.

The block size comes from `mod.attrs["layout_block"]` (the target's fp32 SIMD lanes, set by the driver;
16 if absent); a conv whose output channels it does not divide tries half, then a quarter (not below 4).
`mod.attrs["conv_algorithms"]` maps a conv's span to the algorithm chosen for it (schedules/choose.py, by the
driver): "direct" (the default), "im2col", "winograd2"/"winograd4" (F(2x2)/F(4x4, 3x3), weights transformed
here, at compile time) or "nchw" (stays out of the blocked layout).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from kiln.ir import Call, Constant, Expr, Function, IRModule, TensorType, Var
from kiln.ir.op import OpDef, OpPattern
from kiln.ir.ops.blocked import (
    CONV2D_NCHWC,
    GLOBAL_AVG_POOL_NCHWC,
    LAYOUT_TRANSFORM,
    POOL2D_NCHWC,
    ConvNCHWcAttrs,
    LayoutTransformAttrs,
    PoolNCHWcAttrs,
    pack_conv_weight,
)
from kiln.ir.ops.conv import CONV2D
from kiln.ir.ops.pool import AVG_POOL, GLOBAL_AVG_POOL, MAX_POOL
from kiln.ir.ops.transform import CONCATENATE
from kiln.ir.ops.winograd import CONV2D_WINOGRAD, WinogradAttrs
from kiln.ir.ops.winograd import supports as winograd_supports
from kiln.ir.ops.winograd import transform_weight as winograd_weight
from kiln.ir.visitor import children, post_order, with_children

DEFAULT_BLOCK = 16


def block_for(channels: int, block: int) -> int | None:
    for b in (block, block // 2, block // 4):
        if b >= 4 and channels % b == 0:
            return b
    return None


def count_layout_transforms(mod: IRModule) -> int:
    """layout_transform calls in main, fused groups included."""
    n = 0
    for e in post_order(mod.main.body):
        if isinstance(e, Call) and e.op is LAYOUT_TRANSFORM:
            n += 1
        elif isinstance(e, Call) and isinstance(e.op, Function):
            n += sum(1 for i in post_order(e.op.body) if isinstance(i, Call) and i.op is LAYOUT_TRANSFORM)
    return n


class _Rewriter:
    def __init__(self, block: int, algorithms: dict):
        self.block, self.algorithms = block, algorithms
        self.plain: dict[int, Expr] = {}  # node id -> its value in NCHW (or original layout)
        self.blocked: dict[int, tuple[Expr, int]] = {}  # node id -> (its value in NCHW[b]c, b)

    # --- moving values between layouts ---

    def as_plain(self, node: Expr) -> Expr:
        if id(node) not in self.plain:
            e, b = self.blocked[id(node)]
            self.plain[id(node)] = _transform(e, b, 0)
        return self.plain[id(node)]

    def as_blocked(self, node: Expr, b: int) -> Expr:
        if id(node) in self.blocked:
            e, have = self.blocked[id(node)]
            return e if have == b else _transform(e, have, b)
        return _transform(self.as_plain(node), 0, b)

    # --- the walk ---

    def visit(self, node: Expr) -> None:
        if isinstance(node, Call) and isinstance(node.op, OpDef):
            new = self.try_blocked(node)
            if new is not None:
                self.blocked[id(node)] = new
                return
        kids = children(node)
        self.plain[id(node)] = with_children(node, tuple(self.as_plain(c) for c in kids)) if kids else node

    def try_blocked(self, call: Call) -> tuple[Expr, int] | None:
        op = call.op
        if op is CONV2D:
            return self.conv(call)
        args = call.args
        if not any(id(a) in self.blocked for a in args):
            return None
        if op in (MAX_POOL, AVG_POOL) and len(call.attrs.kernel) == 2:
            e, b = self.blocked[id(args[0])]
            return Call(
                POOL2D_NCHWC, (e,), PoolNCHWcAttrs("max" if op is MAX_POOL else "avg", call.attrs), call.span
            ), b
        if op is GLOBAL_AVG_POOL and call.ttype.ndim == 4:
            e, b = self.blocked[id(args[0])]
            return Call(GLOBAL_AVG_POOL_NCHWC, (e,), call.attrs, call.span), b
        if op is CONCATENATE and call.attrs.axis in (1, -3) and all(id(a) in self.blocked for a in args):
            b = self.blocked[id(args[0])][1]
            return Call(
                CONCATENATE,
                tuple(self.as_blocked(a, b) for a in args),
                dataclasses.replace(call.attrs, axis=1),
                call.span,
            ), b
        if op.pattern in (OpPattern.ELEMWISE, OpPattern.BROADCAST) and not hasattr(call.attrs, "axis"):
            return self.elementwise(call)
        return None

    def conv(self, call: Call) -> tuple[Expr, int] | None:
        x, w = call.args
        a = call.attrs
        if (
            not isinstance(w, Constant)
            or x.ttype.ndim != 4
            or not x.ttype.is_static
            or self.algorithms.get(call.span) == "nchw"
        ):
            return None
        c, oc = x.ttype.shape[1], w.ttype.shape[0]
        depthwise = a.groups != 1
        if depthwise and not (a.groups == c == oc and w.ttype.shape[1] == 1):
            return None  # grouped, not depthwise: stays NCHW
        if depthwise:
            ob = self.blocked[id(x)][1] if id(x) in self.blocked else block_for(c, self.block)
            ib = ob
        else:
            ob = block_for(oc, self.block)
            ib = self.blocked[id(x)][1] if id(x) in self.blocked else (block_for(c, self.block) or c)
        if ob is None:
            return None
        algo = self.algorithms.get(call.span, "direct")
        if algo in ("winograd2", "winograd4") and winograd_supports(x.ttype.shape, w.ttype.shape, a):
            m = 2 if algo == "winograd2" else 4
            u = Constant(winograd_weight(w.value, m, ob), name=w.name)
            return Call(CONV2D_WINOGRAD, (self.as_blocked(x, ib), u), WinogradAttrs(a, m, ob), call.span), ob
        packed = Constant(pack_conv_weight(w.value, 1 if depthwise else ib, ob), name=w.name)
        attrs = ConvNCHWcAttrs(a, ob, "im2col" if algo == "im2col" and not depthwise else "direct")
        return Call(CONV2D_NCHWC, (self.as_blocked(x, ib), packed), attrs, call.span), ob

    def elementwise(self, call: Call) -> tuple[Expr, int] | None:
        blocked = [a for a in call.args if id(a) in self.blocked]
        full = [a for a in blocked if a.ttype.shape == call.ttype.shape]
        if not full:
            return None  # the op broadcasts the blocked value itself
        b = self.blocked[id(full[0])][1]
        plain_shape = call.ttype.shape
        channels = plain_shape[1]
        new = []
        for a in call.args:
            if id(a) in self.blocked:
                # same shape, or per (batch, channel) as a squeeze-excitation scale is: [N, C, 1, 1]
                if a.ttype.shape != plain_shape and not _per_channel(a.ttype.shape, plain_shape):
                    return None
                new.append(self.as_blocked(a, b))
            elif isinstance(a, Constant):
                packed = _pack_channel_constant(a, channels, b)
                if packed is None:
                    return None
                new.append(packed)
            else:
                return None
        return Call(call.op, tuple(new), call.attrs, call.span), b


def _per_channel(shape: tuple, full: tuple) -> bool:
    return len(shape) == 4 and shape[1] == full[1] and shape[0] in (1, full[0]) and shape[2:] == (1, 1)


def _transform(e: Expr, src: int, dst: int) -> Expr:
    if src == dst:
        return e
    if (
        isinstance(e, Call)
        and e.op is LAYOUT_TRANSFORM
        and e.attrs.dst_block == src
        and e.attrs.src_block == dst
    ):
        return e.args[0]  # a transform straight back: cancel the pair
    return Call(LAYOUT_TRANSFORM, (e,), LayoutTransformAttrs(src, dst))


def _pack_channel_constant(c: Constant, channels: int, b: int) -> Constant | None:
    """A constant broadcast against NCHW as a scalar or per channel, rewritten to broadcast against NCHWc."""
    v = c.value
    if v.size == 1:
        return Constant(v.reshape(()), name=c.name) if v.ndim > 4 else c
    shape = v.shape[-3:] if v.ndim >= 3 and all(d == 1 for d in v.shape[:-3]) else None
    if shape is None or shape != (channels, 1, 1):
        return None
    return Constant(
        np.ascontiguousarray(v.reshape(channels // b, b, 1, 1).transpose(0, 2, 3, 1)), name=c.name
    )


def alter_layout(mod: IRModule) -> IRModule:
    block = int(mod.attrs.get("layout_block", DEFAULT_BLOCK))
    if block < 4:
        return mod
    fn = mod.main
    r = _Rewriter(block, dict(mod.attrs.get("conv_algorithms", {})))
    for node in post_order(fn.body):
        if isinstance(node, Var):
            r.plain[id(node)] = node
        elif isinstance(node, Function):
            r.plain[id(node)] = node
        else:
            r.visit(node)
    if not r.blocked:
        return mod
    body = r.as_plain(fn.body)
    return mod.with_main(Function(fn.params, body, fn.attrs))


def plain_type_of(t: TensorType) -> TensorType:
    """The NCHW type of an NCHW[b]c type (for reports)."""
    n, cb, h, w, b = t.shape
    return TensorType((n, cb * b, h, w), t.dtype)
