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


def test_int8_compare_calibrates_on_seeded_inputs_and_reports_sqnr(tmp_path, monkeypatch):
    import kiln.bench
    from tests.passes.test_quantize import residual_net

    monkeypatch.setattr(kiln.bench, "PAUSE_S", 0.0)
    path = tmp_path / "net.onnx"
    onnx.save(residual_net(), path)
    r = compare(str(path), repeat=3, precision="int8")  # native: int8 kernels where the host has VNNI
    assert r["calibrated_on"] == "4 seeded random inputs" and r["precision"] == "int8"
    assert r["sqnr_db"] > 25  # about 40 dB on this net
