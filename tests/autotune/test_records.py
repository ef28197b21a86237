"""Tuning records: JSON lines that round-trip, append-only fsync'd writes, and readers that skip (one warning
each, never a crash) what no longer applies: bad lines, newer formats, other targets, changed templates."""

import dataclasses
import json
import logging
import math
import signal
import subprocess
import sys
import time

import pytest
from kiln.autotune.records import (
    FORMAT,
    Record,
    RecordWriter,
    best_configs,
    best_records,
    config_id,
    cpu_name,
    measured_configs,
    read_records,
)
from kiln.codegen.target import resolve_target
from kiln.ir.ops.elementwise import ADD
from kiln.schedules.dispatch import task_of
from kiln.schedules.space import Space
from kiln.schedules.template import Template, template_named
from kiln.schedules.workload import Group, Workload

from tests.groups import op_group

AVX512 = resolve_target("x86-avx512")
AVX2 = resolve_target("x86-avx2")
CPU = "Test CPU @ 3.0GHz"
LOGGER = "kiln.autotune.records"


def add_group(n: int = 16):
    return op_group(ADD, [((4, n), "float32"), ((4, n), "float32")])


def generic_record(target=AVX512, n: int = 16, costs_s=(2e-4, 1e-4, 3e-4), **kw) -> Record:
    """A record of the registered generic template (its space: one empty config) for a real add group."""
    template, wl = task_of(add_group(n), target)
    assert template is template_named("x86.generic")
    return Record.measured(template, wl, target, {}, costs_s, cpu=CPU, **kw)


def tile_template(tiles=(1, 2, 4), version: int = 1) -> Template:
    """A template built here, with a space of three tile sizes (no group applies to it)."""
    return Template(
        "x86.test_tile", version, "llvm",
        applies=lambda group: False,
        workload=lambda group, info: Workload.of(f"x86.test_tile@{version}", group, lanes=info.lanes(32)),
        space=lambda wl, info: Space.of(tile=list(tiles)),
        default=lambda wl, info: {"tile": tiles[0]},
        schedule=lambda sch, wl, cfg: [],
    )


def tile_record(tile: int, costs_s=(1e-3,), error=None, template=None, n: int = 16) -> Record:
    template = template or tile_template()
    wl = Workload.of(template.key, Group(add_group(n)), lanes=16)
    return Record.measured(template, wl, AVX512, {"tile": tile}, costs_s, error, cpu=CPU)


def write(path, records) -> None:
    with RecordWriter(path) as w:
        for r in records:
            w.write(r)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_a_record_round_trips_through_one_json_line():
    r = generic_record(trial=7, tuner="grid", build_s=0.25)
    line = r.line()
    assert "\n" not in line
    d = json.loads(line)
    assert d["format"] == FORMAT and d["template"] == "x86.generic@1" and d["key"] == r.workload.key
    assert d["target"]["mcpu"] == "skylake-avx512" and d["cpu"] == CPU and d["error"] is None
    assert d["space_hash"] == Space.of().digest()
    assert d["at"].endswith("Z") and d["trial"] == 7 and d["tuner"] == "grid" and d["build_s"] == 0.25
    back = Record.from_json(d)
    assert back == r and back.to_json() == d
    assert back.cost_s == 2e-4  # the median


def test_a_failed_record_has_no_costs_and_costs_infinity():
    r = tile_record(2, costs_s=(1e-6,), error="timeout")
    assert r.costs_s == [] and r.error == "timeout" and math.isinf(r.cost_s)
    assert Record.from_json(json.loads(r.line())) == r


def test_cpu_name_reads_the_model_name_or_the_processor():
    assert cpu_name() and "\n" not in cpu_name()


def test_the_writer_appends_and_never_truncates(tmp_path):
    path = tmp_path / "logs" / "x86" / "model.jsonl"  # folders are made
    a, b, c = tile_record(1), tile_record(2), tile_record(4)
    write(path, [a, b])
    write(path, [c])  # a second run appends
    assert path.read_text().count("\n") == 3
    assert read_records(path, AVX512, templates={"x86.test_tile": tile_template()}) == [a, b, c]


