"""The IR core: typing at construction, immutability, printing, structural equality, interpretation."""

from textwrap import dedent

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.errors import InputError, TypeCheckError
from kiln.ir import (
    Function, TensorType, Tuple, TupleGetItem, call, const, module, print_ir, run_module,
    structural_equal, structural_hash, var,
)
from kiln.ir.ops.elementwise import ADD, EXP, MULTIPLY, RELU
from kiln.ir.types import broadcast_shapes
from kiln.ir.visitor import post_order, rewrite_calls


def test_calls_are_typed_at_construction():
    x = var("x", "f32[N, 8]")
    y = call(ADD, x, var("b", "f32[8]"))
    assert y.type == TensorType(("N", 8), "float32")


def test_shape_error_names_the_node():
    with pytest.raises(TypeCheckError, match=r"node 'add_7' \(add\).*\[2, 3\].*\[4\]"):
        from kiln.ir import Call
        Call(ADD, (var("a", "f32[2, 3]"), var("b", "f32[4]")), span="add_7")


def test_dtype_mismatch_is_a_type_error():
    with pytest.raises(TypeCheckError, match="dtypes differ"):
        call(ADD, var("a", "f32[2]"), var("b", "i64[2]"))


def test_printer_one_binding_per_line():
    x = var("x", "f32[1, 8]")
    text = print_ir(module(call(RELU, call(ADD, x, const(np.ones(8, "float32"), name="bias")))))
    assert text == dedent("""\
        fn (%x: f32[1, 8]) {
          %0 = add(%x, @bias) : f32[1, 8]
          %1 = nn.relu(%0) : f32[1, 8]
          %1
        }""")


def test_printer_tuples_and_scalars():
    x = var("x", "f32[2]")
    t = Tuple((call(EXP, x), call(MULTIPLY, x, const(2.0, "float32"))))
    text = print_ir(module(TupleGetItem(t, 1)))
    assert "multiply(%x, 2.0:f32)" in text and "= (%0, %1) : (f32[2], f32[2])" in text and "%2.1" in text


def _graph(scale: float):
    x = var("x", "f32[4]")
    a = call(EXP, x)
    return Function((x,), call(ADD, call(MULTIPLY, a, const(scale, "float32")), a))


def test_structural_equality_ignores_identity_but_not_values():
    assert structural_equal(_graph(2.0), _graph(2.0))
    assert structural_hash(_graph(2.0)) == structural_hash(_graph(2.0))
    assert not structural_equal(_graph(2.0), _graph(3.0))


def test_structural_equality_respects_sharing_of_vars():
    x, y = var("x", "f32[4]"), var("y", "f32[4]")
    same = Function((x, y), call(ADD, x, x))
    diff = Function((x, y), call(ADD, x, y))
    assert not structural_equal(same, diff)


def test_rewrite_returns_new_module_and_leaves_input_untouched():
    x = var("x", "f32[4]")
    mod = module(call(RELU, call(EXP, x)))
    before = print_ir(mod)
    after = rewrite_calls(mod, lambda c: c.args[0] if c.op is RELU else None)
    assert print_ir(mod) == before
    assert "nn.relu" in before and "nn.relu" not in print_ir(after)
    assert after.main.body.op is EXP and after.main.body.args[0] is x


def test_post_order_survives_deep_graphs():
    x = var("x", "f32[1]")
    e = x
    for _ in range(5000):  # far past Python's recursion limit
        e = call(RELU, e)
    assert len(post_order(e)) == 5001
    assert run_module(module(e), np.array([-1.0], "float32"))[0][0] == 0


def test_interpreter_runs_multiple_outputs_by_name():
    x = var("x", "f32[3]")
    mod = module(Tuple((call(EXP, x), call(RELU, x))))
    v = np.array([-1.0, 0.0, 2.0], "float32")
    e, r = run_module(mod, x=v)
    np.testing.assert_allclose(e, np.exp(v), rtol=1e-6)
    np.testing.assert_array_equal(r, np.maximum(v, 0))


@pytest.mark.parametrize("given_input, match", [
    ({"y": np.zeros(3, "float32")}, "missing.*'x'"),
    ({"x": np.zeros(3, "float64")}, "expects f32\\[3\\], got float64"),
    ({"x": np.zeros(4, "float32")}, "got shape \\[4\\]"),
])
def test_interpreter_checks_inputs(given_input, match):
    mod = module(call(RELU, var("x", "f32[3]")))
    with pytest.raises(InputError, match=match):
        run_module(mod, **given_input)


def test_symbolic_dims_accept_any_size():
    mod = module(call(RELU, var("x", "f32[N, 2]")))
    assert run_module(mod, np.ones((5, 2), "float32"))[0].shape == (5, 2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([1, 2, 3, 5]), max_size=4), min_size=1, max_size=3))
def test_broadcast_shapes_agrees_with_numpy(shapes):
    shapes = [tuple(s) for s in shapes]
    try:
        want = np.broadcast_shapes(*shapes)
    except ValueError:
        with pytest.raises(TypeCheckError):
            broadcast_shapes(*shapes)
    else:
        assert broadcast_shapes(*shapes) == want


def test_type_parse_round_trips():
    for text in ["f32[1, 3, 224, 224]", "i64[N, 8]", "bool[]"]:
        assert str(TensorType.parse(text)) == text
