"""`kiln bench`'s comparison: both engines timed in alternating blocks, outputs compared."""

import onnx

from kiln import model_builders
from kiln.bench import ROUNDS, compare


def test_compare_alternates_engines_and_reports_the_spread(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(model_builders.small_cnn(0), path)
    r = compare(str(path), repeat=10, threads=2)
    assert r["match"] and r["max_abs_error"] < 1e-3
    assert r["kiln"]["runs"] == r["onnxruntime"]["runs"] == ROUNDS * 3  # at least 3 runs a block
    lo, hi = r["ratio_range"]
    assert 0 < lo <= hi
    assert r["kiln"]["median_ms"] > 0 and r["onnxruntime"]["median_ms"] > 0
