"""Random small CNN graphs compiled and checked against ONNX Runtime: the memory plan's aggressive sharing (an
output written over a dying residual input, concat inputs written straight into the concat) and the fusion
rules (depthwise into 1x1) meet here in combinations no hand-written test lists."""

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import kiln
from kiln.model_builders import GraphBuilder, random_feeds

from ..tolerances import assert_close
from .test_compile import ort_run

# each step: (kind, parameter); kinds act on the current value and may reach back to earlier ones
STEP = st.tuples(st.sampled_from(["conv", "dw_block", "residual", "concat", "pool", "relu6"]), st.integers(0, 7))


def build(steps, channels: int, size: int) -> onnx.ModelProto:
    g = GraphBuilder("random", seed=len(steps))
    x, c = "x", channels
    earlier: list[tuple[str, int, int]] = []  # (value, channels, spatial size) still usable as a residual
    h = size
    for kind, p in steps:
        if kind == "conv":
            k, cout = (1, 3)[p % 2], (16, 32, 48)[p % 3]
            x, c = g.conv_bn(x, c, cout, k, act=("relu", None)[p % 2]), cout
        elif kind == "dw_block":  # expand, depthwise, project: MobileNet's block, fused by fuse_ops
            hidden, stride = c * 2, 2 if p % 4 == 3 and h >= 14 else 1
            y = g.conv_bn(x, c, hidden, 1, act="relu6")
            y = g.conv_bn(y, hidden, hidden, 3, stride, groups=hidden, act="relu6")
            y = g.conv_bn(y, hidden, c, 1, act=None)
            x, h = (g.op("Add", [x, y]) if stride == 1 else y), (h + 1) // stride
        elif kind == "residual":
            same = [v for v, vc, vh in earlier if vc == c and vh == h and v != x]
            if same:
                x = g.op("Relu", [g.op("Add", [same[p % len(same)], x])])
        elif kind == "concat":  # two branches joined: their convs write into the concat's buffer
            a = g.conv_bn(x, c, 16, 1)
            b = g.conv_bn(x, c, 16 * (1 + p % 2), 3)
            x, c = g.op("Concat", [a, b], axis=1), 16 + 16 * (1 + p % 2)
        elif kind == "pool" and h >= 8:
            x, h = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]), h // 2
        elif kind == "relu6":
            x = g.activation(x, "relu6")
        earlier.append((x, c, h))
    y = g.conv_bn(x, c, 8, 1, act=None)
    return g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
                   [(y, TensorProto.FLOAT, [1, 8, h, h])])


@settings(max_examples=12, deadline=None)
@given(steps=st.lists(STEP, min_size=2, max_size=7), channels=st.sampled_from([16, 32]),
       size=st.sampled_from([14, 16, 21]), target=st.sampled_from(["native", "x86-avx2"]),
       seed=st.integers(0, 1000))
def test_random_graphs_match_onnxruntime(tmp_path_factory, steps, channels, size, target, seed):
    model = build(steps, channels, size)
    feeds = random_feeds(model, seed=seed)
    path = tmp_path_factory.mktemp("rand") / "m.so"
    m = kiln.load(kiln.compile(model, path, kiln.Options(target=target)).path)
    x_before = feeds["x"].copy()
    got = m.run(**feeds)[0]
    assert_close(got, ort_run(model, feeds)[0], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(feeds["x"], x_before)  # the caller's input is never written over
    assert_close(m.run(**feeds)[0], got, rtol=0, atol=0)  # a second run: no state left behind
