"""ONNX LSTM, GRU and RNN → Kiln dense and elementwise ops, unrolled over a static sequence length at import.

Per direction, one `nn.dense` projects every time step's input at once; each step then adds `h @ R.T`, slices
the gates apart and applies the activations. Per-step outputs are concatenated into Y, the last states into
Y_h (and Y_c). Constant `sequence_lens` shorter than the sequence become constant masks (`where`), so a batch
entry keeps its state and writes zeros once its sequence has ended, as ONNX Runtime does.
"""

from __future__ import annotations

import numpy as np

from kiln.ir import Constant, Expr
from kiln.ir.ops import dense as dn
from kiln.ir.ops import elementwise as ew
from kiln.ir.ops import transform as tf

from ..registry import Node, converter
from .tensor import _static_shape, reshape

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
# activation → (default alpha, default beta), or None when it takes neither
_ACTIVATION_PARAMS = {
    "relu": None, "tanh": None, "sigmoid": None, "softsign": None, "softplus": None,
    "leakyrelu": (0.01, None), "thresholdedrelu": (1.0, None), "elu": (1.0, None),
    "hardsigmoid": (0.2, 0.5), "scaledtanh": (1.0, 1.0), "affine": (1.0, 0.0),
}


def _const(x: Expr, value: float) -> Constant:
    return Constant(np.array(value, dtype=x.ttype.dtype))


def _take_rows(node: Node, x: Expr, axis: int, start: int, stop: int) -> Expr:
    """x[..., start:stop, ...] along `axis`."""
    nd = x.ttype.ndim
    begin, end = [0] * nd, [None] * nd
    begin[axis], end[axis] = start, stop
    if start == 0 and stop == x.ttype.shape[axis]:
        return x
    return node.make(tf.STRIDED_SLICE, x, begin=tuple(begin), end=tuple(end), strides=(1,) * nd)


class _Activation:
    def __init__(self, node: Node, name: str, alpha: float | None, beta: float | None):
        self.node, self.name, self.alpha, self.beta = node, name.lower(), alpha, beta

    def __call__(self, x: Expr) -> Expr:
        node, n, a, b = self.node, self.name, self.alpha, self.beta
        if n in ("relu", "tanh", "sigmoid", "softsign", "softplus"):
            op = {"relu": ew.RELU, "tanh": ew.TANH, "sigmoid": ew.SIGMOID, "softsign": ew.OPS["softsign"],
                  "softplus": ew.OPS["softplus"]}[n]
            return node.make(op, x)
        if n == "leakyrelu":
            return node.make(ew.LEAKY_RELU, x, alpha=a)
        if n == "thresholdedrelu":
            return node.make(ew.THRESHOLDED_RELU, x, alpha=a)
        if n == "elu":
            return node.make(ew.ELU, x, alpha=a)
        if n == "hardsigmoid":
            return node.make(ew.HARD_SIGMOID, x, alpha=a, beta=b)
        if n == "scaledtanh":
            inner = node.make(ew.TANH, node.make(ew.MULTIPLY, x, _const(x, b)))
            return node.make(ew.MULTIPLY, inner, _const(x, a))
        # affine
        return node.make(ew.ADD, node.make(ew.MULTIPLY, x, _const(x, a)), _const(x, b))


def _activations(node: Node, directions: int) -> list[list[_Activation]]:
    """The activation functions of each direction, alphas and betas consumed in order by those that take them."""
    per_dir = len(_DEFAULT_ACTIVATIONS[node.op_type])
    names = node.attr_strings("activations", None)
    if names is None:
        names = _DEFAULT_ACTIVATIONS[node.op_type] * directions
    elif len(names) == per_dir and directions == 2:
        names = tuple(names) * 2
    if len(names) != per_dir * directions:
        raise node.invalid(f"activations lists {len(names)} functions; {node.op_type} with {directions} "
                           f"direction(s) needs {per_dir * directions}")
    alphas = list(node.attr_floats("activation_alpha", ()) or ())
    betas = list(node.attr_floats("activation_beta", ()) or ())
    out: list[_Activation] = []
    for name in names:
        if name.lower() not in _ACTIVATION_PARAMS:
            raise node.unsupported(f"activation function {name!r}")
        params = _ACTIVATION_PARAMS[name.lower()]
        alpha = beta = None
        if params is not None:
            alpha = alphas.pop(0) if alphas else params[0]
            if params[1] is not None:
                beta = betas.pop(0) if betas else params[1]
        out.append(_Activation(node, name, alpha, beta))
    return [out[d * per_dir:(d + 1) * per_dir] for d in range(directions)]


