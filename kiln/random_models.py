"""Random ONNX graphs for differential testing against ONNX Runtime.

Hand-written tests check the combinations someone thought of. The bugs that give silent wrong answers live
where passes meet: a blocked NCHW[b]c layout crossing a Transpose, a Reshape or a Slice on the channel axis, a
reduction over channels that are padded to a whole block, a broadcast constant folded into a conv's epilogue, a
buffer the memory plan reuses while a branch still reads it. Each seed here builds one small graph from a wide
op vocabulary, tracking every value's shape so each step is valid, with channel counts that are not multiples
of the vector width. `bench/fuzz_models.py` runs many seeds; the tests run a few fixed ones.

Only well-conditioned arithmetic is drawn (no division by a computed value, no Exp of an unbounded input), so
a mismatch is a bug and not rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from .model_builders import GraphBuilder

OPSET = 17
CHANNELS = (3, 8, 12, 16, 20, 24, 32, 40)
MAX_ELEMENTS = 1 << 16  # a value larger than this is not grown further: graphs stay quick to compile and run


@dataclass
class Value:
    name: str
    shape: tuple[int, ...]


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.g = GraphBuilder(f"random{seed}", seed=seed)
        self.ops: list[str] = []

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def const(self, shape, low=-1.0, high=1.0, base="k") -> str:
        return self.g.const(self.rng.uniform(low, high, shape).astype(np.float32), base)

    def op(self, op_type: str, inputs, n_out: int = 1, **attrs):
        self.ops.append(op_type)
        return self.g.op(op_type, inputs, n_out=n_out, **attrs)

    # --- steps: each takes the current value (and the earlier ones) and returns the next, or None -------------
    def conv(self, v: Value, _earlier) -> Value | None:
        if len(v.shape) != 4 or min(v.shape[2:]) < 3:
            return None
        n, c, h, w = v.shape
        kh, kw = self.pick([(1, 1), (3, 3), (3, 3), (1, 3), (3, 1), (5, 5)])
        stride = self.pick([1, 1, 2])
        dil = 2 if kh == kw == 3 and stride == 1 and min(h, w) >= 7 and self.rng.random() < 0.15 else 1
        r = self.rng.random()
        if kh == kw == 3 and r < 0.3:
            cout, groups = c, c  # depthwise
        elif r < 0.4 and c % 2 == 0 and c > 2:
            groups = self.pick([g for g in (2, 4) if c % g == 0])
            cout = groups * self.pick([2, 4, 8])
        else:
            cout, groups = self.pick([8, 12, 16, 24, 32, 40, 48]), 1
        wname = self.g.weight((cout, c // groups, kh, kw), c // groups * kh * kw, "conv.w")
        inputs = [v.name, wname]
        if self.rng.random() < 0.6:
            inputs.append(self.const((cout,), -0.2, 0.2, "conv.b"))
        if self.rng.random() < 0.8:  # "same"-style
            pads = [dil * (kh // 2), dil * (kw // 2)] * 2
        else:
            pads = [int(p) for p in self.rng.integers(0, 2, 4)]
        y = self.op("Conv", inputs, kernel_shape=[kh, kw], strides=[stride, stride], pads=pads, group=groups,
                    dilations=[dil, dil])
        oh = (h + pads[0] + pads[2] - dil * (kh - 1) - 1) // stride + 1
        ow = (w + pads[1] + pads[3] - dil * (kw - 1) - 1) // stride + 1
        if oh < 1 or ow < 1:
            return None
        if self.rng.random() < 0.4:
            bn = [self.const((cout,), 0.8, 1.2, "bn.s"), self.const((cout,), -0.1, 0.1, "bn.b"),
                  self.const((cout,), -0.1, 0.1, "bn.m"), self.const((cout,), 0.9, 1.1, "bn.v")]
            y = self.op("BatchNormalization", [y, *bn], epsilon=1e-5)
        return Value(y, (n, cout, oh, ow))

    def conv_transpose(self, v: Value, _earlier) -> Value | None:
        if len(v.shape) != 4 or _size(v.shape) * 4 > MAX_ELEMENTS:
            return None
        n, c, h, w = v.shape
        cout = self.pick([8, 12, 16])
        k, stride, pad = self.pick([(2, 2, 0), (3, 2, 1), (3, 1, 1), (4, 2, 1)])
        wname = self.g.weight((c, cout, k, k), c * k * k // stride ** 2, "convt.w")
        y = self.op("ConvTranspose", [v.name, wname], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
        return Value(y, (n, cout, (h - 1) * stride - 2 * pad + k, (w - 1) * stride - 2 * pad + k))

    def squeeze_excite(self, v: Value, _earlier) -> Value | None:
        """v * sigmoid(f(mean over H, W)): a computed value broadcast back over the one it came from."""
        if len(v.shape) != 4:
            return None
        n, c, h, w = v.shape
        s = self.op("ReduceMean", [v.name], axes=[2, 3], keepdims=1) if self.rng.random() < 0.5 else \
            self.op("GlobalAveragePool", [v.name])
        if self.rng.random() < 0.6:
            mid = max(2, c // 4)
            s = self.op("Relu", [self.op("Conv", [s, self.g.weight((mid, c, 1, 1), c, "se.w1"),
                                                  self.const((mid,), -0.1, 0.1, "se.b1")], kernel_shape=[1, 1])])
            s = self.op("Conv", [s, self.g.weight((c, mid, 1, 1), mid, "se.w2"), self.const((c,), -0.1, 0.1, "se.b2")],
                        kernel_shape=[1, 1])
        gate = self.op(self.pick(["Sigmoid", "HardSigmoid"]), [s])
        return Value(self.op("Mul", [v.name, gate]), v.shape)

    def pool(self, v: Value, _earlier) -> Value | None:
        if len(v.shape) != 4 or min(v.shape[2:]) < 4:
            return None
        n, c, h, w = v.shape
        kind = self.pick(["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"])
        if kind.startswith("Global"):
            return Value(self.op(kind, [v.name]), (n, c, 1, 1))
        k, s, p = self.pick([(2, 2, 0), (3, 1, 1), (3, 2, 1)])
        attrs = {"kernel_shape": [k, k], "strides": [s, s], "pads": [p] * 4}
        if kind == "AveragePool":
            attrs["count_include_pad"] = int(self.rng.integers(2))
        y = self.op(kind, [v.name], **attrs)
        return Value(y, (n, c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1))

    def unary(self, v: Value, _earlier) -> Value:
        kind = self.pick(["Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Abs",
                          "Neg", "Elu", "Softsign", "Erf"])
        if kind == "Clip":
            y = self.op("Clip", [v.name, self.g.const(np.float32(-0.5), "lo"), self.g.const(np.float32(0.7), "hi")])
        elif kind == "LeakyRelu":
            y = self.op(kind, [v.name], alpha=float(self.rng.uniform(0.01, 0.3)))
        else:
            y = self.op(kind, [v.name])
        return Value(y, v.shape)

    def binary_const(self, v: Value, _earlier) -> Value:
        """A constant broadcast from a random subset of the value's dims (per channel, per row, per column…)."""
        keep = self.rng.random(len(v.shape)) < 0.5
        shape = tuple(d if k else 1 for d, k in zip(v.shape, keep))
        if self.rng.random() < 0.3:  # a constant of lower rank: numpy-style right alignment
            shape = shape[int(self.rng.integers(len(shape))):]
        kind = self.pick(["Add", "Mul", "Sub", "Div", "Max", "Min"])
        if kind == "Div":
            k = self.rng.uniform(0.5, 2.0, shape) * self.rng.choice([-1.0, 1.0], shape)
            c = self.g.const(k.astype(np.float32), "div")
        else:
            c = self.const(shape, base="b")
        a, b = (c, v.name) if kind in ("Sub", "Add") and self.rng.random() < 0.5 else (v.name, c)
        return Value(self.op(kind, [a, b]), v.shape)

    def binary_earlier(self, v: Value, earlier) -> Value | None:
        same = [e for e in earlier if e.shape == v.shape and e.name != v.name]
        if not same:
            return None
        e = self.pick(same)
        return Value(self.op(self.pick(["Add", "Mul", "Sub", "Max"]), [v.name, e.name]), v.shape)

    def transpose(self, v: Value, _earlier) -> Value | None:
        if len(v.shape) < 2:
            return None
        perm = [int(p) for p in self.rng.permutation(len(v.shape))]
        return Value(self.op("Transpose", [v.name], perm=perm), tuple(v.shape[p] for p in perm))

    def reshape(self, v: Value, _earlier) -> Value | None:
        shape = list(v.shape)
        if len(shape) >= 2 and (len(shape) >= 4 or self.rng.random() < 0.5):  # merge two neighbours
            i = int(self.rng.integers(len(shape) - 1))
            new = shape[:i] + [shape[i] * shape[i + 1]] + shape[i + 2:]
        else:  # split one dim by a factor
            splittable = [(i, f) for i, d in enumerate(shape) for f in (2, 3, 4) if d % f == 0 and d > f]
            if not splittable:
                return None
            i, f = self.pick(splittable)
            new = shape[:i] + [f, shape[i] // f] + shape[i + 1:]
        spec = list(new)
        if self.rng.random() < 0.5:
            spec[int(self.rng.integers(len(spec)))] = -1
        return Value(self.op("Reshape", [v.name, self.g.const(np.array(spec, np.int64), "shape")]), tuple(new))

    def reduce(self, v: Value, _earlier) -> Value | None:
        if len(v.shape) < 2:
            return None
        axes = sorted(int(a) for a in self.rng.choice(len(v.shape), int(self.rng.integers(1, len(v.shape))),
                                                      replace=False))
        keep = int(self.rng.integers(2))
        kind = self.pick(["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"])
        if kind == "ReduceSum":  # opset 13+: axes as an input
            y = self.op(kind, [v.name, self.g.const(np.array(axes, np.int64), "axes")], keepdims=keep)
        else:
            y = self.op(kind, [v.name], axes=axes, keepdims=keep)
        shape = tuple(1 if i in axes else d for i, d in enumerate(v.shape)) if keep else \
            tuple(d for i, d in enumerate(v.shape) if i not in axes)
        return Value(y, shape)

    def softmax(self, v: Value, _earlier) -> Value:
        axis = int(self.rng.integers(-len(v.shape), len(v.shape)))
        return Value(self.op(self.pick(["Softmax", "LogSoftmax"]), [v.name], axis=axis), v.shape)

    def axis_of_at_least(self, v: Value, n: int) -> tuple[int, int] | None:
        """A random axis of v with extent ≥ n, and that extent."""
        dims = [i for i, d in enumerate(v.shape) if d >= n]
        if not dims:
            return None
        axis = self.pick(dims)
        return axis, v.shape[axis]

    def slice(self, v: Value, _earlier) -> Value | None:
        if (found := self.axis_of_at_least(v, 3)) is None:
            return None
        axis, d = found
        step = self.pick([1, 1, 2, -1])
        if step > 0:
            start = int(self.rng.integers(0, d - 1))
            end = int(self.rng.integers(start + 1, d + 1))
            length = len(range(start, end, step))
        else:
            start, end = d - 1 - int(self.rng.integers(0, d // 2)), -d - 1  # to the front, reversed
            length = len(range(start, -1, step))
        consts = [np.array([x], np.int64) for x in (start, end, axis, step)]
        y = self.op("Slice", [v.name, *(self.g.const(c, "sl") for c in consts)])
        return Value(y, tuple(length if i == axis else s for i, s in enumerate(v.shape)))

    def concat(self, v: Value, _earlier) -> Value:
        axis = int(self.rng.integers(len(v.shape)))
        other = self.unary(v, _earlier)
        parts = [v.name, other.name] if self.rng.random() < 0.5 else [other.name, v.name]
        shape = tuple(s * 2 if i == axis else s for i, s in enumerate(v.shape))
        return Value(self.op("Concat", parts, axis=axis), shape)

    def split(self, v: Value, _earlier) -> Value | None:
        if (found := self.axis_of_at_least(v, 2)) is None:
            return None
        axis, d = found
        first = int(self.rng.integers(1, d))
        a, b = self.op("Split", [v.name, self.g.const(np.array([first, d - first], np.int64), "split")], n_out=2,
                       axis=axis)
        if first == d - first:
            return Value(self.op("Add", [a, b]), tuple(first if i == axis else s for i, s in enumerate(v.shape)))
        keep_first = self.rng.random() < 0.5
        return Value(a if keep_first else b,
                     tuple((first if keep_first else d - first) if i == axis else s for i, s in enumerate(v.shape)))

    def matmul(self, v: Value, _earlier) -> Value | None:
        k = v.shape[-1]
        n = self.pick([8, 12, 16, 24, 33])
        if _size(v.shape) // k * n > MAX_ELEMENTS:
            return None
        w = self.g.weight((k, n), k, "mm.w")
        y = self.op("MatMul", [v.name, w])
        if self.rng.random() < 0.5:
            y = self.op("Add", [y, self.const((n,), -0.2, 0.2, "mm.b")])
        return Value(y, (*v.shape[:-1], n))

    def layer_norm(self, v: Value, _earlier) -> Value | None:
        if v.shape[-1] < 2:
            return None
        d = v.shape[-1]
        y = self.op("LayerNormalization", [v.name, self.const((d,), 0.5, 1.5, "ln.s"),
                                           self.const((d,), -0.2, 0.2, "ln.b")], axis=-1, epsilon=1e-5)
        return Value(y, v.shape)

    def gather(self, v: Value, _earlier) -> Value:
        axis = int(self.rng.integers(len(v.shape)))
        d = v.shape[axis]
        idx = self.rng.integers(-d, d, int(self.rng.integers(1, d + 2)))
        y = self.op("Gather", [v.name, self.g.const(idx.astype(np.int64), "idx")], axis=axis)
        return Value(y, tuple(len(idx) if i == axis else s for i, s in enumerate(v.shape)))

    def pad(self, v: Value, _earlier) -> Value | None:
        if len(v.shape) != 4 or min(v.shape[2:]) < 3:
            return None
        mode = self.pick(["constant", "reflect", "edge"])
        p = [0, 0, int(self.rng.integers(0, 3)), int(self.rng.integers(0, 3))] * 2
        y = self.op("Pad", [v.name, self.g.const(np.array(p, np.int64), "pads")], mode=mode)
        n, c, h, w = v.shape
        return Value(y, (n, c, h + p[2] + p[6], w + p[3] + p[7]))

    def resize(self, v: Value, _earlier) -> Value | None:
        if len(v.shape) != 4 or _size(v.shape) * 4 > MAX_ELEMENTS:
            return None
        scales = self.g.const(np.array([1, 1, 2, 2], np.float32), "scales")
        mode = self.pick(["nearest", "linear"])
        y = self.op("Resize", [v.name, "", scales], mode=mode)
        n, c, h, w = v.shape
        return Value(y, (n, c, 2 * h, 2 * w))

    def flatten_gemm(self, v: Value, _earlier) -> Value | None:
        if len(v.shape) < 2:
            return None
        axis = int(self.rng.integers(1, len(v.shape)))
        rows, k = _size(v.shape[:axis]), _size(v.shape[axis:])
        n = self.pick([10, 16, 24])
        if k > 4096:
            return None
        y = self.op("Flatten", [v.name], axis=axis)
        trans = int(self.rng.integers(2))
        w = self.g.weight((n, k) if trans else (k, n), k, "fc.w")
        y = self.op("Gemm", [y, w, self.const((n,), -0.1, 0.1, "fc.b")], transB=trans,
                    alpha=float(self.pick([1.0, 0.5])), beta=float(self.pick([1.0, 2.0])))
        return Value(y, (rows, n))

    def unsqueeze_squeeze(self, v: Value, _earlier) -> Value | None:
        ones = [i for i, d in enumerate(v.shape) if d == 1]
        if ones and self.rng.random() < 0.5:
            axes = [self.pick(ones)]
            y = self.op("Squeeze", [v.name, self.g.const(np.array(axes, np.int64), "axes")])
            return Value(y, tuple(d for i, d in enumerate(v.shape) if i not in axes)) if len(v.shape) > 1 else None
        if len(v.shape) >= 5:
            return None
        a = int(self.rng.integers(0, len(v.shape) + 1))
        y = self.op("Unsqueeze", [v.name, self.g.const(np.array([a], np.int64), "axes")])
        return Value(y, (*v.shape[:a], 1, *v.shape[a:]))

    def tile_expand(self, v: Value, _earlier) -> Value | None:
        if _size(v.shape) * 2 > MAX_ELEMENTS:
            return None
        if self.rng.random() < 0.5:
            reps = [1] * len(v.shape)
            reps[int(self.rng.integers(len(v.shape)))] = 2
            y = self.op("Tile", [v.name, self.g.const(np.array(reps, np.int64), "reps")])
            return Value(y, tuple(d * r for d, r in zip(v.shape, reps)))
        ones = [i for i, d in enumerate(v.shape) if d == 1]
        if not ones:
            return None
        shape = list(v.shape)
        shape[self.pick(ones)] = 3
        y = self.op("Expand", [v.name, self.g.const(np.array(shape, np.int64), "shape")])
        return Value(y, tuple(shape))

    def depth_space(self, v: Value, _earlier) -> Value | None:
        if len(v.shape) != 4:
            return None
        n, c, h, w = v.shape
        if c % 4 == 0 and self.rng.random() < 0.5:
            mode = self.pick(["DCR", "CRD"])
            return Value(self.op("DepthToSpace", [v.name], blocksize=2, mode=mode), (n, c // 4, h * 2, w * 2))
        if h % 2 == 0 and w % 2 == 0:
            return Value(self.op("SpaceToDepth", [v.name], blocksize=2), (n, c * 4, h // 2, w // 2))
        return None

    def argmax_gather(self, v: Value, _earlier) -> Value | None:
        """An integer path: the index of each row's maximum, used to pick from a constant table."""
        if len(v.shape) < 2:
            return None
        axis = len(v.shape) - 1
        # a ramp along the axis first: saturated values (erf and tanh give ±1 exactly) tie, and a 1-ulp
        # difference from ONNX Runtime's erf would then move the index; 1e-3 apart, rounding cannot
        ramp = self.g.const((np.arange(v.shape[axis]) * 1e-3).astype(np.float32), "ramp")
        idx = self.op(self.pick(["ArgMax", "ArgMin"]), [self.op("Add", [v.name, ramp])], axis=axis, keepdims=0)
        table = self.const((v.shape[axis], 4), base="table")
        return Value(self.op("Gather", [table, idx], axis=0), (*v.shape[:axis], 4))

    def attention(self, v: Value, _earlier) -> Value | None:
        """softmax(q kᵀ / √d) v with q, k, v projections of the value, split into heads when the width allows:
        a MatMul of two computed values, where every other MatMul here has constant weights."""
        if len(v.shape) < 2 or v.shape[-2] > 64 or v.shape[-1] > 256:
            return None
        *batch, t, width = v.shape
        d = self.pick([8, 12, 16])
        heads = self.pick([1, 2]) if len(v.shape) == 3 else 1
        proj = [self.op("MatMul", [v.name, self.g.weight((width, heads * d), width, "attn.w")]) for _ in range(3)]
        if heads > 1:  # [b, t, h*d] -> [b, h, t, d]
            split = self.g.const(np.array([batch[0], t, heads, d], np.int64), "heads")
            proj = [self.op("Transpose", [self.op("Reshape", [p, split])], perm=[0, 2, 1, 3]) for p in proj]
        q, k, val = proj
        rank = len(v.shape) + (1 if heads > 1 else 0)
        perm = [*range(rank - 2), rank - 1, rank - 2]
        scores = self.op("MatMul", [q, self.op("Transpose", [k], perm=perm)])
        scores = self.op("Mul", [scores, self.g.const(np.float32(1 / np.sqrt(d)), "scale")])
        out = self.op("MatMul", [self.op("Softmax", [scores], axis=-1), val])
        if heads > 1:
            out = self.op("Reshape", [self.op("Transpose", [out], perm=[0, 2, 1, 3]),
                                      self.g.const(np.array([batch[0], t, heads * d], np.int64), "merge")])
            return Value(out, (batch[0], t, heads * d))
        return Value(out, (*batch, t, d))

    def where(self, v: Value, earlier) -> Value:
        same = [e for e in earlier if e.shape == v.shape and e.name != v.name]
        other = self.pick(same).name if same else self.const(v.shape[-1:], base="alt")
        # a constant mask: a condition computed from v would flip wherever v sits at the threshold
        cond = self.g.const(self.rng.random(v.shape[-2:] if len(v.shape) > 1 else v.shape) < 0.5, "mask")
        return Value(self.op("Where", [cond, v.name, other]), v.shape)


# convs are drawn most often: they decide the blocked layouts that everything else meets
STEPS = ["conv", "conv", "conv", "pool", "unary", "unary", "binary_const", "binary_const", "binary_earlier",
         "transpose", "reshape", "reduce", "softmax", "slice", "concat", "split", "matmul", "layer_norm", "gather",
         "pad", "resize", "where", "conv_transpose", "squeeze_excite", "squeeze_excite", "flatten_gemm",
         "unsqueeze_squeeze", "tile_expand", "depth_space", "argmax_gather", "attention"]
TOKEN_STEPS = ["matmul", "matmul", "attention", "attention", "layer_norm", "softmax", "unary", "binary_const",
               "binary_earlier", "transpose", "reshape", "reduce", "slice", "concat", "split", "gather", "where",
               "flatten_gemm", "unsqueeze_squeeze", "tile_expand", "argmax_gather"]


def random_model(seed: int, max_steps: int = 8, qdq: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """One random graph (ONNX model; one float32 input, an NCHW image or an [N, T, D] sequence) and the ONNX ops
    it was built from, in order.

    With `qdq`, the same graph as without, quantized as ONNX Runtime's QDQ format does it: a QuantizeLinear →
    DequantizeLinear pair after about half the steps, and about half the conv, MatMul and Gemm weights stored as
    int8 with a per-channel DequantizeLinear (most of those with a uint8 pair on their input). Those choices come from a second generator, so a seed's graph is the same
    either way apart from the pairs."""
    b = _Builder(seed)
    q = np.random.default_rng([seed, 0x0D0]) if qdq else None
    n = int(b.pick([1, 1, 1, 2]))
    tokens = b.rng.random() < 0.3  # a sequence [N, T, D], transformer-style, instead of an image
    if tokens:
        shape = (n, int(b.pick([5, 8, 16, 20])), int(b.pick([12, 16, 24, 32, 64])))
    else:
        shape = (n, int(b.pick(CHANNELS)), int(b.pick([7, 9, 13, 14, 16])), int(b.pick([7, 9, 13, 14, 16])))
    v = Value("x", shape)
    earlier = [v]
    steps = int(b.rng.integers(2, max_steps + 1))
    tries = 0
    paired = 0  # ops of QDQ pairs: not steps
    while len(b.ops) - paired < steps and tries < 4 * max_steps:
        tries += 1
        step = b.pick(TOKEN_STEPS if tokens else STEPS)
        nxt = getattr(b, step)(v, earlier)
        if nxt is None or _size(nxt.shape) == 0 or len(nxt.shape) == 0 or _size(nxt.shape) > MAX_ELEMENTS:
            continue
        v = nxt
        if q is not None and q.random() < 0.5:
            v = _qdq_pair(b, v, q)
            paired += 2
        earlier.append(v)
    if q is not None:
        _int8_conv_weights(b, q)
    outputs = [(v.name, TensorProto.FLOAT, list(v.shape))]
    side = [e for e in earlier[1:-1] if e.name != v.name]
    if side and b.rng.random() < 0.3:  # an intermediate as a second output: the plan must not reuse its buffer
        e = b.pick(side)
        outputs.append((e.name, TensorProto.FLOAT, list(e.shape)))
    model = b.g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))], outputs, opset=OPSET)
    return model, b.ops


def _qdq_pair(b: _Builder, v: Value, q: np.random.Generator) -> Value:
    """x → QuantizeLinear → DequantizeLinear, per tensor, uint8 around 128 or int8 around 0 (values beyond the
    range saturate, as they would in a calibrated model's outliers)."""
    scale = b.g.const(np.float32(q.choice([0.02, 0.05, 0.1])), "q.s")
    zero = b.g.const(np.uint8(128) if q.random() < 0.5 else np.int8(0), "q.z")
    return Value(b.op("DequantizeLinear", [b.op("QuantizeLinear", [v.name, scale, zero]), scale, zero]), v.shape)


def _int8_conv_weights(b: _Builder, q: np.random.Generator) -> None:
    """About half the convs, MatMuls and Gemms read their weights as int8 with per-output-channel scales through
    DequantizeLinear (folded at import), and most of those their input through a uint8 pair, as ONNX Runtime's
    QDQ format writes them; the int8 rounding is part of the model, so ONNX Runtime sees the same."""
    inits = {t.name: t for t in b.g.inits}
    for node in [n for n in b.g.nodes if n.op_type in ("Conv", "MatMul", "Gemm")]:
        w = inits.get(node.input[1])
        if w is None or q.random() >= 0.5:
            continue
        value = onnx.numpy_helper.to_array(w)
        if value.ndim != (4 if node.op_type == "Conv" else 2):
            continue
        # the output channel: Conv's axis 0, MatMul's [k, n] axis 1, Gemm's axis 1 or (transB) 0
        trans = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        axis = 0 if node.op_type == "Conv" or trans else 1
        rows = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
        scale = (np.abs(rows).max(axis=1) / 127).astype(np.float32)
        scale[scale == 0] = 1.0
        shape = [1] * value.ndim
        shape[axis] = -1
        ints = np.clip(np.rint(value / scale.reshape(shape)), -127, 127).astype(np.int8)
        names = [b.g.const(ints, "wq"), b.g.const(scale, "wq.s"), b.g.const(np.zeros_like(scale, np.int8), "wq.z")]
        out = b.g.fresh("wq.dq")
        b.g.nodes.insert(0, helper.make_node("DequantizeLinear", names, [out], axis=axis, name=out))
        b.ops.append("DequantizeLinear")
        node.input[1] = out
        if not any(w.name in n.input for n in b.g.nodes):
            b.g.inits.remove(w)
        if q.random() < 0.75:  # its input through a uint8 pair too, as ONNX Runtime's quantizer writes a conv
            _uint8_input_pair(b, node, q)


def _uint8_input_pair(b: _Builder, node: onnx.NodeProto, q: np.random.Generator) -> None:
    """QuantizeLinear → DequantizeLinear on the conv's data input, uint8 with any zero point (the padding of a
    conv run on the integers must hold it): what passes/realize_qdq.py runs as an int8 conv."""
    scale = b.g.const(np.float32(q.choice([0.02, 0.05, 0.1])), "qx.s")
    zero = b.g.const(np.uint8(q.integers(0, 256)), "qx.z")
    quantized, dequantized = b.g.fresh("qx.q"), b.g.fresh("qx.dq")
    at = list(b.g.nodes).index(node)
    b.g.nodes.insert(at, helper.make_node("DequantizeLinear", [quantized, scale, zero], [dequantized],
                                          name=dequantized))
    b.g.nodes.insert(at, helper.make_node("QuantizeLinear", [node.input[0], scale, zero], [quantized], name=quantized))
    b.ops += ["QuantizeLinear", "DequantizeLinear"]
    node.input[0] = dequantized


def random_input(model: onnx.ModelProto, seed: int) -> np.ndarray:
    """The input a seed's graph is checked on: N(0, 1), seeded like the graph."""
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


HALF_COSINE = 0.999  # a float16/bfloat16 build's float outputs against float32 ONNX Runtime, per output
QDQ_COSINE = 0.99  # a QDQ graph's outputs against ONNX Runtime's: a value computed a rounding error apart may
                   # land on the other side of a quantization step, and a conv after it spreads that step


def half_precision_mismatch(got: list, want: list, ops: list[str], cosine: float = HALF_COSINE) -> str | None:
    """None when a float16/bfloat16 build's outputs agree with float32 ONNX Runtime's (cosine per float output;
    an arg-max's index is not compared, as rounding may move it); otherwise what differs first. A QDQ graph's
    outputs are compared the same way, at `QDQ_COSINE`."""
    for k, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            return f"output {k}: shape {g.shape} != {w.shape}"
        if {"ArgMax", "ArgMin"} & set(ops) or g.dtype.kind != "f" or not np.any(w):
            continue
        g64, w64 = g.astype(np.float64).ravel(), w.astype(np.float64).ravel()
        cos = float(g64 @ w64 / (np.linalg.norm(g64) * np.linalg.norm(w64) or 1.0))
        if not cos >= cosine:
            return f"output {k}: cosine {cos:.5f} < {cosine}"
    return None
