"""GridSample (image.grid_sample): every mode × padding × align_corners on a grid that reaches past the borders,
interpreted and compiled, against ONNX Runtime."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from .unrolled import check, make_model, tensor


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample_matches_onnxruntime(tmp_path, mode, padding, align):
    rng = np.random.default_rng(hash((mode, padding, align)) % 2**32)
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    grid = rng.uniform(-1.6, 1.6, (2, 4, 6, 2)).astype(np.float32)  # a third of the points outside [-1, 1]
    grid[0, 0, :3] = [[-1, -1], [1, 1], [0, 0]]  # the corners and the centre exactly
    node = helper.make_node("GridSample", ["x", "grid"], ["y"], mode=mode, padding_mode=padding, align_corners=align)
    model = make_model([node], [tensor("x", [2, 3, 5, 7]), tensor("grid", [2, 4, 6, 2])],
                       [tensor("y", [2, 3, 4, 6], TensorProto.FLOAT)], opset=20)
    # one case in three compiles, so the default run stays quick; the interpreter runs them all
    compiled = tmp_path if (mode, padding, align) in {("linear", "zeros", 0), ("cubic", "reflection", 1),
                                                        ("nearest", "border", 0), ("linear", "reflection", 0),
                                                        ("cubic", "zeros", 0), ("nearest", "reflection", 1)} else None
    check(model, {"x": x, "grid": grid}, compiled, rtol=1e-4, atol=1e-5)
