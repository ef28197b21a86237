"""A served model's `config.json` (REPO/<model>/config.json): batching, queue bound, version policy and traffic
split. Every field is optional; a wrong one raises ConfigError naming the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

CONFIG_NAME = "config.json"

# Every number has a finite, bounded range: a value past these is a typo, and NaN, Infinity or 1e300 would
# otherwise be accepted here and break serving later (a queue delay of 1e300 ms overflows the batcher's timer).
MAX_BATCH = 1 << 16
MAX_QUEUE_DELAY_MS = 60_000.0
MAX_QUEUE_SIZE = 1 << 20
MAX_VERSION = (1 << 31) - 1
MAX_NUM_VERSIONS = 1024
MAX_WEIGHT = 1e6
_VERSION_KEY = re.compile(r"^[0-9]{1,10}$")  # ASCII digits only: str.isdigit() also accepts "²" and "١"


class ConfigError(KilnError):
    """A model's config.json (or a load request's config override) is malformed."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which version directories are served: Triton's policies ("latest" N, "all", or "specific" ones)."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def candidates(self, available: list[int]) -> list[int]:
        """Versions to serve, in order of preference (newest first for "latest", so a failed newest one falls
        back on the next)."""
        if self.kind == "all":
            return sorted(available, reverse=True)
        if self.kind == "specific":
            return sorted((v for v in self.versions if v in available), reverse=True)
        return sorted(available, reverse=True)

    def wanted(self, available: list[int]) -> int:
        """How many of the candidates should be serving at once."""
        if self.kind == "latest":
            return self.num_versions
        return len(self.candidates(available))

    def to_json(self) -> dict:
        if self.kind == "latest":
            return {"latest": {"num_versions": self.num_versions}}
        if self.kind == "specific":
            return {"specific": {"versions": list(self.versions)}}
        return {"all": {}}


@dataclass(frozen=True)
class ModelConfig:
    max_batch_size: int = 8  # rows in one request and in one merged batch; buckets above it are not used
    dynamic_batching: bool = True  # False: every request runs alone (padded to its bucket)
    max_queue_delay_ms: float = 2.0  # how long the oldest queued request waits for others to join it
    max_queue_size: int = 128  # queued requests per version; beyond it the server answers 503
    batch_buckets: tuple[int, ...] | None = None  # None: every model_b<N>.so in the version directory
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    traffic_split: Mapping[int, float] | None = None  # version → weight, for requests that name no version

    def to_json(self) -> dict:
        return {"max_batch_size": self.max_batch_size, "dynamic_batching": self.dynamic_batching,
                "max_queue_delay_ms": self.max_queue_delay_ms, "max_queue_size": self.max_queue_size,
                "batch_buckets": list(self.batch_buckets) if self.batch_buckets else None,
                "version_policy": self.version_policy.to_json(),
                "traffic_split": {str(k): v for k, v in self.traffic_split.items()} if self.traffic_split else None}


def _number(d: Mapping, key: str, kind: type, low: float, where: str, high: float) -> Any:
    """d[key] as `kind` within [low, high]; bools are not numbers, NaN and ±Infinity are out of every range."""
    value = d[key]
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: '{key}' must be {what}, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{where}: '{key}' must be {what} in {_fmt(low)}..{_fmt(high)}, got {value!r}")
    if kind is int and value != int(value):
        raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
    return kind(value)


