"""The learned cost model of the xgb tuner: an XGBoost ranker that orders configs by predicted speed.

It is trained on groups of measured configs, one group per task (costs of different tasks are never compared):
a config's label is its group's best cost over its own cost (1 for the fastest, towards 0 for slow ones, 0 for
a failed trial), as AutoTVM normalized throughput. The `rank:pairwise` objective learns only the order within
a group, which is all the search needs, and is why records of other tasks can train it at all. A group's weight
says how much its pairs count (the task being tuned outweighs history).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import xgboost as xgb

# AutoTVM's XGBoost settings for its ranking model, with fewer rounds: a few hundred rows train in ~30 ms
PARAMS = {
    "objective": "rank:pairwise",
    "max_depth": 3,
    "eta": 0.3,
    "gamma": 1e-4,
    "min_child_weight": 1,
    "lambda": 1.0,
    "alpha": 0.0,
    "nthread": 1,
    "verbosity": 0,
}


def labels(costs_s: Sequence[float]) -> np.ndarray:
    """best / cost for each success, 0 for each failure."""
    costs = np.asarray(costs_s, dtype=np.float64)
    ok = np.isfinite(costs) & (costs > 0)
    if not ok.any():
        return np.zeros_like(costs)
    return np.where(ok, costs[ok].min() / np.where(ok, costs, 1.0), 0.0)


class RankModel:
    def __init__(self, rounds: int = 80, seed: int = 0):
        self.rounds, self.seed = rounds, seed
        self.booster: xgb.Booster | None = None

    def fit(self, groups: Sequence[tuple[np.ndarray, Sequence[float], float]]) -> bool:
        """Train on (features, costs_s, weight) groups; groups whose configs all tie teach no order and are
        left out. False (and no model) when none is left."""
        xs, ys, qid, weights = [], [], [], []
        for features, costs, weight in groups:
            y = labels(costs)
            if len(y) < 2 or np.ptp(y) == 0 or not math.isfinite(weight) or weight <= 0:
                continue
            xs.append(np.asarray(features, dtype=np.float64))
            ys.append(y)
            qid.append(np.full(len(y), len(weights)))
            weights.append(float(weight))
        if not xs:
            self.booster = None
            return False
        data = xgb.DMatrix(np.vstack(xs), label=np.concatenate(ys), qid=np.concatenate(qid))
        data.set_weight(np.asarray(weights))  # ranking: one weight per group
        self.booster = xgb.train({**PARAMS, "seed": self.seed}, data, self.rounds)
        return True

    def predict(self, features: np.ndarray) -> np.ndarray:
        """A score per row: higher means predicted faster (only the order means anything)."""
        if self.booster is None:
            raise RuntimeError("RankModel.predict before a successful fit")
        return np.asarray(self.booster.inplace_predict(np.asarray(features, dtype=np.float64)))
