"""The tuner interface the measuring loop and the task scheduler drive, and what every search shares.

A tuner proposes configs of one task's space in batches and learns from their measured costs. It never proposes
a config twice, nor one it was told about through `update` (a run resumed from its log replays its records
through `update` first, so no measured config is measured again). `next_batch` returns fewer configs than asked
only when the space has fewer left; `exhausted()` is then true.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np
from kiln.schedules.space import Config, Space

Featurize = Callable[[Config], np.ndarray]
# (feature vector, cost_s) or (feature vector, cost_s, group): costs are compared only within one group (a task)
HistoryRecord = tuple


class Tuner:
    def __init__(
        self,
        space: Space,
        seed: int = 0,
        featurize: Featurize | None = None,
        history: Sequence[HistoryRecord] | None = None,
    ):
        self.space = space
        self.seed = seed
        self.featurize = featurize
        self.history = list(history) if history is not None else None
        self.rng = random.Random(seed)
        self.best: tuple[Config, float] | None = None
        self.trials = 0
        self.measured: list[tuple[int, float]] = []  # (index in space, cost_s), in arrival order
        self._proposed: set[int] = set()  # indices proposed or measured

    def next_batch(self, n: int) -> list[Config]:
        n = min(n, len(self.space) - len(self._proposed))
        if n <= 0:
            return []
        picks = self._propose(n)
        if len(set(picks)) != len(picks) or any(i in self._proposed for i in picks) or len(picks) > n:
            raise AssertionError(f"{type(self).__name__} proposed a config twice: {picks}")
        self._proposed.update(picks)
        return [self.space.at(i) for i in picks]

    def update(self, configs: Sequence[Config], costs_s: Sequence[float]) -> None:
        """Measured costs (float("inf") for a failed trial) of configs, proposed by this tuner or replayed."""
        if len(configs) != len(costs_s):
            raise ValueError(f"{len(configs)} configs but {len(costs_s)} costs")
        for cfg, cost in zip(configs, costs_s):
            i = self.space.index(cfg)
            cost = float(cost)
            self._proposed.add(i)
            self.measured.append((i, cost))
            self.trials += 1
            if math.isfinite(cost) and (self.best is None or cost < self.best[1]):
                self.best = (self.space.at(i), cost)

    def reserve(self, configs: Sequence[Config]) -> None:
        """Never propose these: they are being measured elsewhere (a batch out on a device), their costs to
        come through `update` later."""
        self._proposed.update(self.space.index(c) for c in configs)

    def exhausted(self) -> bool:
        return len(self._proposed) >= len(self.space)

    def _propose(self, n: int) -> list[int]:
        """n distinct indices never proposed; 1 ≤ n ≤ the configs left."""
        raise NotImplementedError

    def _random_unproposed(self, k: int, taken: set[int] | None = None) -> list[int]:
        """Up to k distinct indices, uniformly among those neither proposed nor in `taken`."""
        taken = self._proposed | (taken or set())
        size = len(self.space)
        left = size - len(taken)
        k = min(k, left)
        if k <= 0:
            return []
        if len(taken) < size // 2:  # rejection sampling: each draw hits a free index with odds > 1/2
            out: list[int] = []
            seen = set(taken)
            while len(out) < k:
                i = self.rng.randrange(size)
                if i not in seen:
                    seen.add(i)
                    out.append(i)
            return out
        free = [i for i in range(size) if i not in taken]  # more than half taken: the space is small enough
        return self.rng.sample(free, k)

    def _successes(self) -> list[tuple[int, float]]:
        return [(i, c) for i, c in self.measured if math.isfinite(c)]


class SpaceIndex:
    """A space's configs as integers: a branch offset plus mixed-radix digits (the last knob fastest, as
    `Space.at` counts). A move changes one digit, i.e. one knob within the branch: exactly `Space.neighbors`,
    without building dicts, for the annealer's thousands of moves."""

    def __init__(self, space: Space):
        self.space = space
        self.offsets: list[int] = []
        self.radices: list[list[int]] = []
        self.strides: list[list[int]] = []
        base = 0
        for b in space.branches:
            radices = [len(v) for _, v in b]
            strides = [math.prod(radices[j + 1 :]) for j in range(len(radices))]
            self.offsets.append(base)
            self.radices.append(radices)
            self.strides.append(strides)
            base += math.prod(radices)
        self.size = base
        self._movable = [[j for j, r in enumerate(rs) if r > 1] for rs in self.radices]

    def branch(self, index: int) -> int:
        b = 0
        while b + 1 < len(self.offsets) and index >= self.offsets[b + 1]:
            b += 1
        return b

    def digits(self, index: int) -> tuple[int, list[int]]:
        b = self.branch(index)
        rest = index - self.offsets[b]
        return b, [(rest // s) % r for s, r in zip(self.strides[b], self.radices[b])]

    def random_move(self, index: int, rng: random.Random) -> int:
        """A uniformly chosen knob of the branch set to another of its values (the index itself if none can)."""
        b = self.branch(index)
        movable = self._movable[b]
        if not movable:
            return index
        j = movable[rng.randrange(len(movable))]
        r, s = self.radices[b][j], self.strides[b][j]
        d = ((index - self.offsets[b]) // s) % r
        return index + (((d + rng.randrange(1, r)) % r) - d) * s

    def neighbors(self, index: int) -> list[int]:
        b, ds = self.digits(index)
        return [
            index + (v - d) * s
            for d, r, s in zip(ds, self.radices[b], self.strides[b])
            for v in range(r)
            if v != d
        ]
