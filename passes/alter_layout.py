"""Alter op layout: run conv chains in the blocked NCHW[b]c layout, with conv weights packed at compile time.

A conv2d (groups 1, depthwise, or groups of whole blocks) whose output channels split into blocks becomes
nn.conv2d_nchwc; the values between convs stay blocked as long as their consumers are layout-agnostic:
elementwise ops (a per-channel constant operand is repacked at compile time), residual adds of two blocked
values, max/avg pooling, global average pooling, and channel concatenation. A layout_transform back to NCHW
is inserted only where a value reaches an op that needs NCHW (or the function's output), once per value; a
transform into a blocked layout of a value that was just transformed out of it is dropped, so adjacent
transforms cancel.

The block size comes from `mod.attrs["layout_block"]` (the target's fp32 SIMD lanes, set by the driver;
16 if absent). A conv whose output channels it does not divide gets zero channels up to a whole block when
that adds at most 1/8 more work (1000 → 1008), else a block of half, then a quarter (not below 4). Padding
channels are zeros that only finite-preserving elementwise ops, pooling and convs (with zero weights for them)
may touch; concatenation and the way back to NCHW drop them. Where the target's pointwise register tile spans
several channel blocks (`mod.attrs["conv_channel_tile"]`, AVX2's 3 columns × 4 blocks), a 1x1 stride-1 conv also
gets zero channels up to a whole tile when that adds at most 1/32 more work (1000 → 1024).
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
from kiln.ir.ops.elementwise import DEQUANTIZE, QUANTIZE
from kiln.ir.ops.pool import AVG_POOL, GLOBAL_AVG_POOL, MAX_POOL
from kiln.ir.ops.qconv import QCONV2D, QCONV2D_NCHWC, QConvNCHWcAttrs, pack_qconv_weight
from kiln.ir.ops.transform import CONCATENATE
from kiln.ir.ops.winograd import CONV2D_WINOGRAD, WinogradAttrs
from kiln.ir.ops.winograd import supports as winograd_supports
from kiln.ir.ops.winograd import transform_weight as winograd_weight
from kiln.ir.visitor import children, post_order, with_children

DEFAULT_BLOCK = 16
# elementwise ops that map finite inputs to finite outputs: the only ones allowed on zero-padded channels (a
# padding lane that became inf or NaN would poison the next conv through its zero weights: 0 * inf = NaN)
FINITE_OPS = frozenset({
    "add", "subtract", "multiply", "maximum", "minimum", "nn.relu", "clip", "sigmoid", "tanh",
    "nn.hard_swish",
    "nn.hard_sigmoid", "nn.leaky_relu", "negative", "abs", "qnn.quantize", "qnn.dequantize", "qnn.requantize",
})


def _per_tensor_quant(call: Call) -> bool:
    """A quantize or dequantize whose scale and zero point are single values: elementwise whatever the layout,
    so a QDQ model's activations stay blocked between convs (their `axis` then means nothing)."""
    return call.op in (QUANTIZE, DEQUANTIZE) and all(a.ttype.size == 1 for a in call.args[1:])


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
    def __init__(self, block: int, algorithms: dict, channel_tile: int = 1):
        self.block, self.algorithms, self.channel_tile = block, algorithms, channel_tile
        self.plain: dict[int, Expr] = {}  # node id -> its value in NCHW (or original layout)
        self.blocked: dict[int, tuple[Expr, int]] = {}  # node id -> (its value in NCHW[b]c, b)
        self.logical: dict[int, int] = {}  # node id -> real channel count, when its blocked value is padded
        self.pending_logical = 0

    # --- moving values between layouts ---

    def as_plain(self, node: Expr) -> Expr:
        if id(node) not in self.plain:
            e, b = self.blocked[id(node)]
            self.plain[id(node)] = _transform(e, b, 0, self.logical.get(id(node), 0))
        return self.plain[id(node)]

    def as_blocked(self, node: Expr, b: int) -> Expr:
        if id(node) in self.blocked:
            e, have = self.blocked[id(node)]
            if have == b:
                return e
            if id(node) not in self.logical:
                return _transform(e, have, b)
        return _transform(self.as_plain(node), 0, b)

    def padded(self, *nodes: Expr) -> bool:
        return any(id(n) in self.logical for n in nodes)

    def keep_padding(self, new: tuple[Expr, int], like: Expr) -> tuple[Expr, int]:
        """`new` holds `like`'s zero-padded channels too: remember its real channel count."""
        if id(like) in self.logical:
            self.pending_logical = self.logical[id(like)]
        return new

    # --- the walk ---

    def visit(self, node: Expr) -> None:
        if isinstance(node, Call) and isinstance(node.op, OpDef):
            self.pending_logical = 0
            new = self.try_blocked(node)
            if new is not None:
                self.blocked[id(node)] = new
                if self.pending_logical:
                    self.logical[id(node)] = self.pending_logical
                return
        kids = children(node)
        self.plain[id(node)] = with_children(node, tuple(self.as_plain(c) for c in kids)) if kids else node

    def try_blocked(self, call: Call) -> tuple[Expr, int] | None:
        op = call.op
        if op is CONV2D:
            return self.conv(call)
        if op is QCONV2D:
            return self.qconv(call)
        args = call.args
        if not any(id(a) in self.blocked for a in args):
            return None
        if op in (MAX_POOL, AVG_POOL) and len(call.attrs.kernel) == 2 and id(args[0]) in self.blocked:
            e, b = self.blocked[id(args[0])]
            kind = "max" if op is MAX_POOL else "avg"
            pooled = Call(POOL2D_NCHWC, (e,), PoolNCHWcAttrs(kind, call.attrs), call.span)
            return self.keep_padding((pooled, b), args[0])
        if op is GLOBAL_AVG_POOL and call.ttype.ndim == 4 and id(args[0]) in self.blocked:
            e, b = self.blocked[id(args[0])]
            return self.keep_padding((Call(GLOBAL_AVG_POOL_NCHWC, (e,), call.attrs, call.span), b), args[0])
        if (
            op is CONCATENATE
            and call.attrs.axis in (1, -3)
            and all(id(a) in self.blocked for a in args)
            and not self.padded(*args)  # padding channels would land between the inputs' channels
        ):
            b = self.blocked[id(args[0])][1]
            return Call(
                CONCATENATE,
                tuple(self.as_blocked(a, b) for a in args),
                dataclasses.replace(call.attrs, axis=1),
                call.span,
            ), b
        if op.pattern in (OpPattern.ELEMWISE, OpPattern.BROADCAST) and (
                not hasattr(call.attrs, "axis") or _per_tensor_quant(call)):
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
        if 1 < a.groups and not (a.groups == c == oc and w.ttype.shape[1] == 1):
            return self.grouped_conv(call)
        depthwise = a.groups != 1
        if id(x) in self.blocked:
            xe, ib = self.blocked[id(x)]
            c_in = xe.ttype.shape[1] * ib  # the input's channels as stored, zero-padded ones included
        else:
            xe, ib = None, block_for(c, self.block) or c
            c_in = c
        if depthwise:
            ob, oc_out = ib, c_in
            if ob < 4:
                return None
        else:
            ob = block_for(oc, self.block)
            if (ob is None or ob < self.block) and _pads_cheaply(oc, self.block):
                ob = self.block  # a few zero channels cost less than vectors of half the width
            if ob is None:
                return None
            oc_out = -(-oc // ob) * ob
            if ob == self.block and self.algorithms.get(call.span, "direct") == "direct" and _pointwise(w, a):
                oc_out = _whole_tiles(oc, oc_out, ob * self.channel_tile)
        weights = w.value
        if (oc_out, c_in) != (oc, c) and not depthwise:
            weights = np.zeros((oc_out, c_in) + w.value.shape[2:], w.value.dtype)
            weights[:oc, :c] = w.value
        elif oc_out != oc:
            weights = np.zeros((oc_out,) + w.value.shape[1:], w.value.dtype)
            weights[:oc] = w.value
        if oc_out != oc:
            self.pending_logical = oc
        if depthwise:
            a = dataclasses.replace(a, groups=oc_out)
        if xe is not None:
            x_blocked = xe
        elif block_for(c, self.block) is None and not depthwise:
            x_blocked = self.as_plain(x)  # too few channels to block (an image): the conv reads NCHW itself
        else:
            x_blocked = self.as_blocked(x, ib)
        algo = self.algorithms.get(call.span, "direct")
        # Winograd's transforms lose about two digits a conv: float32 only (its weights are float32 too)
        if (algo in ("winograd2", "winograd4") and winograd_supports(x.ttype.shape, w.ttype.shape, a)
                and str(x.ttype.dtype) == "float32"):
            m = 2 if algo == "winograd2" else 4
            u = Constant(winograd_weight(weights, m, ob), name=w.name)
            x5 = x_blocked if x_blocked.ttype.ndim == 5 else self.as_blocked(x, ib)
            return Call(CONV2D_WINOGRAD, (x5, u), WinogradAttrs(a, m, ob), call.span), ob
        packed = Constant(pack_conv_weight(weights, 1 if depthwise else ib, ob), name=w.name)
        attrs = ConvNCHWcAttrs(a, ob, "im2col" if algo == "im2col" and not depthwise else "direct")
        return Call(CONV2D_NCHWC, (x_blocked, packed), attrs, call.span), ob

    def qconv(self, call: Call) -> tuple[Expr, int] | None:
        """A uint8 × int8 conv (passes/realize_qdq.py): blocked like a float one, its input blocks a multiple of
        the 4 channels one lane's dot product sums (block_for never gives fewer)."""
        x, w = call.args
        c, oc = x.ttype.shape[1], w.ttype.shape[0]
        if id(x) in self.blocked:
            xe, ib = self.blocked[id(x)]
            c_in = xe.ttype.shape[1] * ib
        else:
            xe, ib, c_in = None, block_for(c, self.block), c
        ob = block_for(oc, self.block)
        if (ob is None or ob < self.block) and _pads_cheaply(oc, self.block):
            ob = self.block
        if ob is None or ib is None or ib % 4:
            return None
        oc_out = -(-oc // ob) * ob
        weights = w.value
        if (oc_out, c_in) != (oc, c):
            weights = np.zeros((oc_out, c_in) + w.value.shape[2:], w.value.dtype)
            weights[:oc, :c] = w.value  # zero weights for padded input channels: whatever they hold adds 0
        if oc_out != oc:
            self.pending_logical = oc
        x_blocked = xe if xe is not None else self.as_blocked(x, ib)
        attrs = QConvNCHWcAttrs(call.attrs.conv, call.attrs.x_zero_point, ob)
        packed = Constant(pack_qconv_weight(weights, ib, ob), name=w.name)
        return Call(QCONV2D_NCHWC, (x_blocked, packed), attrs, call.span), ob

    def grouped_conv(self, call: Call) -> tuple[Expr, int] | None:
        """Grouped (not depthwise): blocked when every group is whole blocks of the full vector width on both
        sides and the input is stored unpadded; it stays NCHW otherwise (choose.candidates says the same)."""
        x, w = call.args
        a, b = call.attrs, self.block
        c, oc = x.ttype.shape[1], w.ttype.shape[0]
        if (c // a.groups) % b or (oc // a.groups) % b:
            return None
        if id(x) in self.blocked:
            xe, ib = self.blocked[id(x)]
            if ib != b or xe.ttype.shape[1] * ib != c:
                return None
        else:
            xe = self.as_blocked(x, b)
        packed = Constant(pack_conv_weight(w.value, b, b), name=w.name)
        return Call(CONV2D_NCHWC, (xe, packed), ConvNCHWcAttrs(a, b, "direct"), call.span), b

    def elementwise(self, call: Call) -> tuple[Expr, int] | None:
        blocked = [a for a in call.args if id(a) in self.blocked]
        full = [a for a in blocked if a.ttype.shape == call.ttype.shape]
        if not full:
            return None  # the op broadcasts the blocked value itself
        b = self.blocked[id(full[0])][1]
        plain_shape = call.ttype.shape
        channels = plain_shape[1]
        new = []
        padded = {self.logical.get(id(a), 0) for a in blocked}
        if padded != {0} and (len(padded) > 1 or not _keeps_finite(call)):
            return None  # padding lanes hold zeros; only ops that keep them finite may run on them
        stored = self.blocked[id(full[0])][0].ttype.shape[1] * b
        for a in call.args:
            if id(a) in self.blocked:
                # same shape, or per (batch, channel) as a squeeze-excitation scale is: [N, C, 1, 1]
                if a.ttype.shape != plain_shape and not _per_channel(a.ttype.shape, plain_shape):
                    return None
                new.append(self.as_blocked(a, b))
            elif isinstance(a, Constant):
                packed = _pack_channel_constant(a, channels, b, stored)
                if packed is None:
                    return None
                new.append(packed)
            else:
                return None
        return self.keep_padding((Call(call.op, tuple(new), call.attrs, call.span), b), full[0])


def _keeps_finite(call: Call) -> bool:
    """A FINITE_OPS op, or a cast of integers to float (a quantized conv's sum on its way to float32)."""
    if call.op.name in FINITE_OPS:
        return True
    return (call.op.name == "cast" and str(call.args[0].ttype.dtype).startswith(("int", "uint"))
            and str(call.ttype.dtype) == "float32")


def _per_channel(shape: tuple, full: tuple) -> bool:
    return len(shape) == 4 and shape[1] == full[1] and shape[0] in (1, full[0]) and shape[2:] == (1, 1)


def _transform(e: Expr, src: int, dst: int, channels: int = 0) -> Expr:
    if src == dst:
        return e
    back = (isinstance(e, Call) and e.op is LAYOUT_TRANSFORM
            and (e.attrs.dst_block, e.attrs.src_block) == (src, dst))
    if back and not e.attrs.channels and not channels:
        return e.args[0]  # a transform straight back: cancel the pair
    return Call(LAYOUT_TRANSFORM, (e,), LayoutTransformAttrs(src, dst, channels))


def _pads_cheaply(channels: int, block: int) -> bool:
    """Zero-pad the output channels to a whole block when that adds at most 1/8 more work (1000 → 1008)."""
    extra = -channels % block
    return 0 < extra and 8 * extra <= channels


def _pointwise(w: Constant, a) -> bool:
    """A 1x1 ungrouped conv at stride 1 with no padding: the x86 template runs its plane as one row, where
    a guarded column tail costs little and the channel blocks set the tile."""
    return (w.ttype.shape[2:] == (1, 1) and a.groups == 1 and all(s == 1 for s in a.strides)
            and not any(a.padding))


def _whole_tiles(channels: int, stored: int, tile: int) -> int:
    """`stored` rounded up to whole register tiles of `tile` channels, where that adds at most 1/32 more work.
    SqueezeNet's 512→1000 1x1 conv at 13×13 on Zen 3 (AVX2, 2026-12-03): 125 blocks of 8 admit no tile of
    more than one block (12 × 1, 83 GFLOPS; tuned 13 × 1, 91); padded to 1024 it runs the flat 3 × 4 tile at
    157 GFLOPS, 1.13 ms against ONNX Runtime's 1.14 for the 1000 channels."""
    whole = -(-stored // tile) * tile
    return whole if tile > 1 and 32 * (whole - channels) <= channels else stored


def _pack_channel_constant(c: Constant, channels: int, b: int, stored: int | None = None) -> Constant | None:
    """A constant broadcast against NCHW as a scalar or per channel, rewritten to broadcast against NCHWc
    (zero-padded to `stored` channels when the blocked value is padded)."""
    v = c.value
    if v.size == 1:
        return Constant(v.reshape(()), name=c.name) if v.ndim > 4 else c
    shape = v.shape[-3:] if v.ndim >= 3 and all(d == 1 for d in v.shape[:-3]) else None
    if shape is None or shape != (channels, 1, 1):
        return None
    stored = stored or channels
    flat = np.zeros(stored, v.dtype)
    flat[:channels] = v.reshape(channels)
    return Constant(np.ascontiguousarray(flat.reshape(stored // b, 1, 1, b)), name=c.name)


def alter_layout(mod: IRModule) -> IRModule:
    block = int(mod.attrs.get("layout_block", DEFAULT_BLOCK))
    if block < 4:
        return mod
    fn = mod.main
    r = _Rewriter(block, dict(mod.attrs.get("conv_algorithms", {})), int(mod.attrs.get("conv_channel_tile", 1) or 1))
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
