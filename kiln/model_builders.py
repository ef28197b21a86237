"""ONNX models built in code, with seeded random weights: the architectures Kiln must handle that the onnx
wheel does not ship (MobileNet v2/v3, EfficientNet-lite0, ResNet-18, BERT and GPT-2 blocks).

Each builder writes the ops the way common exporters do (BatchNormalization after Conv, Clip for ReLU6, Erf
GELU, Shape→Gather→Concat→Reshape shape arithmetic), so importing them exercises the same paths real files do.
Nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class GraphBuilder:
    """Accumulates nodes and initializers; names are unique and readable (`conv3`, `conv3.w`)."""

    def __init__(self, name: str, seed: int = 0):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.counts: dict[str, int] = {}

    def fresh(self, base: str) -> str:
        k = self.counts.get(base, 0)
        self.counts[base] = k + 1
        return f"{base}{k}"

    def const(self, value: np.ndarray, base: str = "c") -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, shape: tuple[int, ...], fan_in: int, base: str) -> str:
        w = self.rng.standard_normal(shape).astype(np.float32) * np.float32(math.sqrt(2.0 / max(fan_in, 1)))
        return self.const(w, base)

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        name = self.fresh(op_type.lower())
        outs = [f"{name}:{i}" if n_out > 1 else name for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs if n_out > 1 else outs[0]

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[tuple[str, int, list | None]],
              opset: int = OPSET) -> onnx.ModelProto:
        outs = [helper.make_tensor_value_info(n, dt, shape) for n, dt, shape in outputs]
        graph = helper.make_graph(self.nodes, self.name, inputs, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="kiln.model_builders")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model

    # --- CNN pieces -------------------------------------------------------------------------------------
    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                act: str | None = "relu") -> str:
        w = self.weight((cout, cin // groups, k, k), cin // groups * k * k, "conv.w")
        y = self.op("Conv", [x, w], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4,
                    group=groups)
        bn = [self.const((1 + 0.1 * self.rng.standard_normal(cout)).astype(np.float32), "bn.scale"),
              self.const((0.1 * self.rng.standard_normal(cout)).astype(np.float32), "bn.bias"),
              self.const((0.1 * self.rng.standard_normal(cout)).astype(np.float32), "bn.mean"),
              self.const((1 + 0.1 * self.rng.random(cout)).astype(np.float32), "bn.var")]
        y = self.op("BatchNormalization", [y, *bn], epsilon=1e-5)
        return self.activation(y, act)

    def activation(self, x: str, act: str | None) -> str:
        if act is None:
            return x
        if act == "relu":
            return self.op("Relu", [x])
        if act == "relu6":
            return self.op("Clip", [x, self.const(np.float32(0), "zero"), self.const(np.float32(6), "six")])
        if act == "hardswish":
            return self.op("HardSwish", [x])
        raise ValueError(act)

    def classifier(self, x: str, channels: int, classes: int = 1000) -> str:
        y = self.op("GlobalAveragePool", [x])
        y = self.op("Flatten", [y], axis=1)
        w = self.weight((classes, channels), channels, "fc.w")
        b = self.const(np.zeros(classes, np.float32), "fc.b")
        return self.op("Gemm", [y, w, b], transB=1)


def _image_input(batch: int, size: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])


def _inverted_residuals(g: GraphBuilder, x: str, cin: int, stages) -> tuple[str, int]:
    """MobileNetV2-style stages: 1x1 expand, kxk depthwise, 1x1 project, a residual where shapes allow; ReLU6.
    Each stage is (expand ratio, channels, repeats, stride of the first, kernel)."""
    for t, c, n, s, k in stages:
        for i in range(n):
            stride, hidden = (s if i == 0 else 1), cin * t
            y = g.conv_bn(x, cin, hidden, 1, act="relu6") if t != 1 else x
            y = g.conv_bn(y, hidden, hidden, k, stride, groups=hidden, act="relu6")
            y = g.conv_bn(y, hidden, c, 1, act=None)
            x = g.op("Add", [x, y]) if stride == 1 and cin == c else y
            cin = c
    return x, cin


def mobilenet_v2(batch: int = 1, size: int = 224, seed: int = 0) -> onnx.ModelProto:
    g = GraphBuilder("mobilenet_v2", seed)
    x = g.conv_bn("input", 3, 32, 3, 2, act="relu6")
    # expand ratio, channels, repeats, stride, kernel
    x, cin = _inverted_residuals(g, x, 32, [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 32, 3, 2, 3), (6, 64, 4, 2, 3),
                                            (6, 96, 3, 1, 3), (6, 160, 3, 2, 3), (6, 320, 1, 1, 3)])
    x = g.conv_bn(x, cin, 1280, 1, act="relu6")
    return g.model([_image_input(batch, size)], [(g.classifier(x, 1280), TensorProto.FLOAT, [batch, 1000])])


def mobilenet_v3_large(batch: int = 1, size: int = 224, seed: int = 0) -> onnx.ModelProto:
    g = GraphBuilder("mobilenet_v3_large", seed)

    def squeeze_excite(x: str, c: int) -> str:
        mid = max(8, (c // 4 + 4) // 8 * 8)
        s = g.op("GlobalAveragePool", [x])
        s = g.op("Conv", [s, g.weight((mid, c, 1, 1), c, "se.w1"), g.const(np.zeros(mid, np.float32))],
                 kernel_shape=[1, 1])
        s = g.op("Relu", [s])
        s = g.op("Conv", [s, g.weight((c, mid, 1, 1), mid, "se.w2"), g.const(np.zeros(c, np.float32))],
                 kernel_shape=[1, 1])
        s = g.op("HardSigmoid", [s], alpha=1 / 6, beta=0.5)
        return g.op("Mul", [x, s])

    x = g.conv_bn("input", 3, 16, 3, 2, act="hardswish")
    cin = 16
    # kernel, expanded, out, squeeze-excite, activation, stride (the paper's Table 1)
    for k, exp, c, se, act, s in [
        (3, 16, 16, False, "relu", 1), (3, 64, 24, False, "relu", 2), (3, 72, 24, False, "relu", 1),
        (5, 72, 40, True, "relu", 2), (5, 120, 40, True, "relu", 1), (5, 120, 40, True, "relu", 1),
        (3, 240, 80, False, "hardswish", 2), (3, 200, 80, False, "hardswish", 1),
        (3, 184, 80, False, "hardswish", 1), (3, 184, 80, False, "hardswish", 1),
        (3, 480, 112, True, "hardswish", 1), (3, 672, 112, True, "hardswish", 1),
        (5, 672, 160, True, "hardswish", 2), (5, 960, 160, True, "hardswish", 1),
        (5, 960, 160, True, "hardswish", 1),
    ]:
        y = g.conv_bn(x, cin, exp, 1, act=act) if exp != cin else x
        y = g.conv_bn(y, exp, exp, k, s, groups=exp, act=act)
        if se:
            y = squeeze_excite(y, exp)
        y = g.conv_bn(y, exp, c, 1, act=None)
        x = g.op("Add", [x, y]) if s == 1 and cin == c else y
        cin = c
    x = g.conv_bn(x, cin, 960, 1, act="hardswish")
    y = g.op("GlobalAveragePool", [x])
    y = g.op("Conv", [y, g.weight((1280, 960, 1, 1), 960, "head.w"), g.const(np.zeros(1280, np.float32))],
             kernel_shape=[1, 1])
    y = g.op("HardSwish", [y])
    y = g.op("Flatten", [y], axis=1)
    y = g.op("Gemm", [y, g.weight((1000, 1280), 1280, "fc.w"), g.const(np.zeros(1000, np.float32))], transB=1)
    return g.model([_image_input(batch, size)], [(y, TensorProto.FLOAT, [batch, 1000])])


def efficientnet_lite0(batch: int = 1, size: int = 224, seed: int = 0) -> onnx.ModelProto:
    g = GraphBuilder("efficientnet_lite0", seed)
    x = g.conv_bn("input", 3, 32, 3, 2, act="relu6")
    # EfficientNet-B0's stages without squeeze-excite and with ReLU6: the "lite" variant
    x, cin = _inverted_residuals(g, x, 32, [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3),
                                            (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)])
    x = g.conv_bn(x, cin, 1280, 1, act="relu6")
    return g.model([_image_input(batch, size)], [(g.classifier(x, 1280), TensorProto.FLOAT, [batch, 1000])])


def small_cnn(seed: int = 0, name: str = "small_cnn") -> onnx.ModelProto:
    """Two 3x3 convs with relu and 2x2 max pools, then a classifier, on a 3x16x16 image: kilobytes of weights,
    for tests and for a first check that an executor runs at all."""
    g = GraphBuilder(name, seed)
    x = "data"
    for cin, cout in ((3, 8), (8, 16)):
        x = g.op("Relu", [g.op("Conv", [x, g.weight((cout, cin, 3, 3), cin * 9, "conv.w")], kernel_shape=[3, 3],
                               pads=[1] * 4)])
        x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    y = g.op("Softmax", [g.classifier(x, 16, 10)], axis=1)
    return g.model([helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 16, 16])],
                   [(y, TensorProto.FLOAT, [1, 10])])


def resnet18(batch: int = 1, size: int = 224, seed: int = 0) -> onnx.ModelProto:
    g = GraphBuilder("resnet18", seed)
    x = g.conv_bn("input", 3, 64, 7, 2)
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for c, s in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for i in range(2):
            stride = s if i == 0 else 1
            y = g.conv_bn(x, cin, c, 3, stride)
            y = g.conv_bn(y, c, c, 3, 1, act=None)
            short = g.conv_bn(x, cin, c, 1, stride, act=None) if stride != 1 or cin != c else x
            x = g.op("Relu", [g.op("Add", [y, short])])
            cin = c
    return g.model([_image_input(batch, size)], [(g.classifier(x, 512), TensorProto.FLOAT, [batch, 1000])])


def _dense(g: GraphBuilder, x: str, cin: int, cout: int) -> str:
    w = g.const((g.rng.standard_normal((cin, cout)) * 0.02).astype(np.float32), "w")
    b = g.const((g.rng.standard_normal(cout) * 0.02).astype(np.float32), "b")
    return g.op("Add", [g.op("MatMul", [x, w]), b])


def _heads(g: GraphBuilder, x: str, shape_src: str, heads: int, head_dim: int, perm: list[int]) -> str:
    """[b, s, h*d] → [b, h, s, d] (or [b, h, d, s]); the target shape computed from Shape, as exporters do."""
    shape = g.op("Shape", [shape_src])
    bs = g.op("Slice", [shape, g.const(np.array([0], np.int64)), g.const(np.array([2], np.int64))])
    target = g.op("Concat", [bs, g.const(np.array([heads, head_dim], np.int64))], axis=0)
    return g.op("Transpose", [g.op("Reshape", [x, target])], perm=perm)


def bert_layer(batch: int = 1, seq: int = 128, hidden: int = 768, heads: int = 12, ffn: int = 3072,
               seed: int = 0) -> onnx.ModelProto:
    """One BERT-base encoder layer: self-attention with a padding mask, residuals, LayerNorm, Erf GELU."""
    g = GraphBuilder("bert_layer", seed)
    d = hidden // heads
    x = "hidden_states"
    mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    mask = g.op("Mul", [g.op("Sub", [g.const(np.float32(1)), mask]), g.const(np.float32(-10000.0))])
    mask = g.op("Unsqueeze", [mask, g.const(np.array([1, 2], np.int64))])  # [b, 1, 1, s]
    q = _heads(g, _dense(g, x, hidden, hidden), x, heads, d, [0, 2, 1, 3])
    k = _heads(g, _dense(g, x, hidden, hidden), x, heads, d, [0, 2, 3, 1])
    v = _heads(g, _dense(g, x, hidden, hidden), x, heads, d, [0, 2, 1, 3])
    scores = g.op("Div", [g.op("MatMul", [q, k]), g.const(np.float32(math.sqrt(d)))])
    probs = g.op("Softmax", [g.op("Add", [scores, mask])], axis=-1)
    ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", [ctx, g.const(np.array([0, 0, hidden], np.int64))])
    attn = g.op("Add", [_dense(g, ctx, hidden, hidden), x])
    ones, zeros = np.ones(hidden, np.float32), np.zeros(hidden, np.float32)
    attn = g.op("LayerNormalization", [attn, g.const(ones), g.const(zeros)], axis=-1, epsilon=1e-12)
    h = _dense(g, attn, hidden, ffn)
    erf = g.op("Erf", [g.op("Div", [h, g.const(np.float32(math.sqrt(2.0)))])])
    h = g.op("Mul", [g.op("Mul", [h, g.op("Add", [erf, g.const(np.float32(1))])]), g.const(np.float32(0.5))])
    out = g.op("Add", [_dense(g, h, ffn, hidden), attn])
    out = g.op("LayerNormalization", [out, g.const(ones), g.const(zeros)], axis=-1, epsilon=1e-12)
    inputs = [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, [batch, seq, hidden]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, seq])]
    return g.model(inputs, [(out, TensorProto.FLOAT, [batch, seq, hidden])])


def gpt2_block(batch: int = 1, seq: int = 64, hidden: int = 256, heads: int = 4, vocab: int = 1000,
               max_pos: int = 256, seed: int = 0) -> onnx.ModelProto:
    """GPT-2 style: token + position embeddings (Gather), decomposed LayerNorm, fused QKV Split, a causal mask
    sliced from a constant buffer and applied with Where, tanh-GELU with Pow."""
    g = GraphBuilder("gpt2_block", seed)
    d = hidden // heads

    def layer_norm(x: str) -> str:
        mean = g.op("ReduceMean", [x], axes=[-1])
        c = g.op("Sub", [x, mean])
        var = g.op("ReduceMean", [g.op("Pow", [c, g.const(np.float32(2))])], axes=[-1])
        std = g.op("Sqrt", [g.op("Add", [var, g.const(np.float32(1e-5))])])
        return g.op("Add", [g.op("Mul", [g.op("Div", [c, std]), g.const(np.ones(hidden, np.float32))]),
                            g.const(np.zeros(hidden, np.float32))])

    wte = g.const((g.rng.standard_normal((vocab, hidden)) * 0.02).astype(np.float32), "wte")
    wpe = g.const((g.rng.standard_normal((max_pos, hidden)) * 0.01).astype(np.float32), "wpe")
    ids_shape = g.op("Shape", ["input_ids"])
    seq_len = g.op("Gather", [ids_shape, g.const(np.int64(1))], axis=0)
    positions = g.op("Range", [g.const(np.int64(0)), seq_len, g.const(np.int64(1))])
    x = g.op("Add", [g.op("Gather", [wte, "input_ids"], axis=0), g.op("Gather", [wpe, positions], axis=0)])
    qkv = _dense(g, layer_norm(x), hidden, 3 * hidden)
    q, k, v = g.op("Split", [qkv, g.const(np.array([hidden] * 3, np.int64))], n_out=3, axis=2)
    q = _heads(g, q, x, heads, d, [0, 2, 1, 3])
    k = _heads(g, k, x, heads, d, [0, 2, 3, 1])
    v = _heads(g, v, x, heads, d, [0, 2, 1, 3])
    scores = g.op("Div", [g.op("MatMul", [q, k]), g.const(np.float32(math.sqrt(d)))])
    causal = g.const(np.tril(np.ones((max_pos, max_pos), bool))[None, None], "causal")
    end = g.op("Unsqueeze", [seq_len, g.const(np.array([0], np.int64))])
    zero = g.const(np.array([0], np.int64))
    causal = g.op("Slice", [causal, zero, end, g.const(np.array([2], np.int64))])
    causal = g.op("Slice", [causal, zero, end, g.const(np.array([3], np.int64))])
    scores = g.op("Where", [causal, scores, g.const(np.float32(-1e9))])
    ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]),
                           g.const(np.array([batch, -1, hidden], np.int64))])
    x = g.op("Add", [x, _dense(g, ctx, hidden, hidden)])
    h = _dense(g, layer_norm(x), hidden, 4 * hidden)
    cube = g.op("Mul", [g.op("Pow", [h, g.const(np.float32(3))]), g.const(np.float32(0.044715))])
    inner = g.op("Mul", [g.op("Add", [h, cube]), g.const(np.float32(math.sqrt(2 / math.pi)))])
    gelu = g.op("Mul", [g.op("Mul", [h, g.const(np.float32(0.5))]),
                        g.op("Add", [g.op("Tanh", [inner]), g.const(np.float32(1))])])
    h = g.op("Expand", [_dense(g, gelu, 4 * hidden, hidden), g.const(np.array([batch, seq, hidden], np.int64))])
    out = g.op("Add", [x, h])
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq])]
    return g.model(inputs, [(out, TensorProto.FLOAT, [batch, seq, hidden])])


BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_large": mobilenet_v3_large,
    "efficientnet_lite0": efficientnet_lite0,
    "resnet18": resnet18,
    "bert_layer": bert_layer,
    "gpt2_block": gpt2_block,
}


def random_feeds(model: onnx.ModelProto, seed: int = 0, shapes=None) -> dict[str, np.ndarray]:
    """Inputs for a built model: images ~ N(0, 1), masks of ones with a padded tail, token ids in range.
    `shapes` (name → shape) gives the shape of an input whose dims the model leaves symbolic."""
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = list((shapes or {}).get(vi.name) or [d.dim_value for d in vi.type.tensor_type.shape.dim])
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if vi.name == "attention_mask":
            m = np.ones(shape, dtype)
            m[..., shape[-1] * 3 // 4:] = 0
            feeds[vi.name] = m
        elif vi.name == "input_ids":
            feeds[vi.name] = rng.integers(0, 1000, shape).astype(dtype)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds
