"""Computes that failed to build for some dtypes although the interpreter ran them: sinh/cosh (no LLVM intrinsic
on x86), integer Div of every width (topi.div rejected int8), integer Pow (power took floats only), ReduceMax and
ReduceMin over bool (TVM has no bool min/max value). Each single-op model against ONNX Runtime."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.config import Options


def _model(op, inputs, out_dtype, **attrs):
    ins = [helper.make_tensor_value_info(f"x{i}", helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
           for i, a in enumerate(inputs)]
    node = helper.make_node(op, [f"x{i}" for i in range(len(inputs))], ["y"], **attrs)
    graph = helper.make_graph([node], op, ins, [helper.make_tensor_value_info("y", out_dtype, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


rng = np.random.default_rng(0)
CASES = {
    "sinh": ("Sinh", [np.array([-90.0, -1.5, -1e-4, 0.0, 0.3, 0.5, 2.0, 89.0, np.nan], np.float32)],
             TensorProto.FLOAT, {}),
    "cosh": ("Cosh", [np.array([-90.0, -1.5, -1e-4, 0.0, 0.3, 0.5, 2.0, 89.0, np.nan], np.float32)],
             TensorProto.FLOAT, {}),
    "div_int8": ("Div", [np.array([[-7, 7, -128, 100, 5]], np.int8), np.array([[2, -2, 3, 7, -5]], np.int8)],
                 TensorProto.INT8, {}),
    "div_uint16": ("Div", [np.array([7, 65535, 9], np.uint16), np.array([2, 3, 10], np.uint16)], TensorProto.UINT16,
                   {}),
    "pow_int64": ("Pow", [np.array([2, -3, 5, 0, 7], np.int64), np.array([3, 3, 0, 2, 10], np.int64)],
                  TensorProto.INT64, {}),
    "reduce_max_bool": ("ReduceMax", [rng.random((3, 4, 5)) > 0.8], TensorProto.BOOL, {"keepdims": 0}),
    "reduce_min_bool": ("ReduceMin", [rng.random((3, 4, 5)) > 0.2], TensorProto.BOOL, {"keepdims": 1}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiles_and_matches_onnxruntime(name, tmp_path):
    op, inputs, out_dtype, attrs = CASES[name]
    model = _model(op, inputs, out_dtype, **attrs)
    m = kiln.load(kiln.compile(model, tmp_path / "m.so", Options(target="x86-avx2")).path)
    got = m.run(*inputs)[0]
    if name.endswith("_bool"):  # ONNX Runtime has no bool ReduceMax/Min kernel: NumPy's any/all
        want = (np.max if op == "ReduceMax" else np.min)(inputs[0], keepdims=bool(attrs["keepdims"]))
    else:
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {f"x{i}": a for i, a in enumerate(inputs)})[0]
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0, equal_nan=True)