def test_every_skip_rule_warns_once_and_the_rest_are_kept_in_order(tmp_path, caplog):
    good = generic_record(n=16)
    good2 = generic_record(n=32)
    old_version = dataclasses.replace(
        good, template="x86.generic@0", workload=dataclasses.replace(good.workload, template="x86.generic@0"))
    changed_space = dataclasses.replace(good, space_hash="0123456789ab")
    other_cpu = dataclasses.replace(good, cpu="Another CPU")
    unknown = dataclasses.replace(
        good, template="x86.gone@1", workload=dataclasses.replace(good.workload, template="x86.gone@1"))
    missing = good.to_json()
    del missing["space_hash"]
    newer = {**good.to_json(), "format": FORMAT + 1, "costs_s": "a new layout"}
    lines = [
        good.line(),
        "{not json",
        json.dumps(missing),
        json.dumps(newer),
        generic_record(target=AVX2).line(),  # measured for AVX2, read for AVX-512
        old_version.line(),
        changed_space.line(),
        other_cpu.line(),
        unknown.line(),
        good2.line(),
    ]
    path = tmp_path / "model.jsonl"
    path.write_text("\n".join(lines) + "\n")
    skipped = []
    with caplog.at_level(logging.INFO, logger=LOGGER):
        kept = read_records(path, AVX512, cpu=CPU, on_skip=lambda p, i, why: skipped.append((p, i, why)))
    assert kept == [good, good2]
    warned = warnings_of(caplog)
    assert len(warned) == 8 and [i for _, i, _ in skipped] == [2, 3, 4, 5, 6, 7, 8, 9]
    expected = [
        "model.jsonl:2: skipped: not JSON",
        "missing field space_hash",
        f"format {FORMAT + 1} is newer",
        "mcpu=haswell, reading for kind=llvm mtriple=x86_64-linux-gnu mcpu=skylake-avx512",
        "record of x86.generic@0, but x86.generic is version 1 now",
        "changed (hash 0123456789ab, now",
        "measured on CPU 'Another CPU'",
        "no registered template named 'x86.gone'",
    ]
    for message, want in zip(warned, expected):
        assert want in message, (want, message)
    # without the cpu filter, the other CPU's record is kept
    caplog.clear()
    assert read_records(path, AVX512) == [good, other_cpu, good2] and len(warnings_of(caplog)) == 7


def test_another_target_is_skipped_but_not_another_core_count(tmp_path, caplog):
    path = tmp_path / "model.jsonl"
    four_cores = dataclasses.replace(generic_record(), target={**generic_record().target, "num-cores": 4})
    write(path, [generic_record(target=AVX2), four_cores])
    assert read_records(path, AVX512) == [four_cores]
    assert len(warnings_of(caplog)) == 1
    assert read_records(path, {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})[0].target[
        "mcpu"] == "haswell"
    assert len(read_records(path)) == 2  # no target: every record whose template and space still match


def test_a_changed_space_of_a_constructed_template_is_skipped(tmp_path, caplog):
    path = tmp_path / "model.jsonl"
    write(path, [tile_record(1), tile_record(4)])
    assert len(read_records(path, AVX512, templates={"x86.test_tile": tile_template()})) == 2
    assert read_records(path, AVX512, templates={"x86.test_tile": tile_template(tiles=(1, 2, 4, 8))}) == []
    assert read_records(path, AVX512, templates={"x86.test_tile": tile_template(version=2)}) == []
    warned = warnings_of(caplog)
    assert len(warned) == 4
    assert all("space of x86.test_tile@1" in m for m in warned[:2])
    assert all("x86.test_tile is version 2 now" in m for m in warned[2:])


