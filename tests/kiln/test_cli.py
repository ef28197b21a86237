"""The CLI as a user runs it: a subprocess, stdout for results, stderr and exit 1 for user errors."""

import json
import subprocess
import sys

import numpy as np
import onnx
from onnx import helper

from kiln.model_builders import GraphBuilder


def kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=300)


def _one_conv(path):
    g = GraphBuilder("one_conv")
    w = g.const(np.ones((8, 3, 3, 3), np.float32), "w")
    y = g.op("Conv", ["x", w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = g.model([helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
                    [(y, onnx.TensorProto.FLOAT, [1, 8, 16, 16])])
    onnx.save(model, path)


def test_inspect_json_counts_params_and_macs(tmp_path):
    _one_conv(tmp_path / "m.onnx")
    r = kiln("inspect", str(tmp_path / "m.onnx"), "--json")
    assert r.returncode == 0, r.stderr
    totals = json.loads(r.stdout)["totals"]
    assert totals["params"] == 8 * 3 * 3 * 3
    assert totals["macs"] == 8 * 16 * 16 * 3 * 3 * 3  # out channels × out pixels × (in channels × kernel)
    assert totals["activation_bytes"] == 8 * 16 * 16 * 4


def test_inspect_of_resnet50_matches_published_size():
    r = kiln("inspect", "zoo:resnet50", "--json")
    totals = json.loads(r.stdout)["totals"]
    assert abs(totals["params"] - 25.56e6) / 25.56e6 < 0.01  # ResNet-50 v1: 25.6 M parameters
    assert abs(totals["macs"] - 4.1e9) / 4.1e9 < 0.03  # and about 4.1 G multiply-adds


def test_inspect_table_and_input_shape(tmp_path):
    _one_conv(tmp_path / "m.onnx")
    r = kiln("inspect", str(tmp_path / "m.onnx"), "--input-shape", "x=1,3,16,16")
    assert r.returncode == 0 and "nn.conv2d" in r.stdout


def test_user_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    r = kiln("inspect", str(tmp_path / "bad.onnx"))
    assert r.returncode == 1
    assert "ModelError" in r.stderr and "Traceback" not in r.stderr
    r = kiln("inspect", str(tmp_path / "missing.onnx"))
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_bad_input_shape_flag_names_the_input(tmp_path):
    _one_conv(tmp_path / "m.onnx")
    r = kiln("inspect", str(tmp_path / "m.onnx"), "--input-shape", "nope=1,2")
    assert r.returncode == 1 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_conformance_for_one_op():
    r = kiln("conformance", "--op", "Relu", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["summary"]
    assert s["cases"] >= 1 and s["fail"] == 0


def test_compile_run_profile(tmp_path):
    from kiln.frontend import from_onnx
    from kiln.ir import run_module

    _one_conv(tmp_path / "m.onnx")
    so = tmp_path / "m.so"
    r = kiln("compile", str(tmp_path / "m.onnx"), "-o", str(so))
    assert r.returncode == 0, r.stderr
    assert "2 kernels" in r.stdout  # the conv (reading the 3-channel input as NCHW) into NCHW8c, back to NCHW
    again = kiln("compile", str(tmp_path / "m.onnx"), "-o", str(so))
    assert again.returncode == 1 and "--force" in again.stderr  # never overwrite without asking
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = kiln("run", str(so), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"))
    assert r.returncode == 0, r.stderr
    want = run_module(from_onnx(str(tmp_path / "m.onnx")), x)[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-4, atol=1e-5)
    r = kiln("profile", str(so), "--json", "--repeat", "3", "--trace", str(tmp_path / "trace.json"))
    assert r.returncode == 0, r.stderr
    prof = json.loads(r.stdout)
    assert [k["ops"] for k in prof["kernels"]] == [["nn.conv2d_nchwc"], ["layout_transform"]]
    # the entry stamps the clock between kernels: each kernel's time inside a run, bounded by the whole run
    seq = [k["in_sequence_ms"] for k in prof["kernels"]]
    assert all(t > 0 for t in seq) and sum(seq) <= prof["kernels_ms"] * 1.5
    assert abs(prof["overhead_ms"]) < prof["run_ms"]  # paired whole-run minus kernels-only differences
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"][0]["ph"] == "X"


def test_run_rejects_wrong_input_with_one_line(tmp_path):
    _one_conv(tmp_path / "m.onnx")
    so = tmp_path / "m.so"
    assert kiln("compile", str(tmp_path / "m.onnx"), "-o", str(so)).returncode == 0
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 8, 8), np.float32))
    r = kiln("run", str(so), "--input", str(tmp_path / "bad.npy"))
    assert r.returncode == 1 and "InputError" in r.stderr and "Traceback" not in r.stderr


def test_compile_explain_and_measure_report_each_conv(tmp_path):
    g = GraphBuilder("two_convs")
    w1 = g.const(np.random.default_rng(0).standard_normal((16, 16, 3, 3)).astype(np.float32), "w1")
    w2 = g.const(np.random.default_rng(1).standard_normal((16, 16, 1, 1)).astype(np.float32), "w2")
    y = g.op("Conv", ["x", w1], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    z = g.op("Conv", [y, w2], kernel_shape=[1, 1])
    model = g.model([helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, 20, 20])],
                    [(z, onnx.TensorProto.FLOAT, [1, 16, 20, 20])])
    onnx.save(model, tmp_path / "m.onnx")
    r = kiln("compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.so"), "--explain")
    assert r.returncode == 0, r.stderr
    assert "2 convs" in r.stdout and "winograd4" in r.stdout and "model" in r.stdout
    assert "2 layout transforms" in r.stdout  # in the summary line too, not only with --explain
    r = kiln("compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m2.so"), "--measure")
    assert r.returncode == 0, r.stderr
    assert "measured" in r.stdout and "[" in r.stdout  # measured times are shown next to the estimates


