"""Outputs that no kernel computes (a model input, a constant, an output repeated) get a copy kernel, so such
models compile; codegen refused them before."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln


def _model(nodes, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in outputs],
                              list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CASES = {
    "input_as_output": _model([helper.make_node("Identity", ["x"], ["y"])], ["y"]),
    "constant_output": _model([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Identity", ["c"], ["z"])],
                              ["y", "z"], [numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "c")]),
    "repeated_output": _model([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Identity", ["y"], ["z"])],
                              ["y", "z"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_without_a_kernel_compile_and_match(name, tmp_path):
    model = CASES[name]
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    m = kiln.load(kiln.compile(model, tmp_path / "m.so").path)
    got = m.run(x)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    x[...] = 7  # outputs are copies: the caller's input and later runs change nothing already returned
    assert not any(np.shares_memory(g, x) for g in got)
