"""Random search: configs drawn uniformly without replacement; the baseline every other tuner must beat."""

from __future__ import annotations

from .base import Tuner


class RandomTuner(Tuner):
    def _propose(self, n: int) -> list[int]:
        return self._random_unproposed(n)
