"""Search algorithms over a task's knob space: random, grid, genetic and the XGBoost cost-model tuner.

tuner = make_tuner("xgb", task.space(), seed=0, featurize=..., history=...)
while not tuner.exhausted() and tuner.trials < budget:
    configs = tuner.next_batch(16)
    tuner.update(configs, measure(configs))        # float("inf") for a failed trial
best_config, best_cost_s = tuner.best
"""

from __future__ import annotations

from kiln.schedules.space import Space

from .base import Tuner
from .genetic import GATuner
from .grid_search import GridTuner
from .random_search import RandomTuner
from .xgb_tuner import XGBTuner

TUNERS: dict[str, type[Tuner]] = {"random": RandomTuner, "grid": GridTuner, "ga": GATuner, "xgb": XGBTuner}


def make_tuner(name: str, space: Space, **kw) -> Tuner:
    """A tuner by name ("random", "grid", "ga", "xgb"); kw: seed, featurize, history, and the tuner's own."""
    if name not in TUNERS:
        raise ValueError(f"unknown tuner {name!r}; choose one of {', '.join(TUNERS)}")
    return TUNERS[name](space, **kw)


__all__ = ["TUNERS", "GATuner", "GridTuner", "RandomTuner", "Tuner", "XGBTuner", "make_tuner"]
