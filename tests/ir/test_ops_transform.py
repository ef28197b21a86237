"""Shape and tensor ops against onnx's ReferenceEvaluator; index arithmetic swept with hypothesis."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.frontend import from_onnx
from kiln.ir.visitor import calls
from kiln.model_builders import GraphBuilder

from ..onnx_check import check_node

X = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)


@settings(max_examples=40, deadline=None)
@given(starts=st.lists(st.integers(-7, 7), min_size=4, max_size=4), ends=st.lists(st.integers(-7, 7), min_size=4,
       max_size=4), steps=st.lists(st.sampled_from([-2, -1, 1, 2, 3]), min_size=4, max_size=4))
def test_slice_index_arithmetic(starts, ends, steps):
    check_node("Slice", {"x": X}, {"starts": np.array(starts), "ends": np.array(ends),
                                   "axes": np.arange(4), "steps": np.array(steps)})


@settings(max_examples=30, deadline=None)
@given(perm=st.permutations([0, 1, 2, 3]))
def test_transpose(perm):
    check_node("Transpose", {"x": X}, perm=list(perm))


@pytest.mark.parametrize("shape", [[6, -1], [0, 0, -1], [-1], [2, 3, 20], [0, 12, 5]])
def test_reshape_zero_and_minus_one(shape):
    check_node("Reshape", {"x": X}, {"shape": np.array(shape)})


@pytest.mark.parametrize("axis", [0, 2, -1])
def test_gather_negative_indices(axis):
    check_node("Gather", {"x": X}, {"i": np.array([[0, -1], [1, -2]])}, axis=axis)


def test_split_concat_squeeze_unsqueeze_expand_tile_pad():
    check_node("Split", {"x": X}, {"s": np.array([1, 3, 1])}, axis=3, n_outputs=3)
    check_node("Concat", {"a": X, "b": X[:, :1]}, axis=1)
    check_node("Unsqueeze", {"x": X}, {"axes": np.array([0, -1])})
    check_node("Squeeze", {"x": X[:, :1]}, {"axes": np.array([1])})
    check_node("Expand", {"x": X[:, :1, :1]}, {"shape": np.array([3, 1, 4, 1, 5])})
    check_node("Tile", {"x": X[0, 0]}, {"r": np.array([2, 3])})
    for mode in ("constant", "reflect", "edge", "wrap"):
        check_node("Pad", {"x": X}, {"pads": np.array([0, 1, 2, 1, 0, 2, 1, 0])}, mode=mode)


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceL2", "ReduceLogSumExp"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reductions(op, keepdims):
    check_node(op, {"x": X / 100}, {"axes": np.array([1, -1])}, keepdims=keepdims, rtol=1e-5, atol=1e-6)


def test_argmax_topk_cumsum_onehot():
    x = np.random.default_rng(0).permutation(60).reshape(3, 4, 5).astype(np.float32)
    check_node("ArgMax", {"x": x}, axis=1, keepdims=0)
    check_node("TopK", {"x": x}, {"k": np.array([2])}, axis=-1, n_outputs=2)
    check_node("CumSum", {"x": x}, {"axis": np.array(1)}, exclusive=1, reverse=1)
    check_node("OneHot", {"i": np.array([0, 2, -1])}, {"depth": np.array(4), "v": np.array([0.0, 1.0], np.float32)},
               axis=0)


def test_shape_subgraph_folds_into_one_reshape():
    g = GraphBuilder("shape_chain")
    shape = g.op("Shape", ["x"])
    batch = g.op("Gather", [shape, g.const(np.array([0]))], axis=0)
    target = g.op("Concat", [batch, g.const(np.array([-1]))], axis=0)
    y = g.op("Reshape", ["x", target])
    import onnx
    from onnx import helper

    m = g.model([helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4])],
                [(y, onnx.TensorProto.FLOAT, [2, 12])])
    mod = from_onnx(m)
    assert [c.op_name for c in calls(mod.main.body)] == ["reshape"]
    assert mod.main.body.attrs.newshape == (2, 12)