def _fmt(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def _version(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_VERSION


def parse_policy(value: Any, where: str) -> VersionPolicy:
    if not isinstance(value, Mapping) or len(value) != 1:
        raise ConfigError(f"{where}: 'version_policy' must be one of {{\"latest\": {{\"num_versions\": N}}}}, "
                          f"{{\"all\": {{}}}} or {{\"specific\": {{\"versions\": [..]}}}}, got {value!r}")
    (kind, body), = value.items()
    body = {} if body is None else body
    if kind == "latest":
        if not isinstance(body, Mapping):
            raise ConfigError(f"{where}: 'version_policy.latest' must be an object, got {body!r}")
        n = _number({"num_versions": body.get("num_versions", 1)}, "num_versions", int, 1, where, MAX_NUM_VERSIONS)
        return VersionPolicy("latest", num_versions=n)
    if kind == "all":
        return VersionPolicy("all")
    if kind == "specific":
        versions = body.get("versions") if isinstance(body, Mapping) else None
        if not isinstance(versions, list) or not versions or not all(_version(v) for v in versions):
            raise ConfigError(f"{where}: 'version_policy.specific.versions' must be a non-empty list of version "
                              f"numbers in 1..{MAX_VERSION}, got {versions!r}")
        return VersionPolicy("specific", versions=tuple(sorted(set(versions))))
    raise ConfigError(f"{where}: unknown version_policy {kind!r}; use latest, all or specific")


def parse_config(raw: Mapping[str, Any], where: str, base: ModelConfig | None = None) -> ModelConfig:
    """Fields of `raw` over `base` (or the defaults)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    known = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    cfg = base or ModelConfig()
    changes: dict[str, Any] = {}
    if "max_batch_size" in raw:
        changes["max_batch_size"] = _number(raw, "max_batch_size", int, 1, where, MAX_BATCH)
    if "dynamic_batching" in raw:
        if not isinstance(raw["dynamic_batching"], bool):
            raise ConfigError(f"{where}: 'dynamic_batching' must be true or false, got {raw['dynamic_batching']!r}")
        changes["dynamic_batching"] = raw["dynamic_batching"]
    if "max_queue_delay_ms" in raw:
        changes["max_queue_delay_ms"] = _number(raw, "max_queue_delay_ms", float, 0, where,
                                                MAX_QUEUE_DELAY_MS)
    if "max_queue_size" in raw:
        changes["max_queue_size"] = _number(raw, "max_queue_size", int, 1, where, MAX_QUEUE_SIZE)
    if raw.get("batch_buckets") is not None:
        b = raw["batch_buckets"]
        if not isinstance(b, list) or not b or not all(
                isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_BATCH for x in b):
            raise ConfigError(f"{where}: 'batch_buckets' must be a non-empty list of integer sizes in "
                              f"1..{MAX_BATCH}, got {b!r}")
        changes["batch_buckets"] = tuple(sorted(set(b)))
    if "version_policy" in raw:
        changes["version_policy"] = parse_policy(raw["version_policy"], where)
    if "traffic_split" in raw:
        split = raw["traffic_split"]
        if split is None:
            changes["traffic_split"] = None
        elif not isinstance(split, Mapping) or not split:
            raise ConfigError(f"{where}: 'traffic_split' must map versions to weights, got {split!r}")
        else:
            parsed = {}
            for k, w in split.items():
                if not _VERSION_KEY.match(str(k)) or not _version(int(k)) or isinstance(w, bool) or \
                        not isinstance(w, (int, float)) or not math.isfinite(w) or not 0 <= w <= MAX_WEIGHT:
                    raise ConfigError(f"{where}: 'traffic_split' entry {k!r}: {w!r} must be version: weight, "
                                      f"a weight in 0..{MAX_WEIGHT:g}")
                parsed[int(k)] = float(w)
            if sum(parsed.values()) <= 0:
                raise ConfigError(f"{where}: 'traffic_split' weights sum to 0")
            changes["traffic_split"] = parsed
    return replace(cfg, **changes)


def _refuse_constant(name: str) -> Any:
    """Python's json accepts NaN, Infinity and -Infinity, which JSON itself does not have."""
    raise ValueError(f"{name} is not a JSON number")


def read_config(model_dir: Path) -> ModelConfig:
    path = model_dir / CONFIG_NAME
    if not path.exists():
        return ModelConfig()
    try:
        raw = json.loads(path.read_text(), parse_constant=_refuse_constant)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    return parse_config(raw, str(path))
