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

Only where the driver says the target multiplies bytes natively (`mod.attrs["int8_dot"]`: AVX-512 VNNI) and
the model computes in float32: elsewhere an int32 conv would be slower than the float one.
"""

from __future__ import annotations

import numpy as np

from kiln.ir import Call, Constant, Expr, IRModule
from kiln.ir.ops.conv import CONV2D
from kiln.ir.ops.elementwise import CAST, DEQUANTIZE, MULTIPLY, SUBTRACT, CastAttrs
from kiln.ir.ops.qconv import DOT, QCONV2D, QConvAttrs
from kiln.ir.visitor import rewrite_calls

_TOLERANCE = 1e-4  # how far from an integer W / s may be: float32 rounding of q · s and of max|W| is ~1e-5 at 127
_SAMPLE = 64  # elements per channel that screen the candidate scales before the whole channel is checked


def int8_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(W_q int8, scale per output channel) with W_q · scale == W to float32 rounding, or None.

    A channel's largest |W| is k · s for some integer k ≤ 128 (127 where symmetric max-abs quantization made
    the scale; less where the scale came from elsewhere, as QAT exports do), so s is found among max|W| / k:
    every k is screened on a sample of the channel at once, and the first that leaves it integral is checked on
    all of it. Per-tensor scales are per-channel ones that happen to be equal. A float model's weights fail the
    screen (each element lands within 1e-4 of the grid by chance 2e-4 of the time)."""
    o = w.shape[0]
    flat = w.astype(np.float64).reshape(o, -1)
    peak = np.abs(flat).max(axis=1)
    live = peak > 0
    if not live.any():
        return np.zeros(w.shape, np.int8), np.ones(o)
    ks = np.concatenate([[127.0, 128.0], np.arange(126.0, 0.0, -1.0)])
    unit = flat[live, :_SAMPLE] / peak[live, None]  # W / max|W|: times k, integers when s = max|W| / k
    q = unit[None] * ks[:, None, None]
    fits = (np.abs(q - np.rint(q)) <= _TOLERANCE).all(axis=2)  # [k, channel]
    if not fits.any(axis=0).all():
        return None
    k = np.ones(o)
    k[live] = ks[fits.argmax(axis=0)]
    scale = np.where(live, peak / k, 1.0)
    q = flat / scale[:, None]
    r = np.rint(q)
    if np.abs(q - r).max() > _TOLERANCE or r.min() < -128 or r.max() > 127:
        return None
    return r.astype(np.int8).reshape(w.shape), scale


def _scalar(e: Expr) -> float | None:
    return float(e.value.reshape(())) if isinstance(e, Constant) and e.value.size == 1 else None


def _realize(call: Call) -> Expr | None:
    if call.op is not CONV2D or call.attrs.groups != 1 or str(call.ttype.dtype) != "float32":
        return None
    x, w = call.args
    if not (isinstance(x, Call) and x.op is DEQUANTIZE and isinstance(w, Constant) and w.value.ndim == 4):
        return None
    xq, sx, zx = x.args
    if str(xq.ttype.dtype) != "uint8" or _scalar(sx) is None or _scalar(zx) is None or xq.ttype.shape[1] % DOT:
        return None
    found = int8_weights(w.value)
    if found is None:
        return None
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


def realize_qdq(mod: IRModule) -> IRModule:
    if not mod.attrs.get("int8_dot") or mod.attrs.get("precision", "fp32") not in ("fp32", "tf32", None):
        return mod
    return rewrite_calls(mod, _realize)