def test_a_record_made_before_a_knob_was_added_applies_with_the_knobs_old_value(tmp_path, caplog):
    """A template that gained a knob (declared in `added_knobs` with the value that builds the old kernel)
    still reads records made over its old space, completed with that value; any other change still skips."""
    grown = dataclasses.replace(tile_template(), space=lambda wl, info: Space.union(
        Space.of(tile=[1, 2, 4], vectors=[1, 2, 4]), Space.of(tile=[8])), added_knobs={"vectors": 1})
    old = dataclasses.replace(tile_template(), space=lambda wl, info: Space.union(
        Space.of(tile=[1, 2, 4]), Space.of(tile=[8])))
    wl = Workload.of(old.key, Group(add_group()), lanes=16)
    path = tmp_path / "model.jsonl"
    write(path, [Record.measured(old, wl, AVX512, {"tile": t}, (1e-3,), cpu=CPU) for t in (2, 8)])
    got = read_records(path, AVX512, templates={"x86.test_tile": grown})
    space = grown.space(wl, None)
    assert [r.config for r in got] == [{"tile": 2, "vectors": 1}, {"tile": 8}]
    assert all(r.config in space and r.space_hash == space.digest() for r in got)
    assert warnings_of(caplog) == []
    # without the declaration, or with the space changed in another way too, the records are skipped
    assert read_records(path, AVX512, templates={"x86.test_tile": dataclasses.replace(grown, added_knobs={})}) == []
    other = dataclasses.replace(grown, space=lambda wl, info: Space.of(tile=[1, 2], vectors=[1, 2]))
    assert read_records(path, AVX512, templates={"x86.test_tile": other}) == []


def test_a_record_made_before_a_knob_gained_values_applies_as_it_is(tmp_path, caplog):
    """A template whose knob gained values (`added_values`: AVX2's guarded 3-column conv tile) reads records
    made over the space without them: their configs are points of today's space, the very kernels they timed."""
    grown = dataclasses.replace(tile_template(), space=lambda wl, info: Space.of(tile=[1, 2, 3, 4]),
                                added_values={"tile": (3,)})
    old = dataclasses.replace(tile_template(), space=lambda wl, info: Space.of(tile=[1, 2, 4]))
    wl = Workload.of(old.key, Group(add_group()), lanes=16)
    path = tmp_path / "model.jsonl"
    write(path, [Record.measured(old, wl, AVX512, {"tile": t}, (1e-3,), cpu=CPU) for t in (2, 4)])
    got = read_records(path, AVX512, templates={"x86.test_tile": grown})
    assert [r.config for r in got] == [{"tile": 2}, {"tile": 4}]
    assert all(r.space_hash == grown.space(wl, None).digest() for r in got) and warnings_of(caplog) == []
    assert read_records(path, AVX512, templates={"x86.test_tile": dataclasses.replace(grown, added_values={})}) == []
    other = dataclasses.replace(grown, space=lambda wl, info: Space.of(tile=[2, 3, 4]))  # 1 went too
    assert read_records(path, AVX512, templates={"x86.test_tile": other}) == []


def test_a_record_made_before_both_a_knob_and_a_value_applies(tmp_path, caplog):
    """AVX2's 7-wide 1x1 convs gained the 3-column tile and the `flat` knob at once (2026-12-03): a record made
    before both is a point of today's space once the knob's old value completes it."""
    grown = dataclasses.replace(tile_template(), added_knobs={"flat": False}, added_values={"tile": (3,)},
                                space=lambda wl, info: Space.of(tile=[1, 2, 3, 4], flat=[False, True]))
    old = dataclasses.replace(tile_template(), space=lambda wl, info: Space.of(tile=[1, 2, 4]))
    wl = Workload.of(old.key, Group(add_group()), lanes=16)
    path = tmp_path / "model.jsonl"
    write(path, [Record.measured(old, wl, AVX512, {"tile": t}, (1e-3,), cpu=CPU) for t in (2, 4)])
    got = read_records(path, AVX512, templates={"x86.test_tile": grown})
    assert [r.config for r in got] == [{"tile": 2, "flat": False}, {"tile": 4, "flat": False}]
    assert all(r.space_hash == grown.space(wl, None).digest() for r in got) and warnings_of(caplog) == []
    # a record made after the value, before the knob, applies too; one over another space does not
    between = dataclasses.replace(tile_template(), space=lambda wl, info: Space.of(tile=[1, 2, 3, 4]))
    write(tmp_path / "between.jsonl", [Record.measured(between, wl, AVX512, {"tile": 3}, (1e-3,), cpu=CPU)])
    assert [r.config for r in read_records(tmp_path / "between.jsonl", AVX512,
                                           templates={"x86.test_tile": grown})] == [{"tile": 3, "flat": False}]
    other = dataclasses.replace(tile_template(), space=lambda wl, info: Space.of(tile=[1, 2]))
    write(tmp_path / "other.jsonl", [Record.measured(other, wl, AVX512, {"tile": 2}, (1e-3,), cpu=CPU)])
    assert read_records(tmp_path / "other.jsonl", AVX512, templates={"x86.test_tile": grown}) == []