def test_calibrate_then_compile_int8_and_compile_from_samples(tmp_path):
    from tests.passes.test_quantize import residual_net

    onnx.save(residual_net(), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((4, 3, 12, 12)).astype(np.float32))
    table = tmp_path / "t.json"
    r = kiln("calibrate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "x.npy"), "-o", str(table))
    assert r.returncode == 0, r.stderr
    assert "6 activation ranges (percentile)" in r.stdout and json.loads(table.read_text())["samples"] == 4
    r = kiln("compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "a.so"), "--precision", "int8",
             "--calibration", str(table), "--target", "x86-avx512-vnni")
    assert r.returncode == 0, r.stderr
    assert "int8 kernels (VNNI): 4 convs, 1 matmuls" in r.stdout
    r = kiln("compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "b.so"), "--precision", "int8",
             "--calibration", str(tmp_path / "x.npy"), "--calibration-method", "entropy", "--target", "x86-avx2")
    assert r.returncode == 0, r.stderr
    assert "int8 against float32 on the 4 calibration samples" in r.stdout and "top-1 agrees on 4 of 4" in r.stdout
    r = kiln("compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "c.so"), "--precision", "int8")
    assert r.returncode == 1 and "--calibration" in r.stderr
    g = GraphBuilder("relu")  # nothing to quantize: said, not silent
    onnx.save(g.model([helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
                      [(g.op("Relu", ["x"]), onnx.TensorProto.FLOAT, [1, 8])]), tmp_path / "relu.onnx")
    np.save(tmp_path / "relu.npy", np.ones((2, 8), np.float32))
    r = kiln("compile", str(tmp_path / "relu.onnx"), "-o", str(tmp_path / "d.so"), "--precision", "int8",
             "--calibration", str(tmp_path / "relu.npy"))
    assert r.returncode == 0 and "no conv or matmul took an int8 kernel" in r.stderr, r.stderr


def test_tune_an_int8_build_of_a_model_with_a_symbolic_batch(tmp_path):
    """--input-shape binds the batch: the end-to-end A/B feeds the bound shape (it had fed the proto's 0), and
    --precision int8 tunes the int8 build's kernels (AVX2's, which any x86 host runs: a pinned preset)."""
    from tests.passes.test_quantize import residual_net

    model = residual_net()
    for v in (model.graph.input[0], model.graph.output[0]):
        v.type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((3, 3, 12, 12)).astype(np.float32))
    log = tmp_path / "t.jsonl"
    r = kiln("tune", str(tmp_path / "m.onnx"), "--input-shape", "data=1,3,12,12", "--precision", "int8",
             "--calibration", str(tmp_path / "x.npy"), "--trials", "2", "--batch", "2", "--log", str(log),
             "--task", "qdense", "--target", "x86-avx2")
    assert r.returncode == 0, r.stderr
    assert "whole model: default" in r.stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["template"] for r in records} == {"x86.qdense_packed@1"}
    assert all(r["workload"]["dims"].get("dot") == "madd" for r in records)
