"""If, Loop and Scan resolved at import, sequences as tuples of IR values, opset < 7 broadcasting, and the refusal
of data-dependent ops: interpreter and compiled artifacts against ONNX Runtime."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.errors import NeedsConstantError, UnsupportedError
from kiln.frontend import from_onnx

from .unrolled import check, make_model, rand, tensor

F = TensorProto.FLOAT


def const_node(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def if_model(cond_node):
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [], [tensor("t", [2, 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [tensor("e", [2, 3])])
    nodes = [cond_node, helper.make_node("If", ["c"], ["r"], name="my_if", then_branch=then_g, else_branch=else_g),
             helper.make_node("Add", ["r", "x"], ["y"])]
    return make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])])


@pytest.mark.parametrize("cond", [True, False])
def test_if_on_a_constant_inlines_the_taken_branch(cond, tmp_path):
    model = if_model(const_node("c", np.array(cond)))
    check(model, {"x": rand(np.random.default_rng(0), 2, 3)}, tmp_path if cond else None)


def test_if_on_an_input_is_refused_naming_the_node():
    model = if_model(helper.make_node("Identity", ["cin"], ["c"]))
    model.graph.input.append(tensor("cin", [], TensorProto.BOOL))
    with pytest.raises(NeedsConstantError, match="my_if.*condition"):
        from_onnx(model)


def loop_model(trip=3, cond_from_data=False):
    """y_final, scans = Loop(trip, true, y): y += x each iteration, scan output y * iteration."""
    body_nodes = [
        helper.make_node("Add", ["y_in", "x"], ["y_out"]),
        helper.make_node("Cast", ["i"], ["i_f"], to=F),
        helper.make_node("Mul", ["y_out", "i_f"], ["scan"]),
    ]
    if cond_from_data:
        body_nodes += [helper.make_node("ReduceSum", ["y_out"], ["s"], keepdims=0),
                       helper.make_node("Less", ["s", "ten"], ["c_out"])]
    else:
        body_nodes.append(helper.make_node("Identity", ["c_in"], ["c_out"]))
    body = helper.make_graph(body_nodes, "body",
                             [tensor("i", [], TensorProto.INT64), tensor("c_in", [], TensorProto.BOOL),
                              tensor("y_in", [2])],
                             [tensor("c_out", [], TensorProto.BOOL), tensor("y_out", [2]), tensor("scan", [2])])
    nodes = [const_node("trip", np.array(trip, np.int64)), const_node("true", np.array(True)),
             const_node("ten", np.array(10.0, np.float32)),
             helper.make_node("Loop", ["trip", "true", "y0"], ["y", "scans"], name="my_loop", body=body)]
    return make_model(nodes, [tensor("x", [2]), tensor("y0", [2])], [tensor("y", [2]), tensor("scans", [3, 2])])


def test_loop_with_trip_count_3_unrolls(tmp_path):
    rng = np.random.default_rng(0)
    check(loop_model(), {"x": rand(rng, 2), "y0": rand(rng, 2)}, tmp_path)


def test_loop_with_data_dependent_termination_is_refused_naming_the_node():
    with pytest.raises(UnsupportedError, match="my_loop.*depends on the input data"):
        from_onnx(loop_model(cond_from_data=True))


def test_scan_with_reversed_input_and_output_axis_1():
    body = helper.make_graph([helper.make_node("Add", ["s_in", "x_t"], ["s_out"]),
                              helper.make_node("Mul", ["s_out", "x_t"], ["o"])], "body",
                             [tensor("s_in", [3]), tensor("x_t", [3])], [tensor("s_out", [3]), tensor("o", [3])])
    node = helper.make_node("Scan", ["s0", "xs"], ["s", "os"], num_scan_inputs=1, body=body,
                            scan_input_directions=[1], scan_output_axes=[1])
    model = make_model([node], [tensor("s0", [3]), tensor("xs", [4, 3])], [tensor("s", [3]), tensor("os", [3, 4])])
    rng = np.random.default_rng(0)
    check(model, {"s0": rand(rng, 3), "xs": rand(rng, 4, 3)})


def test_sequence_round_trip(tmp_path):
    nodes = [
        const_node("split", np.array([1, 2], np.int64)),
        const_node("pos0", np.array(0, np.int64)),
        const_node("last", np.array(-1, np.int64)),
        helper.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=1),
        helper.make_node("SequenceInsert", ["seq", "y", "pos0"], ["seq2"]),
        helper.make_node("ConcatFromSequence", ["seq2"], ["cat"], axis=1),  # [2, 1+1+2]
        helper.make_node("SequenceAt", ["seq2", "last"], ["at"]),  # x[:, 1:3]
        helper.make_node("SequenceLength", ["seq2"], ["n"]),
        helper.make_node("Cast", ["n"], ["n_f"], to=F),
        helper.make_node("Mul", ["at", "n_f"], ["at_n"]),
        helper.make_node("SequenceEmpty", [], ["empty"], dtype=F),
        helper.make_node("SequenceInsert", ["empty", "y"], ["one"]),
        helper.make_node("SequenceInsert", ["one", "y"], ["two"]),
        helper.make_node("SequenceErase", ["two", "pos0"], ["one_again"]),
        helper.make_node("SequenceConstruct", ["y", "y"], ["pair"]),
        helper.make_node("SequenceInsert", ["pair", "y"], ["triple"]),
        helper.make_node("ConcatFromSequence", ["triple"], ["stacked"], axis=0, new_axis=1),  # [3, 2, 1]
        helper.make_node("SplitToSequence", ["x"], ["cols"], axis=1, keepdims=0),
        helper.make_node("ConcatFromSequence", ["cols"], ["xt"], axis=0, new_axis=1),  # x.T: [3, 2]
        helper.make_node("SequenceAt", ["one_again", "pos0"], ["y_back"]),
    ]
    outputs = [tensor("cat", [2, 4]), tensor("at_n", [2, 2]), tensor("stacked", [3, 2, 1]), tensor("xt", [3, 2]),
               tensor("y_back", [2, 1])]
    model = make_model(nodes, [tensor("x", [2, 3]), tensor("y", [2, 1])], outputs)
    rng = np.random.default_rng(0)
    feeds = {"x": rand(rng, 2, 3), "y": rand(rng, 2, 1)}
    check(model, feeds)
    # the compiled artifact needs each output computed by a kernel of its own: y_back is y itself
    model.graph.output.pop()
    check(model, feeds, tmp_path)


def test_sequence_output_is_refused():
    nodes = [helper.make_node("SequenceConstruct", ["x", "x"], ["s"])]
    model = make_model(nodes, [tensor("x", [2])], [helper.make_tensor_sequence_value_info("s", F, [2])])
    with pytest.raises(UnsupportedError, match="sequence"):
        from_onnx(model)


def test_opset6_add_with_broadcast_axis_1(tmp_path):
    rng = np.random.default_rng(0)
    b = rand(rng, 3)
    nodes = [helper.make_node("Add", ["x", "b"], ["y"], broadcast=1, axis=1),
             helper.make_node("Mul", ["y", "s"], ["z"], broadcast=1)]  # s matches the trailing dims
    inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.full((4, 5), 2.0, np.float32), "s")]
    model = make_model(nodes, [tensor("x", [2, 3, 4, 5])], [tensor("z", [2, 3, 4, 5])], inits, opset=6)
    x = rand(rng, 2, 3, 4, 5)
    check(model, {"x": x}, tmp_path, want=[(x + b.reshape(3, 1, 1)) * 2.0])


def test_opset6_sub_broadcast_axis_0_and_negative():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Sub", ["x", "b"], ["y"], broadcast=1, axis=0),
             helper.make_node("Div", ["y", "c"], ["z"], broadcast=1, axis=-2)]
    model = make_model(nodes, [tensor("x", [2, 3, 4]), tensor("b", [2, 3]), tensor("c", [3, 4])],
                       [tensor("z", [2, 3, 4])], opset=6)
    x, b, c = rand(rng, 2, 3, 4), rand(rng, 2, 3), rand(rng, 3, 4) + 3
    check(model, {"x": x, "b": b, "c": c}, want=[(x - b[:, :, None]) / c])


@pytest.mark.parametrize("op,inputs", [("NonZero", ["x"]), ("Unique", ["x"])])
def test_data_dependent_shapes_are_refused_naming_the_node(op, inputs):
    node = helper.make_node(op, inputs, ["y"], name="my_dd")
    model = make_model([node], [tensor("x", [4])], [tensor("y", [1, None])])
    with pytest.raises(UnsupportedError, match="my_dd.*depends on the input values"):
        from_onnx(model)


def test_nonzero_of_a_constant_folds():
    nodes = [const_node("c", np.array([[1, 0], [0, 3]], np.float32)), helper.make_node("NonZero", ["c"], ["nz"]),
             helper.make_node("Cast", ["nz"], ["nzf"], to=F), helper.make_node("Add", ["nzf", "x"], ["y"])]
    model = make_model(nodes, [tensor("x", [2, 2])], [tensor("y", [2, 2])])
    check(model, {"x": rand(np.random.default_rng(0), 2, 2)})


def test_unsupported_op_inside_a_branch_is_listed_up_front():
    then_g = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["t"])], "then", [], [tensor("t", [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [tensor("e", [2])])
    nodes = [const_node("c", np.array(False)),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [tensor("x", [2])], [tensor("y", [2])])
    with pytest.raises(UnsupportedError, match="NoSuchOp"):
        from_onnx(model)


def test_a_branch_waits_for_the_outer_values_it_reads(tmp_path):
    """The If below has no explicit input but its condition, so a topological sort over explicit inputs put it
    before the Neg whose output its branch reads ('reads b, which no node produces': ONNX's expanded AffineGrid
    and LinearAttention cases)."""
    then_g = helper.make_graph([helper.make_node("Relu", ["b"], ["t"])], "then", [], [tensor("t", [2, 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["b"], ["e"])], "else", [], [tensor("e", [2, 3])])
    nodes = [helper.make_node("Sigmoid", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])],
                       initializers=[numpy_helper.from_array(np.array(True), "c")])  # the If is ready at once
    check(model, {"x": rand(np.random.default_rng(1), 2, 3)}, tmp_path)
