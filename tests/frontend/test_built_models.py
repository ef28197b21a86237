"""The architectures the onnx wheel does not ship, built in code: imported and interpreted, against ONNX Runtime."""

import numpy as np
import onnxruntime as ort
import pytest

from kiln import model_builders
from kiln.frontend import from_onnx
from kiln.ir import run_module
from kiln.ir.visitor import calls

from ..tolerances import assert_close


def ort_outputs(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("name", sorted(model_builders.BUILDERS))
def test_built_model_matches_onnxruntime(name):
    model = model_builders.BUILDERS[name]()
    feeds = model_builders.random_feeds(model, seed=1)
    got = run_module(from_onnx(model), **feeds)
    for g, w in zip(got, ort_outputs(model, feeds)):
        assert_close(g, w, rtol=1e-3, atol=1e-4, what=name)


@pytest.mark.parametrize("name", ["bert_layer", "gpt2_block"])
def test_shape_arithmetic_folds_away(name):
    """Shape→Slice/Gather→Concat→Reshape and Range over a static length all become constants at import."""
    mod = from_onnx(model_builders.BUILDERS[name]())
    names = {c.op_name for c in calls(mod.main.body)}
    assert not names & {"shape_of", "range", "concatenate"}, names


def test_symbolic_batch_is_bound_at_import():
    model = model_builders.resnet18(size=64)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_value")
    dim.dim_param = "batch"
    mod = from_onnx(model, input_shapes={"input": (2, 3, 64, 64)})
    assert mod.main.params[0].type.shape == (2, 3, 64, 64)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert_close(run_module(mod, x)[0], ort_outputs(model, {"input": x})[0], rtol=1e-3, atol=1e-4)