def _sequence_mask(node: Node, seq_len: int, batch: int) -> np.ndarray | None:
    """[seq, batch] bool of the steps each batch entry runs, or None when every entry runs all of them."""
    lens = node.constant(4, "sequence_lens", required=False)
    if lens is None:
        return None
    lens = np.asarray(lens).reshape(-1).astype(np.int64)
    if lens.shape != (batch,):
        raise node.invalid(f"sequence_lens has {lens.size} entries for a batch of {batch}")
    if np.any(lens < 0) or np.any(lens > seq_len):
        raise node.invalid(f"sequence_lens {lens.tolist()} outside [0, {seq_len}]")
    if np.all(lens == seq_len):
        return None
    return np.arange(seq_len)[:, None] < lens[None, :]


@converter("LSTM", "GRU", "RNN")
def convert_recurrent(node: Node):
    kind = node.op_type
    x, w, r = node.input(0), node.input(1), node.input(2)
    layout = node.attr_int("layout", 0) if node.opset >= 14 else 0
    direction = node.attr_string("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise node.invalid(f"direction must be forward, reverse or bidirectional, got {direction!r}")
    dirs = 2 if direction == "bidirectional" else 1
    if layout not in (0, 1):
        raise node.invalid(f"layout must be 0 or 1, got {layout}")
    if layout == 1:
        x = node.make(tf.TRANSPOSE, x, axes=(1, 0, 2))
    seq_len, batch, input_size = _static_shape(node, x)
    gates = _GATES[kind]
    w_shape = _static_shape(node, w)
    hidden = node.attr_int("hidden_size", None) or w_shape[1] // gates
    if w_shape != (dirs, gates * hidden, input_size):
        raise node.invalid(f"W is {w.ttype}; expected [{dirs}, {gates * hidden}, {input_size}]")
    if _static_shape(node, r) != (dirs, gates * hidden, hidden):
        raise node.invalid(f"R is {r.ttype}; expected [{dirs}, {gates * hidden}, {hidden}]")
    dtype = x.ttype.dtype
    b = node.input(3, required=False)
    init_h = node.input(5, required=False)
    init_c = node.input(6, required=False) if kind == "LSTM" else None
    peep = node.input(7, required=False) if kind == "LSTM" else None
    if layout == 1:
        init_h = None if init_h is None else node.make(tf.TRANSPOSE, init_h, axes=(1, 0, 2))
        init_c = None if init_c is None else node.make(tf.TRANSPOSE, init_c, axes=(1, 0, 2))
    clip = node.attr_float("clip", None)
    acts = _activations(node, dirs)
    mask = _sequence_mask(node, seq_len, batch)
    linear_before_reset = kind == "GRU" and bool(node.attr_int("linear_before_reset", 0))
    input_forget = kind == "LSTM" and bool(node.attr_int("input_forget", 0))
    zeros = Constant(np.zeros((batch, hidden), dtype))

    def gate(pre: Expr, k: int) -> Expr:
        return _take_rows(node, pre, 1, k * hidden, (k + 1) * hidden)

    def clipped(v: Expr) -> Expr:
        return v if clip is None else node.make(ew.CLIP, v, min=-clip, max=clip)

    ys, last_h, last_c = [], [], []
    x2 = reshape(node, x, (seq_len * batch, input_size))
    for d in range(dirs):
        reverse = direction == "reverse" or d == 1
        w_d = reshape(node, _take_rows(node, w, 0, d, d + 1), (gates * hidden, input_size))
        r_d = reshape(node, _take_rows(node, r, 0, d, d + 1), (gates * hidden, hidden))
        xw = node.make(dn.DENSE, x2, w_d)  # [seq * batch, gates * hidden]
        rb = None  # GRU with linear_before_reset keeps Rbh inside the reset product
        if b is not None:
            b_d = reshape(node, _take_rows(node, b, 0, d, d + 1), (2 * gates * hidden,))
            wb = _take_rows(node, b_d, 0, 0, gates * hidden)
            rb = _take_rows(node, b_d, 0, gates * hidden, 2 * gates * hidden)
            if kind == "GRU" and not linear_before_reset:
                xw = node.make(ew.ADD, xw, node.make(ew.ADD, wb, rb))
                rb = None
            elif kind == "GRU":
                # z and r take both biases up front; h adds Wbh here and Rbh inside the reset product
                both = node.make(ew.ADD, wb, rb)
                xw = node.make(ew.ADD, xw, node.make(tf.CONCATENATE, _take_rows(node, both, 0, 0, 2 * hidden),
                                                     _take_rows(node, wb, 0, 2 * hidden, 3 * hidden), axis=0))
            else:
                xw = node.make(ew.ADD, xw, node.make(ew.ADD, wb, rb))
                rb = None
        h = zeros if init_h is None else reshape(node, _take_rows(node, init_h, 0, d, d + 1), (batch, hidden))
        c = zeros if init_c is None else reshape(node, _take_rows(node, init_c, 0, d, d + 1), (batch, hidden))
        p = None
        if peep is not None:
            p_d = reshape(node, _take_rows(node, peep, 0, d, d + 1), (3 * hidden,))
            p = [reshape(node, _take_rows(node, p_d, 0, k * hidden, (k + 1) * hidden), (1, hidden)) for k in range(3)]
        outs: list[Expr | None] = [None] * seq_len
        steps = range(seq_len - 1, -1, -1) if reverse else range(seq_len)
        for t in steps:
            xt = _take_rows(node, xw, 0, t * batch, (t + 1) * batch)
            if kind == "GRU":
                h_new = _gru_step(node, acts[d], xt, h, r_d, rb, hidden, linear_before_reset, clipped)
                c_new = None
            elif kind == "RNN":
                pre = node.make(ew.ADD, xt, node.make(dn.DENSE, h, r_d))
                h_new, c_new = acts[d][0](clipped(pre)), None
            else:
                pre = node.make(ew.ADD, xt, node.make(dn.DENSE, h, r_d))
                f_act, g_act, h_act = acts[d]
                i_pre, o_pre, f_pre, c_pre = (gate(pre, k) for k in range(4))
                if p is not None:
                    i_pre = node.make(ew.ADD, i_pre, node.make(ew.MULTIPLY, p[0], c))
                    f_pre = node.make(ew.ADD, f_pre, node.make(ew.MULTIPLY, p[2], c))
                i_g = f_act(clipped(i_pre))
                f_g = (node.make(ew.SUBTRACT, _const(i_g, 1.0), i_g) if input_forget else f_act(clipped(f_pre)))
                c_g = g_act(clipped(c_pre))
                c_new = node.make(ew.ADD, node.make(ew.MULTIPLY, f_g, c), node.make(ew.MULTIPLY, i_g, c_g))
                if p is not None:
                    o_pre = node.make(ew.ADD, o_pre, node.make(ew.MULTIPLY, p[1], c_new))
                o_g = f_act(clipped(o_pre))
                h_new = node.make(ew.MULTIPLY, o_g, h_act(c_new))
            if mask is not None:
                m = Constant(np.ascontiguousarray(mask[t][:, None]))
                outs[t] = node.make(ew.WHERE, m, h_new, zeros)
                h = node.make(ew.WHERE, m, h_new, h)
                if c_new is not None:
                    c = node.make(ew.WHERE, m, c_new, c)
            else:
                outs[t], h = h_new, h_new
                if c_new is not None:
                    c = c_new
        steps_y = [reshape(node, o, (1, 1, batch, hidden)) for o in outs]
        ys.append(steps_y[0] if seq_len == 1 else node.make(tf.CONCATENATE, *steps_y, axis=0))
        last_h.append(reshape(node, h, (1, batch, hidden)))
        last_c.append(reshape(node, c, (1, batch, hidden)))
    y = ys[0] if dirs == 1 else node.make(tf.CONCATENATE, *ys, axis=1)  # [seq, dirs, batch, hidden]
    y_h = last_h[0] if dirs == 1 else node.make(tf.CONCATENATE, *last_h, axis=0)  # [dirs, batch, hidden]
    y_c = last_c[0] if dirs == 1 else node.make(tf.CONCATENATE, *last_c, axis=0)
    if layout == 1:
        y = node.make(tf.TRANSPOSE, y, axes=(2, 0, 1, 3))
        y_h = node.make(tf.TRANSPOSE, y_h, axes=(1, 0, 2))
        y_c = node.make(tf.TRANSPOSE, y_c, axes=(1, 0, 2))
    return [y, y_h, y_c] if kind == "LSTM" else [y, y_h]


def _gru_step(node: Node, acts, xt: Expr, h: Expr, r_d: Expr, rb: Expr | None, hidden: int,
              linear_before_reset: bool, clipped) -> Expr:
    f_act, g_act = acts
    r_zr = _take_rows(node, r_d, 0, 0, 2 * hidden)
    r_h = _take_rows(node, r_d, 0, 2 * hidden, 3 * hidden)
    zr = node.make(ew.ADD, _take_rows(node, xt, 1, 0, 2 * hidden), node.make(dn.DENSE, h, r_zr))
    z = f_act(clipped(_take_rows(node, zr, 1, 0, hidden)))
    rg = f_act(clipped(_take_rows(node, zr, 1, hidden, 2 * hidden)))
    xh = _take_rows(node, xt, 1, 2 * hidden, 3 * hidden)
    if linear_before_reset:
        hr = node.make(dn.DENSE, h, r_h)
        if rb is not None:
            hr = node.make(ew.ADD, hr, _take_rows(node, rb, 0, 2 * hidden, 3 * hidden))
        pre = node.make(ew.ADD, xh, node.make(ew.MULTIPLY, rg, hr))
    else:
        pre = node.make(ew.ADD, xh, node.make(dn.DENSE, node.make(ew.MULTIPLY, rg, h), r_h))
    hh = g_act(clipped(pre))
    one = _const(z, 1.0)
    return node.make(ew.ADD, node.make(ew.MULTIPLY, node.make(ew.SUBTRACT, one, z), hh), node.make(ew.MULTIPLY, z, h))
