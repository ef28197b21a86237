"""Shared by the recurrent and control-flow tests: run a model built in code through Kiln's interpreter and a
compiled artifact, and ONNX Runtime."""

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

import kiln
from kiln.frontend import from_onnx
from kiln.ir import run_module

from ..tolerances import assert_close


def ort_outputs(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def make_model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def tensor(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def check(model, feeds, tmp_path=None, want=None, rtol=1e-4, atol=1e-5):
    """Kiln's interpreter, and a compiled artifact when `tmp_path` is given, against `want` (default: ORT)."""
    want = ort_outputs(model, feeds) if want is None else want
    got = run_module(from_onnx(model), **feeds)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_close(g, w, rtol=rtol, atol=atol, what=f"interpreter output {i}")
    if tmp_path is not None:
        compiled = kiln.load(kiln.compile(model, tmp_path / "model.so").path).run(**feeds)
        for i, (g, w) in enumerate(zip(compiled, want, strict=True)):
            assert_close(g, w, rtol=rtol, atol=atol, what=f"compiled output {i}")


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)
