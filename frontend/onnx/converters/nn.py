"""ONNX neural-network ops → Kiln nn ops: convolutions, pooling, normalizations, Gemm/MatMul, softmax, dropout.

Biases become separate broadcast `add`s after the conv or dense, so fusion can absorb them with the activation.
"""

from __future__ import annotations

import math

import numpy as np

from kiln.ir import Constant, Expr
from kiln.ir.ops import conv as cv
from kiln.ir.ops import dense as dn
from kiln.ir.ops import elementwise as ew
from kiln.ir.ops import norm as nm
from kiln.ir.ops import pool as pl
from kiln.ir.ops import softmax as sm
from kiln.ir.ops import transform as tf

from ..registry import Node, converter
from .tensor import _norm_axes, _static_shape, reshape


def _auto_pad(node: Node, sizes, kernel, strides, dilation) -> tuple[int, ...]:
    """Explicit pads (begins then ends) from `pads` or `auto_pad`."""
    nd = len(kernel)
    mode = node.attr_string("auto_pad", "NOTSET")
    if mode == "NOTSET":
        pads = node.attr_ints("pads", (0,) * (2 * nd))
        if len(pads) != 2 * nd:
            raise node.invalid(f"pads needs {2 * nd} values, got {list(pads)}")
        return tuple(pads)
    if mode == "VALID":
        return (0,) * (2 * nd)
    if mode not in ("SAME_UPPER", "SAME_LOWER"):
        raise node.invalid(f"unknown auto_pad {mode!r}")
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilation):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begins.append(small if mode == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return tuple(begins + ends)


def _bias_add(node: Node, y: Expr, b: Expr | None) -> Expr:
    if b is None:
        return y
    nd = y.ttype.ndim - 2
    b = reshape(node, b, (b.ttype.shape[0],) + (1,) * nd)
    return node.make(ew.ADD, y, b)


@converter("Conv")
def convert_conv(node: Node):
    x, w, b = node.input(0), node.input(1), node.input(2, required=False)
    nd = x.ttype.ndim - 2
    if nd not in cv.CONV_BY_RANK:
        raise node.unsupported(f"{nd}-D convolution")
    kernel = node.attr_ints("kernel_shape", None) or tuple(w.ttype.shape[2:])
    strides = node.attr_ints("strides", (1,) * nd)
    dilation = node.attr_ints("dilations", (1,) * nd)
    pads = _auto_pad(node, _static_shape(node, x)[2:], kernel, strides, dilation)
    y = node.make(cv.CONV_BY_RANK[nd], x, w, strides=strides, padding=pads, dilation=dilation,
                  groups=node.attr_int("group", 1))
    return _bias_add(node, y, b)


@converter("ConvTranspose")
def convert_conv_transpose(node: Node):
    x, w, b = node.input(0), node.input(1), node.input(2, required=False)
    nd = x.ttype.ndim - 2
    if nd not in cv.CONV_TRANSPOSE_BY_RANK:
        raise node.unsupported(f"{nd}-D transposed convolution")
    kernel = node.attr_ints("kernel_shape", None) or tuple(w.ttype.shape[2:])
    strides = node.attr_ints("strides", (1,) * nd)
    dilation = node.attr_ints("dilations", (1,) * nd)
    out_pad = node.attr_ints("output_padding", (0,) * nd)
    sizes = _static_shape(node, x)[2:]
    output_shape = node.attr_ints("output_shape", None)
    mode = node.attr_string("auto_pad", "NOTSET")
    if output_shape is not None or mode in ("SAME_UPPER", "SAME_LOWER"):
        target = output_shape[-nd:] if output_shape is not None else [s * st for s, st in zip(sizes, strides)]
        begins, ends, out_pad = [], [], list(out_pad)
        for i in range(nd):
            total = strides[i] * (sizes[i] - 1) + out_pad[i] + (kernel[i] - 1) * dilation[i] + 1 - target[i]
            if total < 0:  # a larger output than the full one: extend its end, as ONNX Runtime does
                out_pad[i] -= total
                total = 0
            # ONNX's rule: SAME_UPPER (and an explicit output_shape) put the smaller half first
            first = total - total // 2 if mode == "SAME_LOWER" else total // 2
            begins.append(first)
            ends.append(total - first)
        out_pad = tuple(out_pad)
        pads = tuple(begins + ends)
    elif mode == "VALID":
        pads = (0,) * (2 * nd)
    else:
        pads = node.attr_ints("pads", (0,) * (2 * nd))
    y = node.make(cv.CONV_TRANSPOSE_BY_RANK[nd], x, w, strides=strides, padding=pads, dilation=dilation,
                  output_padding=out_pad, groups=node.attr_int("group", 1))
    return _bias_add(node, y, b)


@converter("MaxPool", "AveragePool", "LpPool")
def convert_pool(node: Node):
    x = node.input(0)
    nd = x.ttype.ndim - 2
    kernel = node.attr_ints("kernel_shape")
    strides = node.attr_ints("strides", (1,) * nd)
    dilation = node.attr_ints("dilations", (1,) * nd)
    pads = _auto_pad(node, _static_shape(node, x)[2:], kernel, strides, dilation)
    attrs = dict(kernel=kernel, strides=strides, padding=pads, dilation=dilation,
                 ceil_mode=bool(node.attr_int("ceil_mode", 0)))
    if node.op_type == "MaxPool":
        if node.attr_int("storage_order", 0):
            raise node.unsupported("storage_order=1")
        if len(node.proto.output) > 1 and node.proto.output[1]:
            raise node.unsupported("the Indices output of MaxPool")
        return node.make(pl.MAX_POOL, x, **attrs)
    if node.op_type == "AveragePool":
        return node.make(pl.AVG_POOL, x, count_include_pad=bool(node.attr_int("count_include_pad", 0)), **attrs)
    return node.make(pl.LP_POOL, x, p=node.attr_int("p", 2), **attrs)


@converter("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def convert_global_pool(node: Node):
    op = {"GlobalAveragePool": pl.GLOBAL_AVG_POOL, "GlobalMaxPool": pl.GLOBAL_MAX_POOL,
          "GlobalLpPool": pl.GLOBAL_LP_POOL}[node.op_type]
    extra = {"p": node.attr_int("p", 2)} if node.op_type == "GlobalLpPool" else {}
    return node.make(op, node.input(0), **extra)


@converter("BatchNormalization")
def convert_batch_norm(node: Node):
    if node.attr_int("training_mode", 0):
        raise node.unsupported("training_mode=1")
    if any(o for o in node.proto.output[1:]) and node.opset >= 14:
        raise node.unsupported("training outputs (running mean/var)")
    args = [node.input(i) for i in range(5)]
    return node.make(nm.BATCH_NORM, *args, epsilon=node.attr_float("epsilon", 1e-5))


@converter("InstanceNormalization")
def convert_instance_norm(node: Node):
    return node.make(nm.INSTANCE_NORM, node.input(0), node.input(1), node.input(2),
                     epsilon=node.attr_float("epsilon", 1e-5))


@converter("LayerNormalization")
def convert_layer_norm(node: Node):
    x = node.input(0)
    axis = _norm_axes(node, [node.attr_int("axis", -1)], x.ttype.ndim)[0]
    scale = node.input(1)
    bias = node.input(2, required=False)
    if bias is None:
        bias = Constant(np.zeros(scale.ttype.shape, scale.ttype.dtype))
    eps = node.attr_float("epsilon", 1e-5)
    y = node.make(nm.LAYER_NORM, x, scale, bias, axis=axis, epsilon=eps)
    if not any(o for o in node.proto.output[1:]):
        return y
    return [y, *_layer_norm_statistics(node, x, axis, eps)]


def _layer_norm_statistics(node: Node, x: Expr, axis: int, eps: float) -> list[Expr]:
    """LayerNormalization's optional Mean and InvStdDev outputs (what training keeps for the backward pass), in
    the stash type, over the normalized axes kept as 1s: computed beside the fused layer norm, which they do
    not change."""
    from kiln.ir.ops import reduce as rd

    stash = node.attr_int("stash_type", 1)
    if stash != 1:
        raise node.unsupported(f"Mean/InvStdDev with stash_type {stash} (only float32)")
    xf = x if x.ttype.dtype == "float32" else node.make(ew.CAST, x, dtype="float32")
    axes = tuple(range(axis, x.ttype.ndim))
    mean_op = rd.REDUCE_OPS["mean"]
    mean = node.make(mean_op, xf, axes=axes, keepdims=True)
    d = node.make(ew.SUBTRACT, xf, mean)
    var = node.make(mean_op, node.make(ew.MULTIPLY, d, d), axes=axes, keepdims=True)
    std = node.make(ew.SQRT, node.make(ew.ADD, var, Constant(np.array(eps, np.float32))))
    return [mean, node.make(ew.OPS["reciprocal"], std)]


@converter("GroupNormalization")
def convert_group_norm(node: Node):
    x, scale, bias = node.input(0), node.input(1), node.input(2)
    groups = node.attr_int("num_groups")
    c = x.ttype.shape[1]
    if scale.ttype.shape == (groups,) and groups != c:
        # opset 18 gives one scale per group; expand to per channel
        s, b = node.constant(1, "scale"), node.constant(2, "bias")
        scale = Constant(np.repeat(s, c // groups))
        bias = Constant(np.repeat(b, c // groups))
    return node.make(nm.GROUP_NORM, x, scale, bias, num_groups=groups, epsilon=node.attr_float("epsilon", 1e-5))


@converter("LRN")
def convert_lrn(node: Node):
    return node.make(nm.LRN, node.input(0), size=node.attr_int("size"), alpha=node.attr_float("alpha", 1e-4),
                     beta=node.attr_float("beta", 0.75), bias=node.attr_float("bias", 1.0))


@converter("MeanVarianceNormalization")
def convert_mvn(node: Node):
    x = node.input(0)
    axes = _norm_axes(node, node.attr_ints("axes", (0, 2, 3)), x.ttype.ndim)
    return node.make(nm.MEAN_VARIANCE_NORM, x, axes=tuple(sorted(axes)))


def _transpose2d(node: Node, x: Expr) -> Expr:
    return node.make(tf.TRANSPOSE, x, axes=(1, 0))


@converter("Gemm")
def convert_gemm(node: Node):
    a, b, c = node.input(0), node.input(1), node.input(2, required=False)
    alpha, beta = node.attr_float("alpha", 1.0), node.attr_float("beta", 1.0)
    if node.attr_int("transA", 0):
        a = _transpose2d(node, a)
    if a.ttype.ndim != 2 or b.ttype.ndim != 2:
        raise node.invalid(f"Gemm takes 2-D operands, got {a.ttype} and {b.ttype}")
    w = b if node.attr_int("transB", 0) else _transpose2d(node, b)  # dense wants [units, k]
    y = node.make(dn.DENSE, a, w)
    dtype = y.ttype.dtype
    if alpha != 1.0:
        y = node.make(ew.MULTIPLY, y, Constant(np.array(alpha, dtype)))
    if c is not None and beta != 0.0:
        if beta != 1.0:
            c = node.make(ew.MULTIPLY, c, Constant(np.array(beta, dtype)))
        y = node.make(ew.ADD, y, c)
    return y


@converter("MatMul")
def convert_matmul(node: Node):
    a, b = node.input(0), node.input(1)
    if isinstance(b, Constant) and b.ttype.ndim == 2 and a.ttype.ndim >= 2:
        # A constant right operand is a dense layer: pre-transposing it is free at compile time.
        return node.make(dn.DENSE, a, Constant(np.ascontiguousarray(b.value.T), name=b.name))
    return node.make(dn.MATMUL, a, b)


@converter("Einsum")
def convert_einsum(node: Node):
    xs = [x for x in node.inputs if x is not None]
    return node.make(dn.EINSUM, *xs, equation=node.attr_string("equation").replace(" ", ""))


@converter("Softmax", "LogSoftmax", "Hardmax")
def convert_softmax(node: Node):
    op = {"Softmax": sm.SOFTMAX, "LogSoftmax": sm.LOG_SOFTMAX, "Hardmax": sm.HARDMAX}[node.op_type]
    x = node.input(0)
    ndim = x.ttype.ndim
    if node.opset >= 13:
        axis = _norm_axes(node, [node.attr_int("axis", -1)], ndim)[0]
        return node.make(op, x, axis=axis)
    # Before opset 13 the input is coerced to 2-D [prod(dims[:axis]), prod(dims[axis:])].
    axis = _norm_axes(node, [node.attr_int("axis", 1)], ndim)[0] if ndim else 0
    shape = _static_shape(node, x)
    if axis == ndim - 1:
        return node.make(op, x, axis=axis)
    flat = reshape(node, x, (int(np.prod(shape[:axis], dtype=np.int64)), int(np.prod(shape[axis:], dtype=np.int64))))
    return reshape(node, node.make(op, flat, axis=1), shape)


@converter("Dropout")
def convert_dropout(node: Node):
    x = node.input(0)
    if node.opset >= 12 and node.input(2, required=False) is not None:
        training = node.constant(2, "training_mode")
        if bool(training.item()):
            raise node.unsupported("training_mode=True (Kiln compiles inference graphs)")
    outs: list[Expr | None] = [x]
    if len(node.proto.output) > 1 and node.proto.output[1]:
        outs.append(Constant(np.ones(_static_shape(node, x), dtype=bool)))
    return outs


@converter("RMSNormalization")
def convert_rms_norm(node: Node):
    x = node.input(0)
    axis = _norm_axes(node, [node.attr_int("axis", -1)], x.ttype.ndim)[0]
    return node.make(nm.RMS_NORM, x, node.input(1), axis=axis, epsilon=node.attr_float("epsilon", 1e-5))


@converter("LpNormalization")
def convert_lp_normalization(node: Node):
    x = node.input(0)
    p = node.attr_int("p", 2)
    if p not in (1, 2):
        raise node.invalid(f"p must be 1 or 2, got {p}")
    return node.make(nm.LP_NORMALIZE, x, axis=_norm_axes(node, [node.attr_int("axis", -1)], x.ttype.ndim)[0], p=p)
