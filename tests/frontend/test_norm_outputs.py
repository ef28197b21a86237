"""LayerNormalization's optional Mean and InvStdDev outputs, beside Y: interpreted and compiled, against ONNX
Runtime."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from .unrolled import check, make_model, tensor


@pytest.mark.parametrize("axis", [-1, 1])
def test_layer_norm_mean_and_inv_std_dev(tmp_path, axis):
    shape = (2, 5, 12)
    rng = np.random.default_rng(0)
    kept = [d if i < axis % 3 else 1 for i, d in enumerate(shape)]
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, shape[axis % 3:]).astype(np.float32), "g"),
             numpy_helper.from_array(rng.uniform(-0.5, 0.5, shape[axis % 3:]).astype(np.float32), "b")]
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y", "mean", "inv"], axis=axis, epsilon=1e-3)
    model = make_model([node], [tensor("x", list(shape))],
                       [tensor("y", list(shape)), tensor("mean", kept, TensorProto.FLOAT),
                        tensor("inv", kept, TensorProto.FLOAT)], inits, opset=17)
    check(model, {"x": (rng.standard_normal(shape) * 3 + 1).astype(np.float32)}, tmp_path)
