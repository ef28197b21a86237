"""Tuning records: one JSON line per measured config, appended to `tuning_logs/<cpu-kind>/<model>.jsonl`.

A record says which config of which template was timed for which workload, on which target and CPU, and what
it cost (or why it failed). Writers only append, one fsync'd line at a time, so a run killed with kill -9 loses
at most the line it was writing. Readers keep what still applies and skip the rest, one warning per line: a line
that is not JSON or lacks fields, a newer `format`, another target, a template whose version or space changed
since the record was made, another CPU when asked for one. Nothing in a log ever crashes a reader.

    {"format": 1, "kiln": "0.1.0", "target": {"kind": "llvm", "mcpu": "skylake-avx512", ...},
     "cpu": "Intel(R) Xeon(R) ...", "workload": {...}, "key": "x86.dense@1:3f2a...", "template": "x86.dense@1",
     "space_hash": "b41c09e2a1f0", "config": {"tile_n": 16}, "costs_s": [2.1e-4, 2.0e-4], "error": null,
     "at": "2026-11-25T14:02:11Z", "trial": 12, "tuner": "xgb"}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kiln.schedules.space import Config
from kiln.schedules.target_info import target_info
from kiln.schedules.template import Template, template_named
from kiln.schedules.workload import Workload

import kiln
from kiln.errors import ScheduleError

log = logging.getLogger(__name__)

KILN_VERSION = kiln.__version__

FORMAT = 1  # bump when the record layout changes; readers skip records newer than this
REQUIRED = ("format", "kiln", "target", "cpu", "workload", "key", "template", "space_hash", "config", "costs_s",
            "at")
CORE = (*REQUIRED, "error")
TARGET_IDENTITY = ("kind", "mtriple", "arch", "mcpu")  # and the mattr list; not num-cores

SkipHandler = Callable[[Path, int, str], None]  # (file, line number, why)


@dataclass
class Record:
    target: dict  # json.loads(str(tvm_target))
    cpu: str  # the CPU it was measured on (cpu_name())
    workload: Workload
    template: str  # name@version
    space_hash: str  # Space.digest() of the template's space for this workload and target
    config: Config
    costs_s: list[float] = field(default_factory=list)  # empty when error
    error: str | None = None
    at: str = ""  # UTC, ISO 8601
    kiln: str = KILN_VERSION
    format: int = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)  # what a tuner adds (trial, tuner, build_s), kept as is

    @classmethod
    def measured(cls, template: Template, workload: Workload, target, config: Config,
                 costs_s: Iterable[float] = (), error: str | None = None, *, cpu: str | None = None,
                 **extra: Any) -> Record:
        """A record of `config` timed now on this machine (or failed with `error`), its space hash computed."""
        space = template.space(workload, target_info(target))
        return cls(target=_target_dict(target), cpu=cpu_name() if cpu is None else cpu, workload=workload,
                   template=template.key, space_hash=space.digest(), config=dict(config),
                   costs_s=[] if error is not None else [float(c) for c in costs_s], error=error,
                   at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), extra=extra)

    @property
    def key(self) -> str:
        return self.workload.key

    @property
    def cost_s(self) -> float:
        """The median of the costs; infinite for a failed (or unmeasured) config, so it never wins."""
        if self.error is not None or not self.costs_s:
            return math.inf
        return float(statistics.median(self.costs_s))

    def to_json(self) -> dict:
        core = {"format": self.format, "kiln": self.kiln, "target": self.target, "cpu": self.cpu,
                "workload": self.workload.to_json(), "key": self.key, "template": self.template,
                "space_hash": self.space_hash, "config": self.config, "costs_s": self.costs_s,
                "error": self.error, "at": self.at}
        return {**core, **{k: v for k, v in self.extra.items() if k not in core}}

    @classmethod
    def from_json(cls, d: Mapping) -> Record:
        """A record from its JSON object; ValueError (TypeError for a non-object) naming the field when one is
        missing or of the wrong kind (a `format` newer than FORMAT is not checked here: read_records says so)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"a record is a JSON object, got {type(d).__name__}")
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise ValueError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        _expect(d, "format", int)
        _expect(d, "target", dict)
        _expect(d, "config", dict)
        _expect(d, "costs_s", list)
        for name in ("kiln", "cpu", "key", "template", "space_hash", "at"):
            _expect(d, name, str)
        if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in d["costs_s"]):
            raise ValueError(f"costs_s holds a value that is not a number: {d['costs_s']}")
        error = d.get("error")
        if error is not None and not isinstance(error, str):
            raise ValueError(f"error is {type(error).__name__}, not a string or null")
        if "@" not in d["template"]:
            raise ValueError(f"template {d['template']!r} is not name@version")
        try:
            workload = Workload.from_json(d["workload"])
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise ValueError(f"workload is malformed ({type(err).__name__}: {err})") from None
        if workload.key != d["key"]:
            raise ValueError(f"key {d['key']!r} is not its workload's key {workload.key!r}")
        if workload.template != d["template"]:
            raise ValueError(f"template {d['template']!r} differs from its workload's {workload.template!r}")
        return cls(target=dict(d["target"]), cpu=d["cpu"], workload=workload, template=d["template"],
                   space_hash=d["space_hash"], config=dict(d["config"]),
                   costs_s=[float(c) for c in d["costs_s"]], error=error, at=d["at"], kiln=d["kiln"],
                   format=d["format"], extra={k: v for k, v in d.items() if k not in CORE})

    def line(self) -> str:
        """The record as one line of JSON (no newline)."""
        return json.dumps(self.to_json(), separators=(", ", ": "), allow_nan=False)