def test_records_made_between_two_added_knobs_apply_too(tmp_path, caplog):
    """A template that gained `vectors` and later `unroll` reads records of all three ages: those made before
    either get both old values, those made between get only `unroll`'s (the Winograd branch's `tile_k`, then
    `fused`: the Zen 5 logs of 2026-12-01 have the first and not the second)."""
    def template(**knobs):
        return dataclasses.replace(tile_template(), space=lambda wl, info: Space.union(
            Space.of(tile=[1, 2, 4], **knobs), Space.of(tile=[8])), added_knobs={"vectors": 1, "unroll": False})

    oldest, middle = template(), template(vectors=[1, 2])
    grown = template(vectors=[1, 2], unroll=[False, True])
    wl = Workload.of(oldest.key, Group(add_group()), lanes=16)
    path = tmp_path / "model.jsonl"
    write(path, [Record.measured(oldest, wl, AVX512, {"tile": 2}, (1e-3,), cpu=CPU),
                 Record.measured(middle, wl, AVX512, {"tile": 4, "vectors": 2}, (1e-3,), cpu=CPU),
                 Record.measured(grown, wl, AVX512, {"tile": 1, "vectors": 2, "unroll": True}, (1e-3,), cpu=CPU)])
    got = read_records(path, AVX512, templates={"x86.test_tile": grown})
    assert [r.config for r in got] == [{"tile": 2, "vectors": 1, "unroll": False},
                                       {"tile": 4, "vectors": 2, "unroll": False},
                                       {"tile": 1, "vectors": 2, "unroll": True}]
    assert warnings_of(caplog) == []


def test_winograd_records_from_before_tile_k_apply_as_tile_k_1(tmp_path):
    """The conv template's Winograd branch gained `tile_k`; a log written before (the ResNet-50 run of
    2026-11-30 kept in docs/, and any user's) reads back as the kernels it timed, not skipped as made over
    another space."""
    import gzip
    from pathlib import Path

    src = Path(__file__).parents[2] / "docs" / "tuning-runs" / "2026-11-30-in-model" / "resnet50.jsonl.gz"
    log = tmp_path / "resnet50.jsonl"
    log.write_text(gzip.decompress(src.read_bytes()).decode())
    raw = [d for d in map(json.loads, log.read_text().splitlines())
           if d["config"].get("algorithm", "").startswith("winograd")]
    assert raw and all("tile_k" not in d["config"] for d in raw)
    got = [r for r in read_records(log, resolve_target(raw[0]["target"])) if r.config.get("algorithm", "")
           .startswith("winograd")]
    assert len(got) == len(raw) and all(r.config["tile_k"] == 1 for r in got)


def test_a_truncated_last_line_is_skipped_quietly_and_the_next_run_appends_cleanly(tmp_path, caplog):
    path = tmp_path / "model.jsonl"
    records = [tile_record(t) for t in (1, 2, 4)]
    write(path, records)
    with open(path, "a") as f:  # what kill -9 in the middle of a write leaves
        f.write(tile_record(2).line()[:57])
    templates = {"x86.test_tile": tile_template()}
    skipped = []
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert read_records(path, AVX512, templates=templates, on_skip=lambda *a: skipped.append(a)) == records
    assert warnings_of(caplog) == []
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "model.jsonl:4: skipped a truncated last line" in infos[0]
    assert skipped == [(path, 4, "truncated last line")]
    # the next run starts on a new line: the cut line stays one bad line, the new record is read
    more = tile_record(4, costs_s=(5e-4,))
    write(path, [more])
    caplog.clear()
    assert read_records(path, AVX512, templates=templates) == [*records, more]
    assert len(warnings_of(caplog)) == 1 and "model.jsonl:4: skipped: not JSON" in warnings_of(caplog)[0]


