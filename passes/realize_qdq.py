"""Run a QDQ model's convs on their integers: conv(dequantize(x_q), W) → qnn.conv2d(x_q, W_q) · scale.

A QDQ model (ONNX Runtime's `quantize_static`) writes every conv as DequantizeLinear → Conv → QuantizeLinear;
computed as written, the conv runs in float32 on dequantized values and the quantization only adds work. Here
a conv whose input is a per-tensor uint8 dequantize and whose (folded) float weights are int8 values times a
per-tensor or per-channel scale becomes

    cast(qnn.conv2d(x_q, W_q) - zx * sum(W_q[o]), float32) * (sx * sw[o])

which is the same number (the int32 sum is exact where the float one rounds), with the zero-point correction
exact in int32 too. qnn.conv2d's kernel multiplies bytes (VNNI: 64 multiply-adds an instruction against 16
float FMAs), and its input stays uint8 in memory: the quantize before it now ends the producer's kernel.

The frontend folds DequantizeLinear of constant weights at import, so the int8 weights are recovered here: W is
taken as int8 exactly when, per output channel, W / s rounds to integers in [-128, 127] for some s (see
`int8_weights`), and W_q · s gives W back to float32 rounding. Weights that are not (a float model's, a
batch norm folded after quantizing, uint8 weights with a zero point) keep the float conv.

The same, in order of the pass:
- int8 activation pairs become uint8 ones with zero point + 128, the same values (`_unsigned_activations`);
- MatMul and Gemm (nn.dense with constant weights) of a uint8 dequantize take a packed int8 dense
  (`_realize_dense`); QLinearConv/ConvInteger and MatMulInteger, which the frontend writes as int32 ops of
  cast(x) - zx, take the same kernels, zx read at run time where DynamicQuantizeLinear computes it
  (`_realize_integer`, `_realize_integer_dense`); their float64 requantization stays as the spec computes it;
- a conv that cannot run on integers (depthwise, grouped) but reads a dequantize of zero point 0 reads the
  bytes, with the scale folded into its weights (`_bytes_in`);
- quantize(relu?(conv · s + b)) becomes one qnn.requantize (`_Requantizer`); any other quantize of a conv's
  output multiplies by 1/scale instead of dividing (`QuantAttrs.reciprocal`, which says why that is no loss).

Only where the driver says the target multiplies bytes (`mod.attrs["int8_dot"]`: "vnni" with AVX-512 VNNI,
"madd" with AVX2's vpmaddubsw, whose int16 pair sums take only weights |w| ≤ 64: `DotKind.weight_limit`) and the
model computes in float32: elsewhere an int32 conv would be slower than the float one.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from kiln.ir import Call, Constant, Expr, Function, IRModule
from kiln.ir.op import OpPattern
from kiln.ir.ops.conv import CONV2D
from kiln.ir.ops.dense import DENSE
from kiln.ir.ops.elementwise import (
    ADD, CAST, CLIP, DEQUANTIZE, MULTIPLY, QUANTIZE, RELU, SUBTRACT, CastAttrs, clip_bounds,
)
from kiln.ir.ops.qconv import DOT, QCONV2D, REQUANTIZE, QConvAttrs, RequantizeAttrs
from kiln.ir.ops.qdense import QDENSE_PACKED, QDenseAttrs, pack_qdense_weight
from kiln.ir.ops.transform import RESHAPE, ReshapeAttrs
from kiln.ir.visitor import children, post_order, rewrite_calls, with_children

_TOLERANCE = 1e-4  # how far from an integer W / s may be: float32 rounding of q · s and of max|W| is ~1e-5 at 127
_SAMPLE = 64  # elements per channel that screen the candidate scales before the whole channel is checked


def int8_weights(w: np.ndarray, top: int = 127) -> tuple[np.ndarray, np.ndarray] | None:
    """(W_q int8, scale per output channel) with W_q · scale == W to float32 rounding, or None.

    A channel's largest |W| is k · s for some integer k ≤ top + 1 (top where symmetric max-abs quantization made
    the scale; less where the scale came from elsewhere, as QAT exports do), so s is found among max|W| / k:
    every k is screened on a sample of the channel at once, and the first that leaves it integral is checked on
    all of it. Per-tensor scales are per-channel ones that happen to be equal. A float model's weights fail the
    screen (each element lands within 1e-4 of the grid by chance 2e-4 of the time)."""
    o = w.shape[0]
    flat = w.astype(np.float64).reshape(o, -1)
    peak = np.abs(flat).max(axis=1)
    ks = np.concatenate([[top, top + 1.0], np.arange(top - 1.0, 0.0, -1.0)])  # top 63: 7-bit weights
    q = (flat[:, :_SAMPLE] / np.where(peak > 0, peak, 1.0)[:, None])[None] * ks[:, None, None]
    fits = (np.abs(q - np.rint(q)) <= _TOLERANCE).all(axis=2)  # [k, channel]
    fits[1] &= flat.max(axis=1) < peak  # top + 1 steps reach only -(top + 1): the peak must be negative
    fits[:, peak == 0] = False
    k = np.zeros(o)
    k[peak == 0] = 1.0
    out = np.zeros(flat.shape)
    for _ in range(len(ks)):  # each channel's first k that fits its sample, then the next if all of it does not
        todo = np.flatnonzero(k == 0)
        if todo.size == 0:
            break
        left = fits[:, todo]
        if not left.any(axis=0).all():
            return None  # a channel no scale fits: not int8 weights
        first = left.argmax(axis=0)
        trial = flat[todo] / (peak[todo] / ks[first])[:, None]
        r = np.rint(trial)
        ok = (np.abs(trial - r) <= _TOLERANCE).all(axis=1) & (r.min(axis=1) >= -128) & (r.max(axis=1) <= 127)
        k[todo[ok]] = ks[first[ok]]
        out[todo[ok]] = r[ok]
        fits[first[~ok], todo[~ok]] = False
    if (k == 0).any():
        return None
    return out.astype(np.int8).reshape(w.shape), np.where(peak > 0, peak / k, 1.0)


def _scalar(e: Expr) -> float | None:
    return float(e.value.reshape(())) if isinstance(e, Constant) and e.value.size == 1 else None


@dataclasses.dataclass(frozen=True)
class DotKind:
    """What one kind of integer kernel multiplies: the activations' byte type, the largest |W_q| it multiplies
    exactly (vpmaddubsw's int16 pair sums take only |w| ≤ 64), the grid int8_weights looks for
    (max|W| = k · s for k ≤ top, + 1) and the dense unit blocks (the target's int32 vectors). Passed to each
    rewrite rather than kept in a module global, so two modules realized at once in two threads do not see each
    other's kind."""

    name: str
    activations: str
    weight_limit: int
    top: int
    blocks: tuple[int, ...]

    def fits(self, wq: np.ndarray) -> bool:
        return self.name == "vnni" or int(np.abs(wq.astype(np.int32)).max(initial=0)) <= self.weight_limit

    def block(self, units: int) -> int | None:
        return next((b for b in self.blocks if units % b == 0), None)


DOT_KINDS = {"vnni": DotKind("vnni", "uint8", 128, 127, (16, 8, 4)),
             "madd": DotKind("madd", "uint8", 64, 63, (8, 4)),
             "sdot": DotKind("sdot", "int8", 128, 127, (4,))}


def _centred_bytes(x: Expr) -> tuple[Expr, Expr | None] | None:
    """(x_q, zx) of cast(x_q, int32) - zx with x_q uint8 and zx one int32 value (None: no zero point), as the
    frontend writes the operand of an integer conv or matmul; else None."""
    zx = None
    if isinstance(x, Call) and x.op is SUBTRACT and x.args[1].ttype.size == 1 and x.args[1].ttype.dtype == "int32":
        x, zx = x.args[0], x.args[1]
    if not (isinstance(x, Call) and x.op is CAST and str(x.args[0].ttype.dtype) == "uint8"):
        return None
    return x.args[0], zx


def _realize_integer(call: Call, kind: DotKind) -> Expr | None:
    """An int32 conv of a centred uint8 input and int8-valued weights (QLinearConv, ConvInteger as the frontend
    writes them: cast(x) - zx, weights w - zw folded): qnn.conv2d on the bytes less zx·ΣW[o], the same int32."""
    x, w = call.args
    if call.attrs.groups != 1 or not isinstance(w, Constant) or w.value.ndim != 4:
        return None
    centred = _centred_bytes(x)
    if centred is None or (centred[1] is not None and _scalar(centred[1]) is None) or kind.activations != "uint8":
        return None  # the padding must hold the zero point: a constant; sdot's kernels take int8 bytes
    xq, zx = centred
    zp = int(_scalar(zx)) if zx is not None else 0
    if xq.ttype.shape[1] % DOT or not 0 <= zp <= 255 or w.value.min() < -128 or w.value.max() > 127 \
            or not kind.fits(w.value):
        return None
    wq = w.value.astype(np.int8)
    out = Call(QCONV2D, (xq, Constant(wq, name=w.name)), QConvAttrs(dataclasses.replace(call.attrs, out_dtype=None),
                                                                    zp), call.span)
    if zp:
        wsum = wq.astype(np.int64).reshape(wq.shape[0], -1).sum(axis=1)
        out = Call(SUBTRACT, (out, Constant((zp * wsum).astype(np.int32).reshape(1, -1, 1, 1))), None, call.span)
    return out


def _realize_integer_dense(call: Call, kind: DotKind) -> Expr | None:
    """MatMulInteger / QLinearMatMul as the frontend writes them, an int32 dense of cast(x_q) - zx with folded
    int8-valued weights: qnn.dense_packed on the bytes less zx · ΣW[n], the same int32. zx may be computed at
    run time (DynamicQuantizeLinear's zero point, in ONNX Runtime's `quantize_dynamic` models): a dense pads
    nothing, so only the correction reads it."""
    x, w = call.args
    if not isinstance(w, Constant) or w.value.ndim != 2 or w.value.min() < -128 or w.value.max() > 127:
        return None
    centred = _centred_bytes(x)
    if centred is None or kind.activations != "uint8":  # sdot's kernels take int8 bytes
        return None
    xq, zx = centred
    units, k = w.value.shape
    block = kind.block(units)
    if k % DOT or block is None or not kind.fits(w.value):
        return None
    wq = w.value.astype(np.int8)
    out = Call(QDENSE_PACKED, (xq, Constant(pack_qdense_weight(wq, block), name=w.name)), QDenseAttrs(block),
               call.span)
    if zx is not None:
        wsum = Constant(wq.astype(np.int64).sum(axis=1).astype(np.int32))
        zx = zx if zx.ttype.ndim == 0 else Call(RESHAPE, (zx,), ReshapeAttrs(()), call.span)
        out = Call(SUBTRACT, (out, Call(MULTIPLY, (zx, wsum), None, call.span)), None, call.span)
    return out


def _realize_dense(call: Call, kind: DotKind) -> Expr | None:
    """dense(dequantize(x_q), W) → qnn.dense_packed(x_q, W_q) less zx · ΣW_q[n], times sx · sw[n] (per unit,
    along the last axis), as for convs. The weights are packed here: the float dense's packing pass never
    sees this op."""
    x, w = call.args
    if not (isinstance(x, Call) and x.op is DEQUANTIZE and isinstance(w, Constant) and w.value.ndim == 2):
        return None
    xq, sx, zx = x.args
    units, k = w.value.shape
    block = kind.block(units)
    if (str(xq.ttype.dtype) != kind.activations or _scalar(sx) is None or _scalar(zx) is None or k % DOT
            or block is None
            or str(call.ttype.dtype) != "float32"):
        return None
    found = int8_weights(w.value, kind.top)
    if found is None or not kind.fits(found[0]):
        return None
    wq, sw = found
    zp = int(_scalar(zx))
    out = Call(QDENSE_PACKED, (xq, Constant(pack_qdense_weight(wq, block), name=w.name)), QDenseAttrs(block),
               call.span)
    if zp:
        wsum = wq.astype(np.int64).sum(axis=1)
        out = Call(SUBTRACT, (out, Constant((zp * wsum).astype(np.int32))), None, call.span)
    out = Call(CAST, (out,), CastAttrs("float32"), call.span)
    return Call(MULTIPLY, (out, Constant((_scalar(sx) * sw).astype(np.float32))), None, call.span)


def _realize(call: Call, kind: DotKind) -> Expr | None:
    if call.op is DENSE and str(call.ttype.dtype) == "int32":
        return _realize_integer_dense(call, kind)
    if call.op is DENSE:
        return _realize_dense(call, kind)
    if call.op is CONV2D and str(call.ttype.dtype) == "int32":
        return _realize_integer(call, kind)
    if call.op is not CONV2D or str(call.ttype.dtype) != "float32":
        return None
    x, w = call.args
    if not (isinstance(x, Call) and x.op is DEQUANTIZE and isinstance(w, Constant) and w.value.ndim == 4):
        return None
    xq, sx, zx = x.args
    if _scalar(sx) is None or _scalar(zx) is None or str(xq.ttype.dtype) not in ("uint8", "int8"):
        return None
    if str(xq.ttype.dtype) != kind.activations or call.attrs.groups != 1 or xq.ttype.shape[1] % DOT:
        return _bytes_in(call, xq, _scalar(sx), _scalar(zx))
    found = int8_weights(w.value, kind.top)
    if found is None or not kind.fits(found[0]):
        return _bytes_in(call, xq, _scalar(sx), _scalar(zx))
    wq, sw = found
    zp = int(_scalar(zx))
    out = Call(QCONV2D, (xq, Constant(wq, name=w.name)), QConvAttrs(call.attrs, zp), call.span)
    channel = (1, wq.shape[0], 1, 1)
    if zp:
        wsum = wq.astype(np.int64).reshape(wq.shape[0], -1).sum(axis=1)
        out = Call(SUBTRACT, (out, Constant((zp * wsum).astype(np.int32).reshape(channel))), None, call.span)
    out = Call(CAST, (out,), CastAttrs("float32"), call.span)
    scale = (_scalar(sx) * sw).astype(np.float32).reshape(channel)
    return Call(MULTIPLY, (out, Constant(scale)), None, call.span)


def _bytes_in(call: Call, xq: Expr, sx: float, zx: float) -> Expr | None:
    """A conv that stays float (depthwise, grouped, or float weights) of a zero-point-0 dequantize: it reads
    the bytes and takes the scale into its weights, conv(x_q, W · sx), so the quantize before it is where its
    producer's kernel ends and the tensor between them is a quarter the size. (A zero point other than 0
    would have to be the padding's value; post-ReLU activations, which depthwise convs read, have 0.)"""
    if zx != 0:
        return None
    w = call.args[1]
    scaled = Constant((w.value.astype(np.float64) * sx).astype(np.float32), name=w.name)
    return Call(CONV2D, (xq, scaled), dataclasses.replace(call.attrs, out_dtype="float32"), call.span)


def _requantizes_conv(call: Call, hops: int = 8) -> bool:
    """A per-tensor quantize of a conv's output, through its elementwise epilogue (bias, activation, residual)."""
    if call.op is not QUANTIZE or _scalar(call.args[1]) is None:
        return False
    todo, seen = [call.args[0]], 0
    while todo and seen < hops:
        e = todo.pop()
        seen += 1
        if not isinstance(e, Call) or not hasattr(e.op, "pattern"):
            continue
        if e.op in (QCONV2D, CONV2D, QDENSE_PACKED):
            return True
        if e.op.pattern in (OpPattern.ELEMWISE, OpPattern.BROADCAST) and e.op is not DEQUANTIZE:
            todo += [a for a in e.args if isinstance(a, Call)]
    return False


def _reciprocal(call: Call) -> Expr | None:
    if not _requantizes_conv(call) or call.attrs.reciprocal:
        return None
    return Call(QUANTIZE, call.args, dataclasses.replace(call.attrs, reciprocal=True), call.span)


def _channel_constant(e: Expr, channels: int) -> np.ndarray | None:
    """A constant that broadcasts per channel (or as one value) against an NCHW tensor, as [1, C, 1, 1]."""
    if not isinstance(e, Constant):
        return None
    v = e.value.astype(np.float64)
    if v.size == 1:
        return np.full((1, channels, 1, 1), float(v.reshape(())))
    if v.ndim <= 4 and v.shape[-3:] == (channels, 1, 1) and all(d == 1 for d in v.shape[:-3]):
        return v.reshape(1, channels, 1, 1)
    return None


class _Requantizer:
    """quantize(relu?(conv · s [+ b])) as one qnn.requantize of the conv's sum: q = clip(rint(acc · A + B)),
    A = s / sy and B = (b - c · s) / sy + zy per channel (c: the zero-point correction). A ReLU becomes the
    clip's lower bound, zy; a clip (ReLU6) both bounds, quantized. The epilogue shrinks from about a dozen
    vector ops (subtract, convert, multiply, add, multiply, round, add, clip) to five; only where every value
    on the way has this one consumer, else the conv would be computed twice."""

    def __init__(self, body: Expr):
        self.uses: dict[int, int] = {}
        for e in post_order(body):
            for c in children(e):
                self.uses[id(c)] = self.uses.get(id(c), 0) + 1

    def single(self, e: Expr) -> bool:
        return self.uses.get(id(e), 0) == 1

    def rewrite(self, mod: IRModule) -> IRModule:
        """Matched on the graph as it was (its use counts), rebuilt over the rewritten inputs."""
        memo: dict[int, Expr] = {}
        fn = mod.main
        for node in post_order(fn.body):
            found = self.match(node) if isinstance(node, Call) else None
            if found is None:
                memo[id(node)] = with_children(node, tuple(memo[id(c)] for c in children(node))) \
                    if children(node) else node
            else:
                x, a, b, attrs = found
                memo[id(node)] = Call(REQUANTIZE, (memo[id(x)], a, b), attrs, node.span)
        body = memo[id(fn.body)]
        return mod if body is fn.body else mod.with_main(Function(fn.params, body, fn.attrs))

    def match(self, call: Call) -> tuple | None:
        if call.op is not QUANTIZE or str(call.ttype.dtype) not in ("uint8", "int8") or call.ttype.ndim != 4:
            return None
        sy, zy = _scalar(call.args[1]), _scalar(call.args[2])
        if sy is None or zy is None or sy == 0:
            return None
        v, low, high, channels = call.args[0], None, None, call.ttype.shape[1]
        inv = np.float64(np.float32(1) / np.float32(sy))  # the reciprocal the quantize would multiply by
        if isinstance(v, Call) and v.op is RELU and self.single(v):
            v, low = v.args[0], int(zy)
        elif isinstance(v, Call) and v.op is CLIP and self.single(v) and str(v.ttype.dtype) == "float32":
            # rounding is monotone, so the quantized clip is the clip of the quantized bounds: ReLU6 → [zy, q(6)]
            lo, hi = clip_bounds(v.attrs, "float32")
            v = v.args[0]
            low = int(np.clip(np.rint(lo * inv) + zy, -(2 ** 31), 2 ** 31 - 1))
            high = int(np.clip(np.rint(hi * inv) + zy, -(2 ** 31), 2 ** 31 - 1))
        bias = np.zeros((1, channels, 1, 1))
        if isinstance(v, Call) and v.op is ADD and self.single(v):
            for i in (0, 1):
                b = _channel_constant(v.args[1 - i], channels)
                if b is not None and isinstance(v.args[i], Call) and self.single(v.args[i]):
                    v, bias = v.args[i], b
                    break
        if isinstance(v, Call) and v.op is MULTIPLY and isinstance(v.args[0], Call) and v.args[0].op is CAST:
            scale, x = _channel_constant(v.args[1], channels), v.args[0].args[0]
            correction = np.zeros((1, channels, 1, 1))
            if isinstance(x, Call) and x.op is SUBTRACT and self.single(x):
                c = _channel_constant(x.args[1], channels)
                if c is None:
                    return None
                x, correction = x.args[0], c
            if scale is None or not (isinstance(x, Call) and x.op is QCONV2D) or not self.single(v.args[0]):
                return None
            a = scale * inv
            b = bias * inv + zy - correction * a
        elif isinstance(v, Call) and v.op is CONV2D and str(v.ttype.dtype) == "float32":
            x, a, b = v, np.full((1, channels, 1, 1), inv), bias * inv + zy
        else:
            return None
        if not self.single(x):
            return None
        return x, Constant(a.astype(np.float32)), Constant(b.astype(np.float32)), \
            RequantizeAttrs(str(call.ttype.dtype), low, high)


def _unsigned_activations(mod: IRModule, to: str = "uint8") -> IRModule:
    """int8 activations as uint8: a per-tensor quantize to int8 whose every reader is a dequantize with its scale
    and zero point becomes a quantize to uint8 with zero point z + 128, and its readers dequantize that. The
    bytes are the old ones plus 128, clip(rint(x / s) + z + 128, 0, 255) = q + 128, and every dequantized value
    is the same; VNNI multiplies unsigned by signed bytes, so symmetric (int8) activations take the int8 kernels
    too. A quantized value that is a model output keeps its type. `to="int8"` is the same the other way
    (aarch64's sdot multiplies signed by signed bytes): uint8 pairs become int8 ones with zero point z - 128."""
    src, shift = ("int8", 128) if to == "uint8" else ("uint8", -128)
    readers: dict[int, list] = {}
    for e in post_order(mod.main.body):
        for c in children(e):
            readers.setdefault(id(c), []).append(e)

    def same(dq: Expr, q: Call) -> bool:
        return (isinstance(dq, Call) and dq.op is DEQUANTIZE and dq.args[0] is q
                and _scalar(dq.args[1]) == _scalar(q.args[1]) and _scalar(dq.args[2]) == _scalar(q.args[2]))

    flip = {id(e) for e in post_order(mod.main.body)
            if isinstance(e, Call) and e.op is QUANTIZE and str(e.ttype.dtype) == src
            and _scalar(e.args[1]) is not None and _scalar(e.args[2]) is not None and e is not mod.main.body
            and readers.get(id(e)) and all(same(r, e) for r in readers[id(e)])}
    if not flip:
        return mod
    memo: dict[int, Expr] = {}
    fn = mod.main
    for node in post_order(fn.body):
        kids = tuple(memo[id(c)] for c in children(node))
        if id(node) in flip:
            zero = Constant(np.asarray(int(_scalar(node.args[2])) + shift, to))
            memo[id(node)] = Call(QUANTIZE, (kids[0], kids[1], zero),
                                  dataclasses.replace(node.attrs, out_dtype=to), node.span)
        elif isinstance(node, Call) and node.op is DEQUANTIZE and id(node.args[0]) in flip:
            memo[id(node)] = Call(DEQUANTIZE, (kids[0], kids[1], memo[id(node.args[0])].args[2]), node.attrs,
                                  node.span)
        else:
            memo[id(node)] = with_children(node, kids) if kids else node
    return mod.with_main(Function(fn.params, memo[id(fn.body)], fn.attrs))


def realize_qdq(mod: IRModule) -> IRModule:
    """int8 activations as uint8, convs and matmuls on integers, then each conv's requantization as one
    qnn.requantize where it can be, else by a multiply (QuantAttrs.reciprocal)."""
    if not mod.attrs.get("int8_dot") or mod.attrs.get("precision", "fp32") not in ("fp32", "tf32", "int8", None):
        return mod
    kind = DOT_KINDS.get(mod.attrs["int8_dot"], DOT_KINDS["vnni"])
    mod = _unsigned_activations(mod, kind.activations)
    realized = rewrite_calls(mod, functools.partial(_realize, kind=kind))
    if realized is mod:
        return mod
    realized = _Requantizer(realized.main.body).rewrite(realized)
    return rewrite_calls(realized, _reciprocal)
