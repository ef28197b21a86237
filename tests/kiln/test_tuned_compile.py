"""Configs flow into compile (issue 11): a tuning record, a log folder or a mapping passed in changes the kernel
it names, and only that kernel; a config that moves a conv to another algorithm re-lays the graph for it; a
config outside its space falls back to the default with a warning; `kiln tasks` lists what compile builds."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from kiln.autotune.records import Record, RecordWriter, read_records
from kiln.codegen.target import PRESETS, resolve_target
from onnx import helper

import kiln
from kiln import driver
from kiln.config import Options
from kiln.model_builders import GraphBuilder

from tests.host import runs

TARGET = "x86-avx512"


@pytest.fixture(scope="module")
def two_convs(tmp_path_factory):
    g = GraphBuilder("two_convs")
    w1 = g.const(np.random.default_rng(0).standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.2, "w1")
    w2 = g.const(np.random.default_rng(1).standard_normal((32, 16, 1, 1)).astype(np.float32) * 0.2, "w2")
    y = g.op("Relu", [g.op("Conv", ["x", w1], kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    z = g.op("Conv", [y, w2], kernel_shape=[1, 1])
    model = g.model([helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, 20, 20])],
                    [(z, onnx.TensorProto.FLOAT, [1, 32, 20, 20])])
    path = tmp_path_factory.mktemp("m") / "m.onnx"
    onnx.save(model, path)
    return path


def _conv_tasks(path):
    tasks = driver.model_tasks(path, Options(target=TARGET))
    return [t for t in tasks if t.template.name == "x86.conv2d_nchwc"]


def _compile(path, out, **kw):
    report = kiln.compile(path, out, Options(target=TARGET, **kw))
    x = np.random.default_rng(2).standard_normal((1, 16, 20, 20)).astype(np.float32)
    return report, kiln.load(report.path).run(x)[0]


@runs(TARGET)
def test_a_record_moves_a_conv_to_another_algorithm(two_convs, tmp_path):
    conv3 = next(t for t in _conv_tasks(two_convs) if t.workload["kh"] == 3)
    default = conv3.default()["algorithm"]
    algorithms = {c["algorithm"] for c in conv3.space()}
    assert algorithms == {"direct", "im2col", "winograd2", "winograd4"}
    other = "winograd4" if default == "direct" else "direct"
    best = next(c for c in conv3.space() if c["algorithm"] == other and c != conv3.default())
    log = tmp_path / "logs" / "m.jsonl"
    with RecordWriter(log) as w:
        w.write(Record.measured(conv3.template, conv3.workload, resolve_target(TARGET), best, [1e-4]))
        worse = conv3.space().neighbors(best)[0]
        w.write(Record.measured(conv3.template, conv3.workload, resolve_target(TARGET), worse, [2e-4]))
    base, want = _compile(two_convs, tmp_path / "a.so")
    tuned, got = _compile(two_convs, tmp_path / "b.so", tuning_logs=(tmp_path / "logs",))
    step = next(s for s in tuned.steps if s["workload"] == conv3.key)
    assert step["config_source"] == "given" and step["config"] == best
    assert ("winograd" in step["schedule"]) == (other == "winograd4")
    assert any(("winograd" in s["schedule"]) == (default == "winograd4") for s in base.steps)
    others = [(s["workload"], s["schedule"]) for s in tuned.steps if s["workload"] != conv3.key]
    assert others == [(s["workload"], s["schedule"]) for s in base.steps if s["workload"] != conv3.key]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@runs(TARGET)
def test_a_config_mapping_sets_knobs_and_a_config_outside_the_space_is_refused(two_convs, tmp_path, caplog):
    conv1 = next(t for t in _conv_tasks(two_convs) if t.workload["kh"] == 1)
    space = conv1.space()
    cfg = next(c for c in space if c != conv1.default())
    report, _ = _compile(two_convs, tmp_path / "a.so", configs={conv1.key: cfg})
    step = next(s for s in report.steps if s["workload"] == conv1.key)
    assert step["config"] == cfg and step["config_source"] == "given"
    bad = {**cfg, "tile_ow": 999}
    report, _ = _compile(two_convs, tmp_path / "b.so", configs={conv1.key: bad})
    step = next(s for s in report.steps if s["workload"] == conv1.key)
    assert step["config"] == conv1.default() and step["config_source"].startswith("default")
    assert any("not in its space" in r.message for r in caplog.records)


def test_shipped_logs_apply_only_to_their_cpu(two_convs, tmp_path, monkeypatch):
    conv1 = next(t for t in _conv_tasks(two_convs) if t.workload["kh"] == 1)
    cfg = next(c for c in conv1.space() if c != conv1.default())
    for cpu in ("skylake-avx512", "znver3"):  # x86-avx512 is LLVM's skylake-avx512
        with RecordWriter(tmp_path / "shipped" / cpu / "m.jsonl") as w:
            w.write(Record.measured(conv1.template, conv1.workload, resolve_target(TARGET), cfg, [1e-4]))
    monkeypatch.setattr(driver, "SHIPPED_LOGS", tmp_path / "shipped")
    assert driver.tuned_configs(Options(target=TARGET), resolve_target(TARGET)) == {conv1.key: cfg}
    assert driver.tuned_configs(Options(target="x86-avx2"), resolve_target("x86-avx2")) == {}
    assert len(read_records(tmp_path / "shipped" / "skylake-avx512", resolve_target(TARGET))) == 1


def test_shipped_logs_apply_only_at_their_core_count(two_convs, tmp_path, monkeypatch, caplog):
    """A config's parallel split was measured at the log's core count (4 tasks keep 2 cores busy, not 32)."""
    import logging

    conv1 = next(t for t in _conv_tasks(two_convs) if t.workload["kh"] == 1)
    cfg = next(c for c in conv1.space() if c != conv1.default())
    two = {**PRESETS[TARGET], "num-cores": 2}
    with RecordWriter(tmp_path / "shipped" / "skylake-avx512" / "m.jsonl") as w:
        w.write(Record.measured(conv1.template, conv1.workload, resolve_target(two), cfg, [1e-4]))
    monkeypatch.setattr(driver, "SHIPPED_LOGS", tmp_path / "shipped")
    assert driver.tuned_configs(Options(), resolve_target(two)) == {conv1.key: cfg}
    with caplog.at_level(logging.INFO, logger="kiln.driver"):
        assert driver.tuned_configs(Options(), resolve_target({**two, "num-cores": 16})) == {}
    assert any("measured on 2 cores, this target has 16" in r.message for r in caplog.records)
    # a log the user names still applies: they chose it
    assert driver.tuned_configs(Options(tuning_logs=(tmp_path / "shipped",)), resolve_target(
        {**two, "num-cores": 16})) == {conv1.key: cfg}


def test_kiln_tasks_lists_what_compile_builds(two_convs, tmp_path):
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "tasks", str(two_convs), "--target", TARGET, "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    report = kiln.compile(two_convs, tmp_path / "m.so", Options(target=TARGET))
    assert sum(row["kernels"] for row in rows) == report.kernels
    assert {row["key"] for row in rows} == {s["workload"] for s in report.steps}
    for row in rows:
        assert row["space_size"] >= 1 and row["default"] == next(
            s["config"] for s in report.steps if s["workload"] == row["key"])
    conv = next(row for row in rows if row["template"].startswith("x86.conv2d_nchwc"))
    assert conv["flops"] > 0 and conv["weight_bytes"] > 0 and "algorithm" in conv["knobs"]


@pytest.mark.parametrize("folder", sorted(p.name for p in driver.SHIPPED_LOGS.iterdir() if p.is_dir()
                                          and not p.name.startswith("_")))
def test_every_shipped_record_still_applies_on_its_cpu(folder):
    """A template whose version or knob space changes makes its shipped records stale, and `kiln compile`
    would then skip them with a warning and build the defaults: each shipped log must read whole on the
    target it was measured for, with every model's end-to-end decision in it."""
    skipped = []
    files = sorted((driver.SHIPPED_LOGS / folder).glob("*.jsonl"))
    assert files
    for path in files:
        rows = [json.loads(t) for t in path.read_text().splitlines() if t.strip()]
        assert rows[0]["target"]["mcpu"] == folder
        kept = read_records(path, rows[0]["target"], on_skip=lambda p, line, why: skipped.append((p.name, line, why)))
        assert len(kept) == len(rows), (path.name, skipped[:3])
        assert any(row.get("end_to_end") for row in rows), path.name
    assert not skipped
