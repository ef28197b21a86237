"""Compiled TopK (issue 12: every op the interpreter runs also compiles). A kernel has one tensor output, so
simplify_inference turns topk's items into `topk_indices` and a gather_elements of the input at those indices.
The indices compute is checked against the reference on prime shapes, every axis, largest and smallest, ties
(the lower index first, as ONNX asks) and NaN; a model with both outputs is compared with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from kiln.ir.ops import transform as tf

tvm = pytest.importorskip("tvm")


@pytest.fixture(scope="module")
def target():
    from kiln.codegen.target import resolve_target

    return resolve_target("x86-avx2")


def compile_indices(x, attrs, target):
    from tests.groups import lower, op_group, run_lowered

    return run_lowered(lower(op_group(tf.TOPK_INDICES, [x], attrs), target), target, [x])


def check(x, attrs, target):
    got = compile_indices(x, attrs, target)
    want = tf.TOPK.reference(x, attrs)[1]
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want, err_msg=str(attrs))


RNG = np.random.default_rng(12)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("largest", [True, False])
def test_indices_match_reference(axis, largest, target):
    x = RNG.standard_normal((5, 7, 11)).astype(np.float32)
    check(x, tf.TopKAttrs(k=3, axis=axis, largest=largest), target)
    check(x, tf.TopKAttrs(k=x.shape[axis], axis=axis, largest=largest), target)  # a full sort


@pytest.mark.parametrize("largest", [True, False])
def test_ties_take_the_lower_index_and_nan_comes_last(largest, target):
    x = RNG.integers(-2, 3, (3, 13)).astype(np.float32)  # many ties
    x[0, [2, 5]] = np.nan
    x[1, [0, 12]] = np.nan
    x[2, :] = np.nan
    x[2, 7] = -0.0
    check(x, tf.TopKAttrs(k=13, axis=1, largest=largest), target)
    check(x, tf.TopKAttrs(k=4, axis=1, largest=largest), target)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integers(dtype, target):
    x = RNG.integers(-5, 5, (4, 17)).astype(dtype)
    x[0, 0] = np.iinfo(dtype).min
    x[1, 3] = np.iinfo(dtype).max
    for largest in (True, False):
        check(x, tf.TopKAttrs(k=5, axis=1, largest=largest), target)


def _model(k: int, axis: int, largest: int, shape):
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=axis, largest=largest, sorted=1)
    out_shape = list(shape)
    out_shape[axis] = k
    graph = helper.make_graph(
        [node], "topk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, out_shape),
         helper.make_tensor_value_info("indices", TensorProto.INT64, out_shape)],
        [helper.make_tensor("k", TensorProto.INT64, [1], [k])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("k,axis,largest", [(3, 1, 1), (4, 0, 0), (7, 1, 0)])
def test_model_matches_onnxruntime(k, axis, largest, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import kiln
    from kiln.config import Options

    x = RNG.standard_normal((5, 7)).astype(np.float32)
    x[1, 2] = x[1, 5]  # a tie
    model = _model(k, axis, largest, x.shape)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = kiln.load(kiln.compile(model, tmp_path / "m.so", Options(target="x86-avx2")).path).run(x=x)
    np.testing.assert_array_equal(np.asarray(got[0]), want[0])
    np.testing.assert_array_equal(np.asarray(got[1]), want[1])
