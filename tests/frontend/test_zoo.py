"""The nine ONNX zoo models shipped in the onnx wheel, with random weights, through frontend + interpreter."""

import numpy as np
import onnxruntime as ort
import pytest

from kiln import zoo
from kiln.errors import KilnError
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


@pytest.mark.parametrize("name", ["resnet50", "bert_layer", "shufflenet"])
def test_a_zoo_model_at_batch_two_computes_each_sample_as_at_batch_one(name):
    """`zoo:NAME,batch=N` (the GPU check's ResNet-50 at batch 32): the inputs' batch and the Reshapes' leading
    1 become N; ONNX Runtime on the rebatched model must give each sample what the batch-1 model gives it."""
    one = zoo.zoo_model(name)
    two = zoo.resolve(f"zoo:{name},batch=2")
    a, b = zoo.feeds(one, seed=0), zoo.feeds(one, seed=1)
    both = {k: np.concatenate([a[k], b[k]]) for k in a}
    s1 = ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"])
    s2 = ort.InferenceSession(two.SerializeToString(), providers=["CPUExecutionProvider"])
    for x, y, z in zip(s1.run(None, a), s1.run(None, b), s2.run(None, both)):
        assert z.shape[0] == 2
        np.testing.assert_allclose(z, np.concatenate([x, y]), rtol=1e-4, atol=1e-5)


def test_a_model_that_sums_over_its_batch_is_not_rebatched():
    """x + sum of x over the batch: at batch 1 that is 2x; at batch N the sum mixes samples, so rebatching
    would change what the model computes without a word."""
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1, name="sum_over_batch"),
         helper.make_node("Add", ["x", "s"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [0])])
    with pytest.raises(KilnError, match="sum_over_batch"):
        zoo.rebatch(helper.make_model(g), 4)
    with pytest.raises(KilnError, match="batch=N"):
        zoo.resolve("zoo:resnet50,batch=0")