class RecordWriter:
    """Appends records to one .jsonl file, one flushed and fsync'd line per record; never truncates it.

    A line left half-written by a killed run is ended with a newline before the first new record, so it stays
    one unreadable line (skipped with a warning) instead of swallowing the record after it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (open until close())
        self._lock = threading.Lock()
        if created:
            _fsync_dir(self.path.parent)  # the new file's name survives a crash too
        elif self.path.stat().st_size and not _ends_with_newline(self.path):
            self._write("\n")

    def write(self, record: Record) -> None:
        self._write(record.line() + "\n")

    def _write(self, text: str) -> None:
        with self._lock:
            self._file.write(text)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordWriter:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_records(paths: str | os.PathLike | Iterable[str | os.PathLike], target=None, *, cpu: str | None = None,
                 templates: Callable[[str], Template] | Mapping[str, Template] = template_named,
                 on_skip: SkipHandler | None = None) -> list[Record]:
    """The records in `paths` (files, and folders: every *.jsonl below them, sorted) that still apply, in file
    order. With `target` (a tvm Target or its dict), only records for the same target (kind, triple or arch,
    CPU, mattr; not the core count); with `cpu`, only records measured on that CPU. `templates` looks up the
    registered template by name (the registry, or a mapping); a record of another version, or of a space that
    has changed since, is skipped. Each skipped line logs one warning and is passed to `on_skip`; a truncated
    last line (a write cut short) is skipped with one info line."""
    lookup = _lookup(templates)
    if isinstance(target, Mapping):
        target = _tvm_target(dict(target))
    wanted = _identity(_target_dict(target)) if target is not None else None
    digests: dict[tuple[str, str], str | None] = {}
    kept: list[Record] = []
    for path in _files(paths):
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
        for i, text in enumerate(lines):
            if not text.strip():
                continue
            why = _why_skip(text, wanted, target, cpu, lookup, digests)
            if isinstance(why, Record):
                kept.append(why)
                continue
            if why == "not JSON" and i == len(lines) - 1:  # no newline after it: a write cut short
                log.info("%s:%d: skipped a truncated last line (a write cut short)", path, i + 1)
                why = "truncated last line"
            else:
                log.warning("%s:%d: skipped: %s", path, i + 1, why)
            if on_skip is not None:
                on_skip(path, i + 1, why)
    return kept


def best_records(records: Iterable[Record], decisions: bool = True) -> dict[str, Record]:
    """The lowest-cost record per workload key; failed records never win, ties keep the first. Where a key has
    verified records (the tuner's final A/B of its best against the default, timed interleaved in one
    process), only those of its last A/B count: a search's single lucky measurement must not outrank them.
    Above both, the last end-to-end decision for a key (`kiln tune` timing the whole model tuned against default, and keeping
    the default when the tuned one was not reliably faster) stands: kernels that each won alone can lose
    together, and a log applied later must not bring back the model its own A/B refused. `decisions=False`
    gives the search's bests regardless (what the next A/B compares)."""
    records = list(records)
    verified = {r.key for r in records if r.extra.get("verified")}
    # only a key's last A/B counts: an earlier one's costs were timed on another day's machine (a winner
    # verified at 0.076 ms on a quiet VM would outrank the 0.096 ms winner of a later A/B that timed it at 0.147)
    last_ab = {r.key: r.extra.get("verify") for r in records if r.extra.get("verified")}
    best: dict[str, Record] = {}
    decided: dict[str, Record] = {}
    for r in records:
        if r.extra.get("end_to_end"):
            if r.error is None:
                decided[r.key] = r  # the last decision stands
            continue
        if r.key in verified and (not r.extra.get("verified") or r.extra.get("verify") != last_ab[r.key]):
            continue
        if r.error is None and r.costs_s and (r.key not in best or r.cost_s < best[r.key].cost_s):
            best[r.key] = r
    if decisions:
        best.update(decided)
    return best


def best_configs(records: Iterable[Record], decisions: bool = True) -> dict[str, Config]:
    """The config of the best record per workload key (`best_records`): what `kiln.compile` is handed."""
    return {key: dict(r.config) for key, r in best_records(records, decisions).items()}


