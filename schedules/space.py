"""A template's knob space: what a tuner may choose, declared so that every point in it builds.

A space is a union of branches; each branch is a product of knobs, each knob a tuple of JSON scalars. A knob
that only means something under another knob's value (Winograd's GEMM tile under `algorithm="winograd4"`) lives
in that value's branch, so no two configs in a space give the same kernel through a knob that changes nothing.
A config is a plain dict, knob name → value, so it goes into records and metadata as it is.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kiln.errors import InvalidConfig

Config = dict[str, Any]
Branch = tuple[tuple[str, tuple], ...]


@dataclass(frozen=True)
class Space:
    branches: tuple[Branch, ...]

    @classmethod
    def of(cls, **knobs: Any) -> Space:
        """One branch: every combination of the knobs' values."""
        return cls((_branch(knobs),))

    @classmethod
    def union(cls, *spaces: Space) -> Space:
        branches = tuple(b for s in spaces for b in s.branches)
        if not branches:
            raise ValueError("a space needs at least one branch")
        return cls(branches)

    def __post_init__(self) -> None:
        for b in self.branches:
            for name, values in b:
                if not values:
                    raise ValueError(f"knob {name!r} has no values")

    def __len__(self) -> int:
        return sum(_size(b) for b in self.branches)

    def __iter__(self) -> Iterator[Config]:
        for b in self.branches:
            names = [n for n, _ in b]
            for values in itertools.product(*(v for _, v in b)):
                yield dict(zip(names, values))

    def __contains__(self, cfg: object) -> bool:
        return isinstance(cfg, Mapping) and self._branch_of(cfg) is not None

    @property
    def knobs(self) -> list[str]:
        """Every knob name, in declaration order (a branch may lack some)."""
        return list(dict.fromkeys(n for b in self.branches for n, _ in b))

    def tunable(self) -> dict[str, int]:
        """Knobs that take more than one value anywhere in the space, with how many distinct values."""
        values: dict[str, set] = {}
        for b in self.branches:
            for n, v in b:
                values.setdefault(n, set()).update((type(x).__name__, x) for x in v)
        return {n: len(v) for n, v in values.items() if len(v) > 1}

    def at(self, index: int) -> Config:
        """The index-th config in iteration order (grid search walks 0..len-1)."""
        if not 0 <= index < len(self):
            raise IndexError(f"config {index} of a space of {len(self)}")
        for b in self.branches:
            size = _size(b)
            if index < size:
                cfg = {}
                for name, values in reversed(b):
                    index, i = divmod(index, len(values))
                    cfg[name] = values[i]
                return {n: cfg[n] for n, _ in b}
            index -= size
        raise AssertionError("unreachable")

    def index(self, cfg: Mapping) -> int:
        base = 0
        for b in self.branches:
            if _in_branch(b, cfg):
                i = 0
                for name, values in b:
                    i = i * len(values) + values.index(cfg[name])
                return base + i
            base += _size(b)
        raise InvalidConfig(f"{dict(cfg)} is not in the space")

    def sample(self, rng: random.Random) -> Config:
        """A uniform draw over all configs (a branch in proportion to its size)."""
        return self.at(rng.randrange(len(self)))

    def neighbors(self, cfg: Mapping) -> list[Config]:
        """Configs one knob away within cfg's branch (the moves of annealing and mutation)."""
        b = self._branch_of(cfg)
        if b is None:
            raise InvalidConfig(f"{dict(cfg)} is not in the space")
        out = []
        for name, values in b:
            for v in values:
                if v != cfg[name]:
                    out.append({**{n: cfg[n] for n, _ in b}, name: v})
        return out

    def check(self, cfg: Mapping) -> Config:
        """cfg as a plain dict of this space's knobs; InvalidConfig naming the knob when it is not a point here."""
        if self._branch_of(cfg) is None:
            raise InvalidConfig(f"config {dict(cfg)} is not in the space: {self.describe()}")
        b = self._branch_of(cfg)
        return {n: cfg[n] for n, _ in b}

    def without(self, names: Iterable[str]) -> Space:
        """The space as it was before knobs `names` were added to it: each branch with them removed."""
        names = set(names)
        return Space(tuple(tuple((n, v) for n, v in b if n not in names) for b in self.branches))

    def without_values(self, values: Mapping[str, Iterable]) -> Space:
        """The space as it was before `values` were added to their knobs (a knob keeps at least its others)."""
        drop = {n: set(v) for n, v in values.items()}
        return Space(tuple(tuple((n, tuple(x for x in v if x not in drop.get(n, ())) or v) for n, v in b)
                           for b in self.branches))

    def upgrade(self, cfg: Mapping, added: Mapping[str, Any]) -> Config | None:
        """A config of `self.without(added)` as a config of this space: each added knob that its branch now
        holds set to the value in `added` (the one that builds the kernel the old config built); None if
        it is no point here."""
        for b in self.branches:
            names = {n for n, _ in b}
            full = {**dict(cfg), **{n: v for n, v in added.items() if n in names and n not in cfg}}
            if _in_branch(b, full):
                return {n: full[n] for n, _ in b}
        return None

    def digest(self) -> str:
        """A hash of every knob and value: a record made over another space is not replayed."""
        text = json.dumps([[[n, list(v)] for n, v in b] for b in self.branches], sort_keys=False)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def describe(self) -> str:
        parts = []
        for b in self.branches:
            parts.append(", ".join(f"{n}∈{list(v)}" if len(v) > 1 else f"{n}={v[0]!r}" for n, v in b))
        return " | ".join(f"{{{p}}}" for p in parts)

    def _branch_of(self, cfg: Mapping) -> Branch | None:
        return next((b for b in self.branches if _in_branch(b, cfg)), None)


def _branch(knobs: Mapping[str, Any]) -> Branch:
    out = []
    for name, values in knobs.items():
        values = tuple(values) if isinstance(values, (list, tuple, range)) else (values,)
        for v in values:
            if not isinstance(v, (bool, int, str)) or (isinstance(v, float) and not math.isfinite(v)):
                raise TypeError(f"knob {name!r}: {v!r} is not a JSON scalar (bool, int or str)")
        out.append((name, tuple(dict.fromkeys(values))))  # duplicates would weight a value twice
    return tuple(out)


def _size(b: Branch) -> int:
    return math.prod(len(v) for _, v in b)


def _in_branch(b: Branch, cfg: Mapping) -> bool:
    return set(cfg) == {n for n, _ in b} and all(
        cfg[n] in v and type(cfg[n]) is type(v[v.index(cfg[n])]) for n, v in b
    )
