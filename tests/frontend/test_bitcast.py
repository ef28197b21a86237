"""BitCast (opset 26): the same bits read as another same-size type, NaN payloads and half types included,
interpreted and compiled, against NumPy's view."""

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.errors import KilnError
from kiln.frontend import from_onnx
from kiln.ir import run_module

from .unrolled import make_model, tensor

CASES = [(np.float32, TensorProto.FLOAT, np.int32, TensorProto.INT32),
         (np.float16, TensorProto.FLOAT16, np.uint16, TensorProto.UINT16),
         (ml_dtypes.bfloat16, TensorProto.BFLOAT16, np.int16, TensorProto.INT16),
         (np.uint8, TensorProto.UINT8, np.int8, TensorProto.INT8),
         (np.int16, TensorProto.INT16, ml_dtypes.bfloat16, TensorProto.BFLOAT16),
         (np.uint16, TensorProto.UINT16, np.float16, TensorProto.FLOAT16)]


@pytest.mark.parametrize("src,src_t,dst,dst_t", CASES)
def test_bitcast_keeps_the_bits(tmp_path, src, src_t, dst, dst_t):
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 256, 3 * 5 * np.dtype(src).itemsize, dtype=np.uint8)
    x = bits.view(src).reshape(3, 5)
    if np.dtype(src).kind == "f" or src is ml_dtypes.bfloat16:
        x.flat[0], x.flat[1] = np.inf, -0.0
    model = make_model([helper.make_node("BitCast", ["x"], ["y"], to=dst_t)], [tensor("x", [3, 5], src_t)],
                       [tensor("y", [3, 5], dst_t)], opset=26)
    model.ir_version = 12
    want = x.view(dst)
    for got in (run_module(from_onnx(model), x=x)[0], kiln.load(kiln.compile(model, tmp_path / "m.so").path).run(x)[0]):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))  # the bits, NaN payloads too


def test_bitcast_between_sizes_is_refused_by_name():
    model = make_model([helper.make_node("BitCast", ["x"], ["y"], to=TensorProto.INT64, name="widen")],
                       [tensor("x", [4])], [tensor("y", [4], TensorProto.INT64)], opset=26)
    model.ir_version = 12
    with pytest.raises(KilnError, match="widen|differ in size"):
        from_onnx(model)
