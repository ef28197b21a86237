"""bench/config_ab.py puts a named config to a whole-model A/B against the log's build and records a win as an
end-to-end decision: the record must be one `kiln compile` applies, and a key or config that does not fit the
model must be refused by name."""

from __future__ import annotations

import json

import onnx
import pytest

import kiln
import kiln.tuning
from kiln.autotune.records import best_configs, read_records
from kiln.config import Options
from kiln.driver import model_tasks
from kiln.errors import KilnError
from tests.autotune.test_context import three_convs
from tests.bench_scripts import load_bench


@pytest.fixture(scope="module")
def config_ab():
    return load_bench("config_ab")


def test_a_win_is_recorded_as_a_decision_that_compile_applies(config_ab, tmp_path, monkeypatch):
    path = tmp_path / "three_convs.onnx"
    onnx.save(three_convs(), path)
    log = tmp_path / "log.jsonl"
    log.write_text("")
    conv3 = next(t for t in model_tasks(three_convs(), Options(shipped_logs=False)) if t.count == 2)
    config = next(c for c in conv3.space() if c != conv3.default())
    part = conv3.key.split(":")[1]
    with pytest.raises(KilnError, match="not in"):
        config_ab.main([str(path), "--log", str(log), "--set", f"{part}={json.dumps({'tile_ow': 999})}"])
    with pytest.raises(KilnError, match="expected one"):
        config_ab.main([str(path), "--log", str(log), "--set", "nothing-like-it={}"])
    # the timing decides nothing here: the rule is kiln tune's, tested on its own (test_context.py)
    monkeypatch.setattr(kiln.tuning, "keep_tuned", lambda before, after, rounds: ("tuned", rounds))
    assert config_ab.main([str(path), "--log", str(log), "--set", f"{part}={json.dumps(config)}", "--rounds", "3",
                           "--record"]) == 0
    records = read_records([log], conv3.target)
    assert best_configs(records) == {conv3.key: config}
    (decision,) = records
    assert decision.extra["end_to_end"] == "tuned" and decision.extra["rounds_won"] == [3, 3]
    assert len(decision.costs_s) == conv3.count and all(c > 0 for c in decision.costs_s)  # its kernels, stamped
