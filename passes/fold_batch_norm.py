"""Fold inference batch norm into the conv or dense before it; turn any other batch norm into a multiply and an
add. After this pass no nn.batch_norm remains.

    bn(conv(x, W) [+ b]) = conv(x, W * s) + (b - mean) * s + beta,   s = gamma / sqrt(var + eps)
"""

from __future__ import annotations

import numpy as np

from kiln.ir import Call, Constant, Expr, IRModule, call
from kiln.ir.ops.conv import CONV_BY_RANK
from kiln.ir.ops.dense import DENSE
from kiln.ir.ops.elementwise import ADD, MULTIPLY
from kiln.ir.ops.norm import BATCH_NORM
from kiln.ir.visitor import rewrite_function

_CONVS = set(CONV_BY_RANK.values())
_FOLDABLE = _CONVS | {DENSE}  # both scale their weight's leading (output-channel) axis


def _channel_shape(ndim: int, channels: int) -> tuple[int, ...]:
    return (1, channels) + (1,) * (ndim - 2)


def _scale_shift(bn: Call) -> tuple[np.ndarray, np.ndarray] | None:
    gamma, beta, mean, var = bn.args[1:]
    if not all(isinstance(p, Constant) for p in (gamma, beta, mean, var)):
        return None
    s = gamma.value.astype(np.float64) / np.sqrt(var.value.astype(np.float64) + bn.attrs.epsilon)
    return s, beta.value.astype(np.float64) - mean.value.astype(np.float64) * s


def _fold(bn: Call) -> Expr | None:
    if bn.op is not BATCH_NORM:
        return None
    ss = _scale_shift(bn)
    if ss is None:
        return None
    s, shift = ss
    x = bn.args[0]
    dtype = bn.ttype.dtype
    ndim = bn.ttype.ndim
    bias: np.ndarray | None = None
    producer = x
    if isinstance(x, Call) and x.op is ADD and isinstance(x.args[1], Constant) and isinstance(x.args[0], Call) \
            and x.args[0].op in _FOLDABLE and x.args[1].value.size == x.ttype.shape[1]:
        producer, bias = x.args[0], x.args[1].value.reshape(-1).astype(np.float64)
    if isinstance(producer, Call) and producer.op in _FOLDABLE and isinstance(producer.args[1], Constant) \
            and producer.ttype.dtype == dtype and (producer.op is not DENSE or ndim == 2):
        w = producer.args[1]
        scaled = (w.value.astype(np.float64) * s.reshape((-1,) + (1,) * (w.value.ndim - 1))).astype(w.value.dtype)
        conv = Call(producer.op, (producer.args[0], Constant(scaled, name=w.name)), producer.attrs, producer.span)
        b = shift + (bias * s if bias is not None else 0)
        return Call(ADD, (conv, Constant(b.astype(dtype).reshape(_channel_shape(ndim, len(s))))), None, bn.span)
    # otherwise: scale and shift per channel
    scale = Constant(s.astype(dtype).reshape(_channel_shape(ndim, len(s))))
    return call(ADD, call(MULTIPLY, x, scale, span=bn.span), Constant(shift.astype(dtype).reshape(scale.ttype.shape)),
                span=bn.span)


def fold_batch_norm(mod: IRModule) -> IRModule:
    main = rewrite_function(mod.main, lambda e: _fold(e) if isinstance(e, Call) else None)
    return mod if main is mod.main else mod.with_main(main)

