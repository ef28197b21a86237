"""ONNX functions inlined at import: a model's own functions, and standard ops Kiln has no converter for that ONNX
defines as functions (frontend/onnx/functions.py). Checked against ONNX Runtime, interpreted and compiled."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from kiln.errors import UnsupportedError
from kiln.frontend import from_onnx
from kiln.frontend.onnx.functions import expand_functions
from kiln.ir import Call
from kiln.ir.visitor import post_order

from .unrolled import check, make_model, rand, tensor


def _scaled_tanh_function():
    """custom.ScaledTanh(x) = tanh(x) * alpha, alpha an attribute with a default of 2.0; it calls another local
    function (custom.Twice) so inlining has to recurse."""
    twice = helper.make_function(
        "custom", "Twice", ["t"], ["u"], [helper.make_node("Add", ["t", "t"], ["u"])],
        opset_imports=[helper.make_opsetid("", 17)])
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Constant", [], ["a"], value_float=0.0),
        helper.make_node("Constant", [], ["a2"]),
        helper.make_node("Mul", ["t", "a2"], ["m"]),
        helper.make_node("Twice", ["m"], ["y"], domain="custom"),
    ]
    ref = helper.AttributeProto()
    ref.name, ref.ref_attr_name, ref.type = "value_float", "alpha", helper.AttributeProto.FLOAT
    nodes[2].attribute.append(ref)
    scaled = helper.make_function("custom", "ScaledTanh", ["x"], ["y"], nodes,
                                  opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
                                  attributes=[])
    scaled.attribute_proto.append(helper.make_attribute("alpha", 2.0))
    return scaled, twice


def _with_functions(nodes, inputs, outputs, functions, opset=17):
    model = make_model(nodes, inputs, outputs, opset=opset)
    model.opset_import.append(helper.make_opsetid("custom", 1))
    model.functions.extend(functions)
    return model


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_model_local_functions_are_inlined(tmp_path, alpha):
    scaled, twice = _scaled_tanh_function()
    node = helper.make_node("ScaledTanh", ["x"], ["y"], domain="custom", name="st")
    if alpha is not None:
        node.attribute.append(helper.make_attribute("alpha", alpha))
    model = _with_functions([node, helper.make_node("Relu", ["y"], ["z"])], [tensor("x", [3, 8])],
                            [tensor("z", [3, 8])], [scaled, twice])
    feeds = {"x": rand(np.random.default_rng(0), 3, 8)}
    want = np.maximum(np.tanh(feeds["x"]) * (2.0 if alpha is None else alpha) * 2, 0)
    check(model, feeds, tmp_path, want=[want])
    check(model, feeds, want=None)  # and ONNX Runtime agrees


def test_expansion_leaves_the_callers_model_alone():
    scaled, twice = _scaled_tanh_function()
    model = _with_functions([helper.make_node("ScaledTanh", ["x"], ["y"], domain="custom")],
                            [tensor("x", [4])], [tensor("y", [4])], [scaled, twice])
    before = model.SerializeToString()
    out = expand_functions(model)
    assert model.SerializeToString() == before
    assert not out.functions and {n.op_type for n in out.graph.node} >= {"Tanh", "Add"}
    plain = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [4])], [tensor("y", [4])])
    assert expand_functions(plain) is plain  # nothing to expand: no copy


def test_standard_function_op_without_converter_compiles(tmp_path):
    """DynamicQuantizeLinear (ONNX Runtime's dynamic quantization emits it) has no converter: its function body
    is inlined. Its three outputs match ONNX Runtime's kernel bit for bit."""
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zp"])
    model = make_model([node], [tensor("x", [4, 16])],
                       [tensor("y", [4, 16], TensorProto.UINT8), tensor("scale", [], TensorProto.FLOAT),
                        tensor("zp", [], TensorProto.UINT8)], opset=21)
    feeds = {"x": rand(np.random.default_rng(1), 4, 16) * 3 + 0.5}
    check(model, feeds, tmp_path, rtol=0, atol=0)


def test_context_dependent_function_op(tmp_path):
    """CenterCropPad's body depends on its inputs' types (ONNX builds it per node); crop one axis, pad another."""
    node = helper.make_node("CenterCropPad", ["x", "shape"], ["y"], axes=[0, 1])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [4, 9])
    model = make_model([node], [tensor("x", [6, 5])], [tensor("y", [4, 9])], [shape], opset=18)
    x = rand(np.random.default_rng(2), 6, 5)
    want = np.zeros((4, 9), np.float32)
    want[:, 2:7] = x[1:5]
    check(model, {"x": x}, tmp_path, want=[want])


def test_a_converter_wins_over_the_function_body():
    """Celu is a function in ONNX and has a converter in Kiln: the converter's fused op is what imports."""
    model = make_model([helper.make_node("Celu", ["x"], ["y"], alpha=0.5)], [tensor("x", [4])],
                       [tensor("y", [4])], opset=17)
    ops = {e.op.name for e in post_order(from_onnx(model).main.body) if isinstance(e, Call)}
    assert ops == {"nn.celu"}


def test_function_body_with_an_unsupported_op_is_reported_by_that_op():
    node = helper.make_node("Bernoulli", ["x"], ["y"], name="coin")
    model = make_model([node], [tensor("x", [4])], [tensor("y", [4])], opset=22)
    with pytest.raises(UnsupportedError, match="RandomUniformLike"):
        from_onnx(model)


def test_function_op_inside_a_local_function_is_expanded_too():
    """A second round: the local function's body, once inlined, holds DynamicQuantizeLinear (no converter)."""
    body = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    f = helper.make_function("custom", "FakeQuant", ["x"], ["y"], body, opset_imports=[helper.make_opsetid("", 21)])
    model = _with_functions([helper.make_node("FakeQuant", ["x"], ["y"], domain="custom")], [tensor("x", [4, 8])],
                            [tensor("y", [4, 8])], [f], opset=21)
    out = expand_functions(model)
    assert not out.functions and "DynamicQuantizeLinear" not in {n.op_type for n in out.graph.node}
    check(model, {"x": rand(np.random.default_rng(3), 4, 8)}, rtol=0, atol=0)
