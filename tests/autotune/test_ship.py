import gzip
import json
from pathlib import Path

import pytest

from kiln.autotune.records import best_configs, read_records
from kiln.autotune.ship import compact_lines, main

RUNS = Path(__file__).resolve().parents[2] / "docs" / "tuning-runs"


def line(key, cost, **extra):
    return json.dumps({"key": key, "config": {"t": cost}, "costs_s": [cost] if cost else [],
                       "error": None if cost else "timeout", **extra})


def test_a_log_with_an_ab_keeps_only_the_records_that_decide():
    lines = [line("a", 3.0), line("a", 1.0), line("b", 2.0), line("a", 2.0, verified=True),
             line("a", 2.5, verified=True), line("a", 2.5, end_to_end="default"), "{not json", line("b", 0.0)]
    assert compact_lines(lines) == [lines[3], lines[4], lines[5]]


def test_a_log_stopped_before_its_ab_keeps_each_keys_fastest_success():
    lines = [line("a", 3.0), line("b", 0.0), line("a", 1.0), line("b", 2.0), line("a", 1.0)]
    assert compact_lines(lines) == [lines[2], lines[3]]


def test_a_shipped_full_log_compacts_to_the_same_configs(tmp_path):
    """The afternoon run's SqueezeNet log (its A/B kept the tuned model): the compacted file applies the very
    configs the full one does, from a fraction of the lines."""
    full = tmp_path / "squeezenet.jsonl"
    full.write_bytes(gzip.decompress((RUNS / "2026-11-30-pm" / "squeezenet.jsonl.gz").read_bytes()))
    assert main([str(full), "--out", str(tmp_path / "out" / "squeezenet.jsonl")]) == 0
    small = tmp_path / "out" / "squeezenet.jsonl"
    assert small.stat().st_size * 5 < full.stat().st_size
    configs = best_configs(read_records(full))
    assert len(configs) > 10 and best_configs(read_records(small)) == configs


def test_nothing_is_overwritten_or_dropped_unasked(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text(line("a", 1.0) + "\n" + line("a", 2.0) + "\n")
    (tmp_path / "taken.jsonl").write_text("mine\n")
    with pytest.raises(SystemExit):
        main([str(log), "--out", str(tmp_path / "taken.jsonl")])
    assert (tmp_path / "taken.jsonl").read_text() == "mine\n"
    with pytest.raises(SystemExit):
        main([str(log), "--in-place"])
    assert main([str(log), "--in-place", "--archive", str(tmp_path / "arch")]) == 0
    assert log.read_text() == line("a", 1.0) + "\n"
    assert gzip.decompress((tmp_path / "arch" / "m.jsonl.gz").read_bytes()).decode().count("\n") == 2
