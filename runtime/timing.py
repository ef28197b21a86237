"""Wall-clock timing of a callable, shared by `Model.profile`, `kiln bench` and bench/."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import numpy as np


def time_ms(fn: Callable[[], object], repeat: int, warmup: int = 1) -> np.ndarray:
    """Milliseconds of `repeat` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = np.empty(repeat)
    for i in range(repeat):
        start = time.perf_counter()
        fn()
        samples[i] = time.perf_counter() - start
    return samples * 1e3


def runs_per_block(fn: Callable[[], object], at_least: int, block_s: float = 0.25, most: int = 500) -> int:
    """Calls in one timing block: `at_least`, or enough to fill `block_s` at one call's time (after a warm call).
    A block of a few runs of a fast model (2 runs of 2.5 ms) is shorter than the stretches in which a shared
    VM's neighbours take the cores, so one such stretch decided whole rounds."""
    fn()
    start = time.perf_counter()
    fn()
    one_s = max(time.perf_counter() - start, 1e-6)
    return int(min(most, max(1, at_least, math.ceil(block_s / one_s))))


def interleaved_ms(runs: Mapping[str, Callable[[], object]], per_block: int, rounds: int = 5, warmup: int = 2,
                   pause_s: float = 0.5) -> dict[str, np.ndarray]:
    """Milliseconds of each callable, timed in `rounds` alternating blocks of `per_block` calls, so that every
    engine sees the same stretch of a shared machine; the pause before each block lets the previous engine's
    spinning thread pool go idle (two pools spinning on 2 cores distort each other)."""
    samples: dict[str, list[np.ndarray]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            time.sleep(pause_s)
            samples[name].append(time_ms(fn, per_block, warmup))
    return {name: np.concatenate(v) for name, v in samples.items()}


def ratios_by_round(ms: Mapping[str, np.ndarray], rounds: int, against: str) -> dict[str, np.ndarray]:
    """Each engine's median in each round of `interleaved_ms` over `against`'s median in the same round: a
    shared machine's drift between rounds (seen at 30% within a minute) cancels in each ratio."""
    med = {name: np.median(np.asarray(v).reshape(rounds, -1), axis=1) for name, v in ms.items()}
    return {name: med[name] / med[against] for name in ms if name != against}
