"""Grid search: the space in its own order, `space.at(0)` to `space.at(len - 1)`, skipping configs already measured."""

from __future__ import annotations

from .base import Tuner


class GridTuner(Tuner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cursor = 0

    def _propose(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self._cursor not in self._proposed:
                out.append(self._cursor)
            self._cursor += 1
        return out
