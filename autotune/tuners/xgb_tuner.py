"""The model-based tuner, in the AutoTVM style: an XGBoost ranking model over config features picks what to
measure next.

- Features: every knob encoded as numbers (`KnobEncoding`: an int as sign·log2(1+|v|), a bool as 0/1, a string
  one-hot per value, the branch one-hot), plus `featurize(cfg)` appended when given (for a real task,
  `lambda cfg: loop_features(task.lower(cfg).prim_func, task.target)` from autotune/features.py).
- Model: `RankModel` (cost_model.py), trained once `min_train` configs have succeeded and retrained before every
  batch that follows new measurements. Until then batches are random.
- Search: simulated annealing over the model's scores, `chains` parallel chains started from the best measured
  configs and from random ones, each step a move to a random neighbor (one knob changed within its branch, as
  `Space.neighbors`), accepted when it scores higher or with probability exp(Δ/T), T cooling linearly to 0 over
  `steps`. The batch is the best-scoring configs the chains visited that were never proposed, except a fraction
  `epsilon` drawn at random (epsilon-greedy), so a wrong model cannot keep the search away from a region.
- Transfer: `history` is (feature vector, cost_s[, group]) records of other tasks. The model then trains on it
  before the first batch (so the first batch is model-guided already), and the task's own measurements join as
  their own group, `own_weight` times heavier. History vectors must mean what this task's vectors mean, so with
  history the features are `featurize(cfg)` alone (task-independent loop features); knob encodings are not
  comparable across spaces. Without `featurize`, history must come from this same space (its knob encoding).
  Records are grouped by their third element (a task key) so costs of different tasks are never compared.

Cost: each batch evaluates at most `chains`·(`steps`+1) distinct configs, and `featurize` runs once per distinct
config visited (cached): keep `chains`·`steps` modest when `featurize` lowers a kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from kiln.schedules.space import Space

from .base import Featurize, HistoryRecord, SpaceIndex, Tuner
from .cost_model import RankModel


class KnobEncoding:
    """Numeric columns for a space's configs: fixed per space, so any two configs' vectors line up."""

    def __init__(self, space: Space):
        self.index = SpaceIndex(space)
        self.columns: list[str] = []
        if len(space.branches) > 1:
            self.columns += [f"branch={b}" for b in range(len(space.branches))]
        where: dict[tuple[str, object], int] = {}
        for name in space.knobs:
            values = [v for b in space.branches for n, vs in b if n == name for v in vs]
            if any(not isinstance(v, str) for v in values):
                where[(name, None)] = len(self.columns)
                self.columns.append(name)
            for v in dict.fromkeys(v for v in values if isinstance(v, str)):
                where[(name, v)] = len(self.columns)
                self.columns.append(f"{name}={v}")
        # per branch, per knob, per value: (column, number) to write
        self._cells = [[[_cell(where, name, v) for v in vs] for name, vs in b] for b in space.branches]
        self._branch_column = len(space.branches) > 1

    def __len__(self) -> int:
        return len(self.columns)

    def row(self, index: int) -> np.ndarray:
        b, digits = self.index.digits(index)
        out = np.zeros(len(self.columns))
        if self._branch_column:
            out[b] = 1.0
        for cells, d in zip(self._cells[b], digits):
            col, value = cells[d]
            out[col] = value
        return out


def _cell(where: dict, name: str, v) -> tuple[int, float]:
    if isinstance(v, str):
        return where[(name, v)], 1.0
    return where[(name, None)], float(v) if isinstance(v, bool) else math.copysign(math.log2(1 + abs(v)), v)


class XGBTuner(Tuner):
    def __init__(
        self,
        space: Space,
        seed: int = 0,
        featurize: Featurize | None = None,
        history: Sequence[HistoryRecord] | None = None,
        *,
        min_train: int = 8,
        epsilon: float = 0.05,
        chains: int = 64,
        steps: int = 60,
        rounds: int = 80,
        own_weight: float = 4.0,
    ):
        super().__init__(space, seed, featurize, history)
        self.min_train, self.epsilon, self.chains, self.steps = min_train, epsilon, chains, steps
        self.own_weight = own_weight
        self.encoding = KnobEncoding(space)
        self.index = self.encoding.index
        self.model = RankModel(rounds=rounds, seed=seed)
        self._features: dict[int, np.ndarray] = {}
        self._trained_on = -1  # len(self.measured) at the last fit
        self._fitted = False
        self._history_groups = _history_groups(self.history or [])
        if self._history_groups and featurize is None:
            width = {x.shape[1] for x, _ in self._history_groups.values()}
            if width != {len(self.encoding)}:
                raise ValueError(
                    f"history vectors have {sorted(width)} features but this space's knob encoding "
                    f"has {len(self.encoding)}; pass featurize= (loop_features) for other tasks' records"
                )

    def features(self, index: int) -> np.ndarray:
        f = self._features.get(index)
        if f is None:
            parts = [] if self._history_groups and self.featurize else [self.encoding.row(index)]
            if self.featurize is not None:
                parts.append(np.asarray(self.featurize(self.space.at(index)), dtype=np.float64).ravel())
            f = self._features[index] = np.concatenate(parts)
        return f

    def _propose(self, n: int) -> list[int]:
        if not self._train():
            return self._random_unproposed(n)
        n_random = int(self.epsilon * n) + (self.rng.random() < (self.epsilon * n) % 1)
        picks = self._anneal(n - n_random)
        return picks + self._random_unproposed(n - len(picks), set(picks))

    def _train(self) -> bool:
        if self._trained_on == len(self.measured):
            return self._fitted
        self._trained_on = len(self.measured)
        groups = [(x, costs, 1.0) for x, costs in self._history_groups.values()]
        if len(self._successes()) >= (2 if groups else self.min_train):
            own = np.stack([self.features(i) for i, _ in self.measured])
            groups.append((own, [c for _, c in self.measured], self.own_weight))
        self._fitted = self.model.fit(groups) if groups else False
        return self._fitted

    def _score(self, indices: Sequence[int]) -> np.ndarray:
        return self.model.predict(np.stack([self.features(i) for i in indices]))

    def _anneal(self, k: int) -> list[int]:
        """The k best-scoring unproposed configs the chains visit (fewer if they visit fewer)."""
        if k <= 0:
            return []
        best_first = sorted(self._successes(), key=lambda ic: ic[1])
        starts = list(dict.fromkeys(i for i, _ in best_first))[: self.chains // 2]
        starts += [self.rng.randrange(self.index.size) for _ in range(self.chains - len(starts))]
        cur = starts
        cur_s = self._score(cur)
        seen = dict(zip(cur, cur_s))
        scale = (
            float(np.std(cur_s)) or 1.0
        )  # ranking scores have no unit: temperature relative to their spread
        for step in range(self.steps):
            temp = scale * (1 - step / self.steps)
            new = [self.index.random_move(i, self.rng) for i in cur]
            new_s = self._score(new)
            seen.update(zip(new, new_s))
            for c in range(len(cur)):
                delta = new_s[c] - cur_s[c]
                if delta >= 0 or self.rng.random() < math.exp(delta / temp):
                    cur[c], cur_s[c] = new[c], new_s[c]
        fresh = [(s, i) for i, s in seen.items() if i not in self._proposed]
        fresh.sort(key=lambda si: (-si[0], si[1]))
        return [i for _, i in fresh[:k]]


def _history_groups(history: Sequence[HistoryRecord]) -> dict[object, tuple[np.ndarray, list[float]]]:
    rows: dict[object, tuple[list[np.ndarray], list[float]]] = {}
    for rec in history:
        vec, cost = rec[0], rec[1]
        key = rec[2] if len(rec) > 2 else None
        xs, cs = rows.setdefault(key, ([], []))
        xs.append(np.asarray(vec, dtype=np.float64).ravel())
        cs.append(float(cost))
    return {k: (np.stack(xs), cs) for k, (xs, cs) in rows.items()}
