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


def test_an_int8_version_shares_one_calibration_table_across_buckets(tmp_path):
    """Ranges do not depend on the batch: a table calibrated at batch 1 quantizes every bucket's build, each
    with its int8 kernels, each row the batch-1 build's answer."""
    import numpy as np

    import kiln
    from kiln.calibrate import calibrate
    from kiln.config import Options
    from tests.passes.test_quantize import residual_net

    model = residual_net()
    rng = np.random.default_rng(3)
    cal = calibrate(model, [[rng.standard_normal((1, 3, 12, 12)).astype(np.float32)] for _ in range(3)])
    for v in (model.graph.input[0], model.graph.output[0]):
        v.type.tensor_type.shape.dim[0].dim_param = "N"
    added = add_version(model, tmp_path, "net", max_batch=2, options=Options(precision="int8", calibration=cal.table))
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    one = kiln.load(added.path / "model_b1.so")
    two = kiln.load(added.path / "model_b2.so")
    assert any("qnn." in " ".join(s.get("ops", ())) for s in two.meta["steps"])
    rows = np.concatenate([one.run(x[i:i + 1])[0] for i in range(2)])
    np.testing.assert_allclose(two.run(x)[0], rows, rtol=1e-5, atol=1e-5)
