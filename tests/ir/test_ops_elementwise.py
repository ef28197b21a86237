"""Elementwise ops against onnx's ReferenceEvaluator: broadcasting, dtypes, and the attribute-carrying ones."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kiln.errors import TypeCheckError
from kiln.frontend import from_onnx

from ..onnx_check import check_node, make_node_model

RNG = np.random.default_rng(0)
F = RNG.standard_normal((3, 4)).astype(np.float32)
POS = np.abs(F) + 0.1

UNARY = ["Abs", "Neg", "Exp", "Tanh", "Sigmoid", "Erf", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Atan",
         "Softplus", "Softsign", "HardSwish", "Mish", "Relu"]


@pytest.mark.parametrize("op", UNARY)
def test_unary(op):
    check_node(op, {"x": F * 3})


@pytest.mark.parametrize("op", ["Log", "Sqrt", "Reciprocal"])
def test_unary_positive_domain(op):
    check_node(op, {"x": POS})


@settings(max_examples=40, deadline=None)
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4),
       op=st.sampled_from(["Add", "Sub", "Mul", "Div", "Max", "Min", "Greater", "Equal"]))
def test_binary_broadcasting(shapes, op):
    a = RNG.standard_normal(shapes.input_shapes[0]).astype(np.float32)
    b = RNG.standard_normal(shapes.input_shapes[1]).astype(np.float32) + 3
    check_node(op, {"a": a, "b": b})


@pytest.mark.parametrize("op,kw", [("LeakyRelu", {"alpha": 0.3}), ("Elu", {"alpha": 0.7}), ("Selu", {}),
                                   ("Celu", {"alpha": 2.0}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
                                   ("ThresholdedRelu", {"alpha": 0.5}), ("Shrink", {"lambd": 0.7, "bias": 0.2})])
def test_activations_with_parameters(op, kw):
    check_node(op, {"x": F * 2}, **kw)


def test_integer_ops():
    a = np.array([-7, 7, 5, -3], np.int64)
    b = np.array([2, -3, 2, 3], np.int64)
    check_node("Div", {"a": a, "b": b})
    check_node("Mod", {"a": a, "b": b})
    check_node("Mod", {"a": a, "b": b}, fmod=1)
    check_node("BitShift", {"a": a.astype(np.uint32) % 8, "b": np.array([1, 2, 3, 0], np.uint32)}, direction="LEFT")


def test_clip_where_cast_prelu_variadic():
    check_node("Clip", {"x": F}, {"lo": np.float32(-0.5)})
    check_node("Where", {"c": F > 0, "x": F, "y": np.zeros((1, 4), np.float32)})
    check_node("Cast", {"x": F * 10}, to=7)
    check_node("PRelu", {"x": F}, {"s": np.array([0.1, 0.2, 0.3, 0.4], np.float32)})
    check_node("Sum", {"a": F, "b": F[:1], "c": F[:, :1]})
    check_node("Mean", {"a": F, "b": F[:1]})


def test_mixed_dtypes_are_a_type_error_naming_the_node():
    model = make_node_model("Add", {"a": F, "b": np.ones(4, np.int64)})
    with pytest.raises(TypeCheckError, match=r"node 'the_add' \(add\).*dtypes differ"):
        from_onnx(model)