def config_id(config: Mapping) -> str:
    """A config as canonical JSON (sorted keys, no spaces): equal configs, equal strings."""
    return json.dumps(dict(config), sort_keys=True, separators=(",", ":"))


def measured_configs(records: Iterable[Record], key: str) -> set[str]:
    """config_id of every config already tried for a workload key, failed ones included (a resumed tuner skips
    them)."""
    return {config_id(r.config) for r in records if r.key == key}


def cpu_name() -> str:
    """The CPU records are measured on: /proc/cpuinfo's model name, else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _why_skip(text: str, wanted, target, cpu, lookup, digests) -> Record | str:
    """The record of a line, or why it is skipped."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        return "not JSON"
    if isinstance(d, dict) and isinstance(d.get("format"), int) and d["format"] > FORMAT:
        return f"record format {d['format']} is newer than this kiln {KILN_VERSION} reads ({FORMAT}); upgrade kiln"
    try:
        r = Record.from_json(d)
    except (TypeError, ValueError) as err:
        return f"malformed record: {err}"
    if wanted is not None and _identity(r.target) != wanted:
        return f"record for target {_describe(_identity(r.target))}, reading for {_describe(wanted)}"
    if cpu is not None and r.cpu != cpu:
        return f"record measured on CPU {r.cpu!r}, reading for {cpu!r}"
    name, version = r.template.rsplit("@", 1)
    try:
        template = lookup(name)
    except (ScheduleError, KeyError):
        return f"no registered template named {name!r}"
    if str(template.version) != version:
        return f"record of {r.template}, but {name} is version {template.version} now"
    try:
        digest = _space_digest(template, r, target, digests)
    except Exception as err:  # noqa: BLE001  (a workload the template no longer reads: its dims changed)
        return f"{r.template} cannot make a space of this workload now ({type(err).__name__}: {err})"
    if digest != r.space_hash:
        upgraded = _upgrade(template, r, target, digest)
        if upgraded is None:
            return f"the space of {r.template} for {r.key} changed (hash {r.space_hash}, now {digest})"
        r = upgraded
    return r


def _upgrade(template: Template, r: Record, target, digest: str) -> Record | None:
    """A record made before the template gained knobs (`Template.added_knobs`) or knob values
    (`Template.added_values`), as a record of today's space: its config completed with the added knobs' old
    values, which build the very kernel it timed."""
    if not template.added_knobs and not template.added_values:
        return None
    t = target if target is not None else _tvm_target(r.target)
    space = template.space(r.workload, target_info(t))
    added = list(template.added_knobs)  # in the order the template gained them: a record predates a suffix
    # the space as the record saw it: a suffix of the added knobs taken away, with or without the added values
    # (a record may predate both)
    for since in [added[i:] for i in range(len(added) + 1)]:
        for values in ({}, template.added_values) if template.added_values else ({},):
            old = space.without(since)
            if (old.without_values(values) if values else old).digest() != r.space_hash or not (since or values):
                continue
            if not since:  # made before the values: its config is still a point, the very kernel it timed
                return dataclasses.replace(r, space_hash=digest) if r.config in space else None
            config = space.upgrade(r.config, {n: template.added_knobs[n] for n in since})
            return None if config is None else dataclasses.replace(r, config=config, space_hash=digest)
    return None


def _space_digest(template: Template, r: Record, target, digests: dict) -> str:
    t = target if target is not None else _tvm_target(r.target)
    cache_key = (f"{template.key} {r.key}", str(t))
    if cache_key not in digests:
        digests[cache_key] = template.space(r.workload, target_info(t)).digest()
    return digests[cache_key]


def _lookup(templates) -> Callable[[str], Template]:
    if isinstance(templates, Mapping):
        return lambda name: templates[name]
    return templates


def _files(paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*.jsonl") if f.is_file())
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"no tuning log at {p}")
    return out


def _target_dict(target) -> dict:
    if isinstance(target, Mapping):
        return json.loads(str(_tvm_target(dict(target))))
    return json.loads(str(target))


def _tvm_target(d: dict):
    from tvm.target import Target

    return Target(d)


def _identity(d: Mapping) -> tuple:
    return (*(str(d.get(k, "")) for k in TARGET_IDENTITY), tuple(sorted(str(a) for a in d.get("mattr", []))))


def _describe(identity: tuple) -> str:
    *values, mattr = identity
    parts = [f"{k}={v}" for k, v in zip(TARGET_IDENTITY, values) if v]
    return " ".join(parts + ([f"mattr={','.join(mattr)}"] if mattr else []))


def _expect(d: Mapping, name: str, kind: type) -> None:
    if not isinstance(d[name], kind) or (kind is int and isinstance(d[name], bool)):
        raise ValueError(f"{name} is {type(d[name]).__name__}, not {kind.__name__}")


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
