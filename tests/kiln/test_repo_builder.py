"""`kiln repo add`: buckets, version numbering, and the errors for models that cannot be batched."""

from __future__ import annotations

import json

import pytest
from onnx import TensorProto, helper

from kiln.errors import KilnError
from kiln.model_builders import GraphBuilder
from kiln.repo_builder import add_version, default_buckets


def _relu_model(batch_dim):
    g = GraphBuilder("relu")
    y = g.op("Relu", ["x"])
    return g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 4])],
                   [(y, TensorProto.FLOAT, [batch_dim, 4])])


def test_default_buckets_are_powers_of_two_and_the_maximum():
    assert default_buckets(1) == (1,)
    assert default_buckets(8) == (1, 2, 4, 8)
    assert default_buckets(6) == (1, 2, 4, 6)


def test_versions_count_up_and_config_is_written_once(tmp_path):
    first = add_version(_relu_model("N"), tmp_path, "relu", max_batch=2)
    second = add_version(_relu_model("N"), tmp_path, "relu", max_batch=2)
    assert (first.version, second.version) == (1, 2)
    assert sorted(p.name for p in second.path.iterdir()) == ["model_b1.so", "model_b2.so"]
    assert json.loads((tmp_path / "relu" / "config.json").read_text())["max_batch_size"] == 2
    assert not [p for p in (tmp_path / "relu").iterdir() if p.name.startswith(".")]  # no leftovers
    with pytest.raises(KilnError, match="versions are immutable"):
        add_version(_relu_model("N"), tmp_path, "relu", version=1, max_batch=2)


def test_a_fixed_batch_dim_is_refused_before_compiling(tmp_path):
    with pytest.raises(KilnError, match="fixes its batch dim to 1"):
        add_version(_relu_model(1), tmp_path, "relu", max_batch=4)
    assert not (tmp_path / "relu").exists()
