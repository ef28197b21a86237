"""ONNX Attention (opsets 23–25), RotaryEmbedding (23) and SwiGLU (28) → Kiln matmul, softmax, gather and
elementwise ops.

Attention becomes Q·√scale @ (K·√scale)ᵀ, an optional softcap, an additive bias, softmax and a matmul with V,
all on [batch, heads, seq, head_size] tensors (3-D inputs are split into heads first). The bias sums what the
node asks for: the attention mask (bool → 0 / -inf), the causal and sliding-window frontiers (offset by the
past length) and the padding of `nonpad_kv_seqlen`. Parts known at import are one constant; parts computed from
graph inputs (a runtime mask, `nonpad_kv_seqlen`) are built from `less` and `where`. A query row that no key
may attend gives zeros, as the spec says, rather than the NaN of an all -inf softmax. Grouped-query attention
gathers each K/V head for the query heads that share it.

RotaryEmbedding gathers the cos/sin rows by `position_ids` (`take`), rotates the first `rotary_embedding_dim`
features of each head (halves or interleaved pairs, via `strided_slice`) and concatenates the rest back.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from kiln.ir import Constant, Expr
from kiln.ir.ops import dense as dn
from kiln.ir.ops import elementwise as ew
from kiln.ir.ops import reduce as rd
from kiln.ir.ops import softmax as sm
from kiln.ir.ops import transform as tf

from ..registry import Node, converter
from .tensor import _static_shape, reshape

_SOFTMAX_DTYPES = ("float16", "float32", "float64")


def _scalar(x: Expr, value: float) -> Constant:
    return Constant(np.array(value, dtype=x.ttype.dtype))


def _slice(node: Node, x: Expr, axis: int, start: int, stop: int | None, step: int = 1) -> Expr:
    """x[..., start:stop:step, ...] along `axis`."""
    nd = x.ttype.ndim
    begin, end, strides = [0] * nd, [None] * nd, [1] * nd
    begin[axis], end[axis], strides[axis] = start, stop, step
    if start == 0 and step == 1 and (stop is None or stop == x.ttype.shape[axis]):
        return x
    return node.make(tf.STRIDED_SLICE, x, begin=tuple(begin), end=tuple(end), strides=tuple(strides))


def _split_heads(node: Node, x: Expr, heads: int, what: str) -> Expr:
    """[batch, seq, heads * size] → [batch, heads, seq, size]."""
    b, s, hidden = _static_shape(node, x)
    if heads <= 0 or hidden % heads:
        raise node.invalid(f"{what} has hidden size {hidden}, not a multiple of its {heads} heads")
    return node.make(tf.TRANSPOSE, reshape(node, x, (b, s, heads, hidden // heads)), axes=(0, 2, 1, 3))


def _bias_of(node: Node, allowed: Expr, dtype: str) -> Expr:
    """0 where `allowed`, -inf elsewhere."""
    zero, ninf = Constant(np.array(0, dtype)), Constant(np.array(-np.inf, dtype))
    return node.make(ew.WHERE, allowed, zero, ninf)


def _add(node: Node, a: Expr | None, b: Expr | None) -> Expr | None:
    if a is None or b is None:
        return b if a is None else a
    return node.make(ew.ADD, a, b)


@converter("Attention")
def convert_attention(node: Node):
    q, k, v = node.input(0), node.input(1), node.input(2)
    mask = node.input(3, required=False)
    past_k, past_v = node.input(4, required=False), node.input(5, required=False)
    nonpad = node.input(6, required=False)
    rank = q.ttype.ndim
    if rank not in (3, 4) or k.ttype.ndim != rank or v.ttype.ndim != rank:
        raise node.invalid(f"Q, K and V must all be 3-D or all 4-D, got {q.ttype}, {k.ttype}, {v.ttype}")
    if (past_k is None) != (past_v is None):
        raise node.invalid("past_key and past_value must be given together")
    if nonpad is not None and past_k is not None:
        raise node.invalid("nonpad_kv_seqlen cannot be combined with past_key/past_value")
    dtype = q.ttype.dtype
    if rank == 3:
        q = _split_heads(node, q, node.attr_int("q_num_heads"), "Q")
        kv_heads = node.attr_int("kv_num_heads")
        k, v = _split_heads(node, k, kv_heads, "K"), _split_heads(node, v, kv_heads, "V")
    batch, q_heads, q_len, head_size = _static_shape(node, q)
    if past_k is not None:
        k = node.make(tf.CONCATENATE, past_k, k, axis=2)
        v = node.make(tf.CONCATENATE, past_v, v, axis=2)
    present_k, present_v = k, v
    kv_heads, kv_len = _static_shape(node, k)[1], _static_shape(node, k)[2]
    if _static_shape(node, v)[1] != kv_heads:
        raise node.invalid(f"K has {kv_heads} heads but V has {_static_shape(node, v)[1]}")

    bias = _attention_bias(node, mask, nonpad, past_k, q_len, kv_len, dtype)

    if q_heads != kv_heads:
        if q_heads % kv_heads:
            raise node.invalid(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads")
        shared = Constant(np.arange(q_heads, dtype=np.int64) // (q_heads // kv_heads))
        k, v = node.make(tf.TAKE, k, shared, axis=1), node.make(tf.TAKE, v, shared, axis=1)

    scale = node.attr_float("scale", None)
    root = _scalar(q, math.sqrt(1.0 / math.sqrt(head_size) if scale is None else scale))
    kt = node.make(tf.TRANSPOSE, node.make(ew.MULTIPLY, k, root), axes=(0, 1, 3, 2))
    scores = node.make(dn.MATMUL, node.make(ew.MULTIPLY, q, root), kt)  # [batch, q_heads, q_len, kv_len]
    softcap = node.attr_float("softcap", 0.0)
    if softcap > 0:
        capped = node.make(ew.TANH, node.make(ew.DIVIDE, scores, _scalar(scores, softcap)))
        scores = node.make(ew.MULTIPLY, capped, _scalar(scores, softcap))
    mode = node.attr_int("qk_matmul_output_mode", 0)
    if mode not in (0, 1, 2, 3):
        raise node.unsupported(f"qk_matmul_output_mode {mode} (Kiln supports 0, 1, 2 and 3)")
    qk_out = scores
    logits = _add(node, scores, bias)
    if mode == 2:
        qk_out = logits

    precision = node.attr_int("softmax_precision", None)
    if precision is not None:
        want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(precision)).name
        if want not in _SOFTMAX_DTYPES:
            raise node.unsupported(f"softmax_precision {precision} ({want}); Kiln supports float16/32/64")
        if want != dtype:
            logits = node.make(ew.CAST, logits, dtype=want)
    probs = node.make(sm.SOFTMAX, logits, axis=logits.ttype.ndim - 1)
    probs = _zero_masked_rows(node, probs, bias)
    if probs.ttype.dtype != dtype:
        probs = node.make(ew.CAST, probs, dtype=dtype)
    if mode == 3:
        qk_out = probs

    y = node.make(dn.MATMUL, probs, v)  # [batch, q_heads, q_len, v_size]
    if rank == 3:
        y = node.make(tf.TRANSPOSE, y, axes=(0, 2, 1, 3))
        y = reshape(node, y, (batch, q_len, q_heads * _static_shape(node, v)[3]))
    return [y, present_k, present_v, qk_out]


def _attention_bias(node: Node, mask: Expr | None, nonpad: Expr | None, past_k: Expr | None,
                    q_len: int, kv_len: int, dtype: str) -> Expr | None:
    """The additive bias over [.., q_len, kv_len]: mask, causal and window frontiers, key padding; None if none."""
    bias = None
    if mask is not None:
        m_shape = _static_shape(node, mask)
        pad = kv_len - m_shape[-1]
        if pad < 0:
            raise node.invalid(f"attn_mask is {mask.ttype}, longer than the {kv_len} keys")
        if pad > 0:  # a mask shorter than the keys leaves the rest masked out
            fill = np.zeros(m_shape[:-1] + (pad,), bool) if mask.ttype.dtype == "bool" else \
                np.full(m_shape[:-1] + (pad,), -np.inf, mask.ttype.dtype)
            mask = node.make(tf.CONCATENATE, mask, Constant(fill), axis=len(m_shape) - 1)
        if mask.ttype.dtype == "bool":
            bias = _bias_of(node, mask, dtype)
        elif mask.ttype.dtype != dtype:
            raise node.invalid(f"attn_mask is {mask.ttype}; a float mask must have Q's dtype {dtype}")
        else:
            bias = mask

    causal = bool(node.attr_int("is_causal", 0))
    left = node.attr_int("left_window_size", -1) if node.opset >= 25 else -1
    right = node.attr_int("right_window_size", -1) if node.opset >= 25 else -1
    if left < -1 or right < -1:
        raise node.invalid(f"window sizes must be -1 or non-negative, got left {left}, right {right}")
    i = np.arange(q_len).reshape(q_len, 1)
    j = np.arange(kv_len).reshape(1, kv_len)
    if nonpad is None or past_k is not None:
        # one frontier for every batch entry: a query at i is at absolute position i + offset
        offset = _static_shape(node, past_k)[2] if past_k is not None else 0
        diff = i + offset - j
        allowed = np.ones((q_len, kv_len), bool)
        if causal:
            allowed &= diff >= 0
        if left >= 0:
            allowed &= diff <= left
        if right >= 0:
            allowed &= -diff <= right
        if causal or left >= 0 or right >= 0:
            bias = _add(node, bias, Constant(np.where(allowed, 0, -np.inf).astype(dtype)))
    if nonpad is not None:
        # offset = nonpad[b] - q_len per batch entry; each bound becomes `less` against nonpad
        n = _static_shape(node, nonpad)
        if len(n) != 1:
            raise node.invalid(f"nonpad_kv_seqlen is {nonpad.ttype}; it must be [batch]")
        nb = reshape(node, nonpad, (n[0], 1, 1, 1))
        ndt = nonpad.ttype.dtype

        def below(a: Expr | np.ndarray, b: Expr | np.ndarray) -> Expr:
            a = Constant(a.astype(ndt)) if isinstance(a, np.ndarray) else a
            b = Constant(b.astype(ndt)) if isinstance(b, np.ndarray) else b
            return _bias_of(node, node.make(ew.LESS, a, b), dtype)

        bias = _add(node, bias, below(np.arange(kv_len), nb))  # keys past nonpad[b] are padding
        if past_k is None:
            if causal:  # j <= i + nonpad - q_len
                bias = _add(node, bias, below(j - i + q_len - 1, nb))
            if left >= 0:  # i + nonpad - q_len - j <= left
                bias = _add(node, bias, below(nb, j - i + q_len + left + 1))
            if right >= 0:  # j - (i + nonpad - q_len) <= right
                bias = _add(node, bias, below(j - i + q_len - right - 1, nb))
    return bias


def _zero_masked_rows(node: Node, probs: Expr, bias: Expr | None) -> Expr:
    """Rows whose bias is -inf throughout attend nothing: zeros, not the NaN an all -inf softmax gives."""
    if bias is None:
        return probs
    zero = _scalar(probs, 0.0)
    if isinstance(bias, Constant):
        rows = np.isneginf(np.max(bias.value, axis=-1, keepdims=True))
        if not rows.any():
            return probs
        return node.make(ew.WHERE, Constant(rows), zero, probs)
    last = bias.ttype.ndim - 1
    row_max = node.make(rd.MAX, bias, axes=(last,), keepdims=True)
    return node.make(ew.WHERE, node.make(ew.ISINF, row_max, detect_positive=False), zero, probs)


@converter("RotaryEmbedding")
def convert_rotary_embedding(node: Node):
    x, cos, sin = node.input(0), node.input(1), node.input(2)
    positions = node.input(3, required=False)
    rank = x.ttype.ndim
    if rank == 4:
        batch, heads, seq, head_size = _static_shape(node, x)
        rows = x  # cos/sin become [batch, 1, seq, half]
    elif rank == 3:
        batch, seq, hidden = _static_shape(node, x)
        heads = node.attr_int("num_heads", 0)
        if heads <= 0 or hidden % heads:
            raise node.invalid(f"a 3-D input needs num_heads dividing its hidden size {hidden}, got {heads}")
        head_size = hidden // heads
        rows = reshape(node, x, (batch, seq, heads, head_size))  # cos/sin become [batch, seq, 1, half]
    else:
        raise node.invalid(f"input must be 3-D or 4-D, got {x.ttype}")
    dim = node.attr_int("rotary_embedding_dim", 0) or head_size
    if dim > head_size or dim % 2:
        raise node.invalid(f"rotary_embedding_dim {dim} must be even and at most the head size {head_size}")
    half = dim // 2
    if positions is not None:
        cos, sin = node.make(tf.TAKE, cos, positions, axis=0), node.make(tf.TAKE, sin, positions, axis=0)
    for name, c in (("cos_cache", cos), ("sin_cache", sin)):
        if _static_shape(node, c) != (batch, seq, half):
            raise node.invalid(f"{name} gives {c.ttype} per position; expected [{batch}, {seq}, {half}]")
    per_head = (batch, 1, seq, half) if rank == 4 else (batch, seq, 1, half)
    cos, sin = reshape(node, cos, per_head), reshape(node, sin, per_head)

    last = 3
    rot = _slice(node, rows, last, 0, dim)
    if node.attr_int("interleaved", 0):
        x1, x2 = _slice(node, rot, last, 0, dim, 2), _slice(node, rot, last, 1, dim, 2)
    else:
        x1, x2 = _slice(node, rot, last, 0, half), _slice(node, rot, last, half, dim)
    real = node.make(ew.SUBTRACT, node.make(ew.MULTIPLY, cos, x1), node.make(ew.MULTIPLY, sin, x2))
    imag = node.make(ew.ADD, node.make(ew.MULTIPLY, sin, x1), node.make(ew.MULTIPLY, cos, x2))
    if node.attr_int("interleaved", 0):
        lead = _static_shape(node, real)
        pairs = node.make(tf.CONCATENATE, reshape(node, real, lead + (1,)), reshape(node, imag, lead + (1,)), axis=4)
        rotated = reshape(node, pairs, lead[:3] + (dim,))
    else:
        rotated = node.make(tf.CONCATENATE, real, imag, axis=last)
    if dim < head_size:
        rotated = node.make(tf.CONCATENATE, rotated, _slice(node, rows, last, dim, head_size), axis=last)
    return rotated if rank == 4 else reshape(node, rotated, (batch, seq, heads * head_size))


@converter("SwiGLU")
def convert_swiglu(node: Node):
    a, b = node.input(0), node.input(1)
    if a.ttype.shape != b.ttype.shape or a.ttype.dtype != b.ttype.dtype:
        raise node.invalid(f"A is {a.ttype} and B is {b.ttype}; SwiGLU needs the same shape and dtype")
    return node.make(ew.MULTIPLY, node.make(ew.SWISH, a, alpha=node.attr_float("alpha", 1.0)), b)
