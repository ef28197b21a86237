"""Check one ONNX node through Kiln (frontend + reference interpreter) against onnx's ReferenceEvaluator.

    check_node("Relu", {"x": rng.standard_normal((2, 3), dtype=np.float32)})
    check_node("Gemm", {"a": a, "b": b}, transB=1)
    check_node("Reshape", {"x": x}, constants={"shape": np.array([3, -1])})   # an initializer, not an input

Inputs become graph inputs; `constants` become initializers (what shapes, axes and pads usually are).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from onnx.reference import ReferenceEvaluator

from kiln.frontend import from_onnx
from kiln.ir import run_module

from .tolerances import assert_close


def make_node_model(op_type: str, inputs: dict[str, np.ndarray], constants: dict[str, np.ndarray] | None = None,
                    *, n_outputs: int = 1, opset: int | None = None, input_order: list[str] | None = None,
                    output_dtype: int = onnx.TensorProto.UNDEFINED, **attrs) -> onnx.ModelProto:
    constants = constants or {}
    names = input_order or [*inputs, *constants]
    outs = [f"out{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, names, outs, name=f"the_{op_type.lower()}", **attrs)
    graph = helper.make_graph(
        [node], f"{op_type}_test",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, output_dtype, None) for o in outs],
        [onnx.numpy_helper.from_array(v, k) for k, v in constants.items()],
    )
    opsets = [helper.make_opsetid("", opset or onnx.defs.onnx_opset_version())]
    return helper.make_model(graph, opset_imports=opsets)


def check_node(op_type: str, inputs: dict[str, np.ndarray], constants: dict[str, np.ndarray] | None = None,
               *, n_outputs: int = 1, opset: int | None = None, rtol=None, atol=None,
               input_order: list[str] | None = None, oracle: str = "reference", **attrs) -> list[np.ndarray]:
    """Run the node both ways and compare every output; returns Kiln's outputs.

    `oracle="onnxruntime"` compares with ONNX Runtime instead, where onnx's reference evaluator is known to be
    wrong (LRN at the channel edges, AveragePool's partial ceil-mode windows); outputs then take the first
    input's dtype.
    """
    if oracle == "onnxruntime":
        import onnxruntime as ort

        first = next(iter(inputs.values()))
        model = make_node_model(op_type, inputs, constants, n_outputs=n_outputs, opset=opset,
                                input_order=input_order, output_dtype=helper.np_dtype_to_tensor_dtype(first.dtype),
                                **attrs)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        want = sess.run(None, inputs)
    else:
        model = make_node_model(op_type, inputs, constants, n_outputs=n_outputs, opset=opset,
                                input_order=input_order, **attrs)
        want = ReferenceEvaluator(model).run(None, inputs)
    got = run_module(from_onnx(model), **inputs)
    assert len(got) == len(want), f"{op_type}: {len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, rtol=rtol, atol=atol, what=f"{op_type} {attrs} output {i}")
    return got
