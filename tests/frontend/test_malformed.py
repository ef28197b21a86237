"""Broken and unusual models: each broken one raises a KilnError naming the node or field; each unusual but
valid one imports and runs."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.errors import InputError, KilnError, ModelError, TypeCheckError, UnsupportedError
from kiln.frontend import from_onnx
from kiln.ir import run_module

from ..tolerances import assert_close

F = TensorProto.FLOAT


def model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def tensor(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def relu_model():
    return model([helper.make_node("Relu", ["x"], ["y"], name="relu1")], [tensor("x", [2, 3])], [tensor("y", [2, 3])])


def test_truncated_protobuf(tmp_path):
    data = relu_model().SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cannot parse"):
        from_onnx(path)


def test_not_a_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        from_onnx(tmp_path / "nope.onnx")


def test_missing_initializer_names_the_node():
    m = model([helper.make_node("Add", ["x", "bias"], ["y"], name="add_bias")], [tensor("x", [3])], [tensor("y", [3])])
    with pytest.raises(ModelError, match=r"node 'add_bias' \(Add\) reads 'bias'"):
        from_onnx(m)


def test_cycle_is_reported_with_its_nodes():
    m = model([helper.make_node("Add", ["x", "b"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["b"], name="n2")],
              [tensor("x", [3])], [tensor("b", [3])])
    with pytest.raises(ModelError, match=r"cycle through nodes \['n1', 'n2'\]"):
        from_onnx(m)


def test_attribute_of_the_wrong_type():
    node = helper.make_node("Softmax", ["x"], ["y"], name="sm", axis=1.5)
    with pytest.raises(ModelError, match=r"node 'sm' \(Softmax\): attribute 'axis' must be INT, got FLOAT"):
        from_onnx(model([node], [tensor("x", [2, 3])], [tensor("y", [2, 3])]))


def test_all_unknown_ops_in_one_error():
    nodes = [helper.make_node("FancyOp", ["x"], ["a"], name="fancy1"), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("FancyOp", ["b"], ["c"], name="fancy2"), helper.make_node("Weird", ["c"], ["y"], name="w")]
    with pytest.raises(UnsupportedError) as info:
        from_onnx(model(nodes, [tensor("x", [3])], [tensor("y", [3])]))
    text = str(info.value)
    assert "2 unsupported op type(s)" in text
    assert "FancyOp (first at node 'fancy1', opset 17)" in text and "Weird (first at node 'w', opset 17)" in text
    assert "fancy2" not in text


def test_shapes_that_do_not_broadcast():
    m = model([helper.make_node("Add", ["x", "z"], ["y"], name="bad_add")], [tensor("x", [2, 3]), tensor("z", [4])],
              [tensor("y", None)])
    with pytest.raises(TypeCheckError, match=r"node 'bad_add' \(add\).*do not broadcast"):
        from_onnx(m)


def test_conv_channel_mismatch_names_the_node():
    w = numpy_helper.from_array(np.ones((4, 5, 3, 3), np.float32), "w")
    m = model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv7")], [tensor("x", [1, 3, 8, 8])],
              [tensor("y", None)], [w])
    with pytest.raises(TypeCheckError, match=r"node 'conv7' \(nn.conv2d\).*3 channels"):
        from_onnx(m)


def test_missing_external_data(tmp_path):
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    m = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", [1, 64])], [tensor("y", [1, 64])], [w])
    onnx.save(m, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
              size_threshold=0)
    (tmp_path / "w.bin").unlink()
    with pytest.raises(ModelError):
        from_onnx(tmp_path / "m.onnx")


def test_newer_opset_than_onnx_knows():
    m = relu_model()
    m.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    with pytest.raises(UnsupportedError, match="newer than the installed onnx"):
        from_onnx(m)


def test_wrong_inputs_at_run_time():
    mod = from_onnx(relu_model())
    with pytest.raises(InputError, match=r"input 'x' expects f32\[2, 3\], got float64"):
        run_module(mod, np.zeros((2, 3)))
    with pytest.raises(InputError, match=r"got shape \[3, 2\]"):
        run_module(mod, np.zeros((3, 2), np.float32))
    with pytest.raises(InputError, match="missing"):
        run_module(mod)
    with pytest.raises(InputError, match="unexpected"):
        run_module(mod, x=np.zeros((2, 3), np.float32), extra=np.zeros(1))


def test_every_error_is_a_kiln_error():
    assert all(issubclass(e, KilnError) for e in (ModelError, UnsupportedError, TypeCheckError, InputError))


# --- unusual but valid ---------------------------------------------------------------------------------------

def test_initializers_listed_as_inputs_are_constants():
    w = numpy_helper.from_array(np.full((3,), 2.0, np.float32), "w")
    m = model([helper.make_node("Mul", ["x", "w"], ["y"])], [tensor("x", [3]), tensor("w", [3])], [tensor("y", [3])],
              [w])
    mod = from_onnx(m)
    assert [p.name for p in mod.main.params] == ["x"]
    assert_close(run_module(mod, np.ones(3, np.float32))[0], np.full(3, 2.0, np.float32))


def test_unsorted_nodes_are_sorted():
    nodes = [helper.make_node("Relu", ["a"], ["y"]), helper.make_node("Neg", ["x"], ["a"])]
    mod = from_onnx(model(nodes, [tensor("x", [3])], [tensor("y", [3])]))
    assert_close(run_module(mod, np.array([-1, 2, -3], np.float32))[0], np.array([1, 0, 3], np.float32))


def test_external_data_model_imports(tmp_path):
    rng = np.random.default_rng(0)
    wv = rng.standard_normal((64, 32)).astype(np.float32)
    m = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", [2, 64])], [tensor("y", [2, 32])],
              [numpy_helper.from_array(wv, "w")])
    onnx.save(m, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    assert_close(run_module(from_onnx(tmp_path / "m.onnx"), x)[0], x @ wv)


def test_symbolic_dims_bound_at_import_and_checked():
    m = model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["batch", 3])], [tensor("y", ["batch", 3])])
    assert from_onnx(m).main.params[0].type.shape == ("batch", 3)
    assert from_onnx(m, input_shapes={"x": (4, 3)}).main.params[0].type.shape == (4, 3)
    with pytest.raises(KilnError, match="dim 3 is fixed"):
        from_onnx(m, input_shapes={"x": (4, 5)})
    with pytest.raises(KilnError, match="model's inputs are"):
        from_onnx(m, input_shapes={"nope": (4, 3)})


def test_shape_computed_from_a_graph_input_asks_for_binding():
    from kiln.errors import NeedsConstantError

    m = model([helper.make_node("Reshape", ["x", "s"], ["y"], name="r")],
              [tensor("x", [2, 3]), tensor("s", [2], TensorProto.INT64)], [tensor("y", None)])
    with pytest.raises(NeedsConstantError, match=r"node 'r' \(Reshape\): the target shape") as info:
        from_onnx(m)
    assert info.value.inputs == ["s"]
    mod = from_onnx(m, bind={"s": np.array([3, 2])})
    assert mod.main.body.type.shape == (3, 2)
