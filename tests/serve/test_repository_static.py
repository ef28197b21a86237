"""A plain `kiln compile` output dropped into a version folder: one *.so of any name serves as a single batch-1
bucket when dim 0 of every tensor is 1, and at its exact shapes when the model has no batch dim."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from kiln.driver import compile as compile_model
from kiln.model_builders import GraphBuilder

from .conftest import SIZE, reference

OUT = "gemm0"


@pytest.fixture(scope="module")
def no_batch_dim(tmp_path_factory) -> Path:
    """y = relu(x) * 2 on x: f32[3, 5], compiled as it is: dim 0 is 3, not a batch."""
    g = GraphBuilder("no_batch", 0)
    y = g.op("Mul", [g.op("Relu", ["x"]), g.const(np.full((3, 5), 2, np.float32), "two")])
    model = g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])], [(y, TensorProto.FLOAT, [3, 5])])
    return compile_model(model, tmp_path_factory.mktemp("static") / "model.so").path


def _repo(root: Path, artifact: Path, name: str = "model.so", config: dict | None = None) -> Path:
    (root / "m" / "1").mkdir(parents=True)
    shutil.copy(artifact, root / "m" / "1" / name)
    if config is not None:
        (root / "m" / "config.json").write_text(json.dumps(config))
    return root


def test_a_batch_1_compile_output_serves_as_one_bucket(built, tmp_path, serve_repo):
    root = _repo(tmp_path, built / "tiny" / "1" / "model_b1.so", "squeezenet_b1.so")  # any name, dim 0 is 1
    url, _ = serve_repo(root)
    client = triton.InferenceServerClient(url)
    meta = client.get_model_metadata("m")
    assert meta["inputs"][0]["shape"] == [-1, 3, SIZE, SIZE]
    assert meta["parameters"] == {"max_batch_size": 1, "batch_buckets": [1]}
    x = np.random.default_rng(3).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    inp = triton.InferInput("data", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("m", [inp]).as_numpy(OUT), reference(built, 1, x), rtol=1e-5,
                               atol=1e-6)
    two = triton.InferInput("data", [2, 3, SIZE, SIZE], "FP32")
    two.set_data_from_numpy(np.concatenate([x, x]))
    with pytest.raises(InferenceServerException, match=r"batch size .* must be 1\.\.1"):
        client.infer("m", [two])


def test_a_model_without_a_batch_dim_serves_at_its_exact_shapes(no_batch_dim, tmp_path, serve_repo):
    root = _repo(tmp_path, no_batch_dim, config={"max_batch_size": 8})
    url, _ = serve_repo(root)
    client = triton.InferenceServerClient(url)
    meta = client.get_model_metadata("m")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [3, 5]}]
    assert meta["parameters"]["max_batch_size"] == 1
    x = np.random.default_rng(4).standard_normal((3, 5)).astype(np.float32)
    inp = triton.InferInput("x", [3, 5], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("m", [inp])
    out = result.as_numpy(meta["outputs"][0]["name"])
    assert out.shape == (3, 5)
    np.testing.assert_allclose(out, np.maximum(x, 0) * 2)
    wrong = triton.InferInput("x", [1, 3, 5], "FP32")
    wrong.set_data_from_numpy(x[None])
    with pytest.raises(InferenceServerException, match=r"expects FP32\[3, 5\] .*no batch dim"):
        client.infer("m", [wrong])


def test_two_plain_artifacts_in_one_version_are_refused_with_the_names(built, tmp_path, serve_repo):
    root = _repo(tmp_path, built / "tiny" / "1" / "model_b1.so", "a.so")
    shutil.copy(built / "tiny" / "1" / "model_b1.so", root / "m" / "1" / "b.so")
    url, _ = serve_repo(root)
    client = triton.InferenceServerClient(url)
    with pytest.raises(InferenceServerException, match=r"2 \.so files \['a\.so', 'b\.so'\]"):
        client.load_model("m")


def test_repo_add_max_batch_1_compiles_a_model_without_a_batch_dim_as_it_is(tmp_path, serve_repo):
    """`kiln repo add --max-batch 1` once set dim 0 to 1 whatever it was: [3, 5] became [1, 5]."""
    from kiln.repo_builder import add_version

    g = GraphBuilder("no_batch", 0)
    y = g.op("Relu", ["x"])
    model = g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])], [(y, TensorProto.FLOAT, [3, 5])])
    added = add_version(model, tmp_path, "m", max_batch=1)
    assert added.buckets == (1,)
    url, _ = serve_repo(tmp_path)
    meta = triton.InferenceServerClient(url).get_model_metadata("m")
    assert meta["inputs"][0]["shape"] == [3, 5] and meta["parameters"]["max_batch_size"] == 1
