"""The nine ONNX zoo models shipped in the onnx wheel, with random weights, through frontend + interpreter."""

import numpy as np
import onnxruntime as ort
import pytest

from kiln import zoo
from kiln.frontend import from_onnx
from kiln.ir import run_module
from kiln.ir.visitor import calls

from ..tolerances import assert_close


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("vgg19", "zfnet512") else n
                                  for n in zoo.WHEEL_MODELS])  # the two largest (548 and 350 MB of weights): -m slow
def test_zoo_model_matches_onnxruntime(name):
    model = zoo.zoo_model(name, random_weights=True, seed=0)
    feeds = zoo.feeds(model, seed=0)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)
    # Logits before the final softmax carry the information; check they are not degenerate.
    got = run_module(from_onnx(model), **feeds)
    for g, w in zip(got, want):
        assert_close(g, w, rtol=1e-3, atol=1e-5, what=name)
    assert np.ptp(want[0]) > 1e-6, f"{name}: ONNX Runtime output is constant; the random weights are degenerate"


def test_random_weights_replace_every_constant_of_shape():
    model = zoo.zoo_model("resnet50")
    assert not [n for n in model.graph.node if n.op_type == "ConstantOfShape"]
    mod = from_onnx(model)
    assert {c.op_name for c in calls(mod.main.body)} >= {"nn.conv2d", "nn.batch_norm", "nn.dense", "nn.softmax"}


def test_wheel_models_import_with_their_own_constant_weights():
    mod = from_onnx(zoo.zoo_model("squeezenet", random_weights=False))
    assert mod.main.params[0].type.shape == (1, 3, 224, 224)