WRITER = """
import json, sys
from kiln.autotune.records import Record, RecordWriter
record = Record.from_json(json.loads(sys.argv[2]))
with RecordWriter(sys.argv[1]) as w:
    for trial in range(10**9):
        record.extra["trial"] = trial
        w.write(record)
"""


def test_a_writer_killed_with_sigkill_loses_at_most_the_line_being_written(tmp_path, caplog):
    path = tmp_path / "model.jsonl"
    r = tile_record(2)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), r.line()])
    try:
        deadline = time.monotonic() + 60
        while (not path.exists() or path.stat().st_size < 20_000) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    text = path.read_text()
    whole = text.count("\n")
    assert whole > 10
    kept = read_records(path, AVX512, templates={"x86.test_tile": tile_template()})
    assert [k.extra["trial"] for k in kept] == list(range(whole))
    assert warnings_of(caplog) == []


def test_folders_are_read_in_sorted_order_of_their_jsonl_files(tmp_path):
    a, b, c = tile_record(1), tile_record(2), tile_record(4)
    write(tmp_path / "logs" / "x86-avx512" / "b.jsonl", [b])
    write(tmp_path / "logs" / "x86-avx512" / "a.jsonl", [a])
    write(tmp_path / "logs" / "0-first" / "z.jsonl", [c])
    (tmp_path / "logs" / "notes.txt").write_text("not a log\n")
    extra = tmp_path / "extra.jsonl"
    write(extra, [a])
    templates = {"x86.test_tile": tile_template()}
    assert read_records(tmp_path / "logs", AVX512, templates=templates) == [c, a, b]
    assert read_records([extra, str(tmp_path / "logs")], AVX512, templates=templates) == [a, c, a, b]
    with pytest.raises(FileNotFoundError, match="no tuning log"):
        read_records(tmp_path / "missing.jsonl")


def test_the_best_config_per_key_is_the_lowest_median_and_errors_never_win():
    other = generic_record(n=32, costs_s=(9e-4,))
    records = [
        tile_record(1, costs_s=(3e-4, 9e-4, 2e-4)),  # median 3e-4
        tile_record(2, costs_s=(1e-9,), error="wrong answer"),
        tile_record(4, costs_s=(2.5e-4,)),
        tile_record(1, costs_s=(2.5e-4, 2.5e-4)),  # a tie: the first stays
        other,
        generic_record(n=64, costs_s=(1e-9,), error="timeout"),  # only an error: no best
    ]
    key = records[0].key
    assert best_configs(records) == {key: {"tile": 4}, other.key: {}}
    assert best_records(records)[key] is records[2]
    assert best_configs([]) == {}


def test_measured_configs_include_failures_and_only_that_key():
    records = [tile_record(1), tile_record(2, error="timeout"), tile_record(4, n=32), tile_record(1)]
    key = records[0].key
    assert records[2].key != key
    assert measured_configs(records, key) == {config_id({"tile": 1}), config_id({"tile": 2})}
    assert config_id({"b": 1, "a": True}) == '{"a":true,"b":1}'
    assert measured_configs(records, "x86.none@1:0") == set()



def test_the_last_end_to_end_decision_outranks_faster_kernels():
    """`kiln tune` records the config its whole-model A/B kept for each task: a log applied later gives that,
    not each kernel's lone best; the A/B itself still compares against the search's best."""
    search = [tile_record(1, costs_s=(3e-3,)), tile_record(2, costs_s=(1e-3,))]
    template = tile_template()
    wl = Workload.of(template.key, Group(add_group(16)), lanes=16)
    decide = lambda tile, kept: Record.measured(template, wl, AVX512, {"tile": tile}, [3e-3], cpu=CPU,  # noqa: E731
                                                end_to_end=kept, replay="skip")
    key = search[0].key
    assert best_configs(search) == {key: {"tile": 2}}
    assert best_configs([*search, decide(1, "default")]) == {key: {"tile": 1}}
    assert best_configs([*search, decide(1, "default")], decisions=False) == {key: {"tile": 2}}
    # a later run that kept its tuned model decides again
    assert best_configs([*search, decide(1, "default"), decide(2, "tuned")]) == {key: {"tile": 2}}
