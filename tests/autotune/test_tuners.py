"""The search algorithms: no config proposed twice, small spaces exhausted exactly, grid order, and the xgb
tuner's claims measured on a synthetic objective (fewer trials than random; history warms a cold start)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from kiln.autotune.tuners import TUNERS, make_tuner
from kiln.autotune.tuners.base import SpaceIndex
from kiln.autotune.tuners.xgb_tuner import KnobEncoding
from kiln.schedules.space import Space

SMALL = Space.union(
    Space.of(algo="direct", tile=[1, 2, 4, 8], unroll=[False, True]),
    Space.of(algo="winograd", tile=range(1, 6)),
    Space.of(algo="im2col"),
)
SYNTH = Space.of(a=range(1, 33), b=range(1, 33), c=[False, True])


def small_cost(cfg) -> float:
    if cfg["algo"] == "winograd" and cfg["tile"] == 3:
        return float("inf")  # a failed trial
    return {"direct": 1.0, "winograd": 0.5, "im2col": 2.0}[cfg["algo"]] + abs(cfg.get("tile", 4) - 4) * 0.1


def synth_cost(cfg, shift: float = 0.0) -> float:
    """Smooth in log2 of the tiles, minimum near a=12, b=5, c=True; `shift` moves the minimum."""
    a, b = math.log2(cfg["a"]), math.log2(cfg["b"])
    return 1.0 + 0.8 * (a - 3.6 - shift) ** 2 + 0.5 * (b - 2.4 + shift) ** 2 + (0.0 if cfg["c"] else 0.4)


SYNTH_BEST = min(synth_cost(c) for c in SYNTH)


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_tuner_never_repeats_and_exhausts_a_small_space_exactly(name):
    tuner = make_tuner(name, SMALL, seed=3, min_train=4) if name == "xgb" else make_tuner(name, SMALL, seed=3)
    seen = []
    while not tuner.exhausted():
        batch = tuner.next_batch(5)
        assert batch, f"{name}: empty batch before the space is exhausted ({len(seen)} of {len(SMALL)})"
        assert all(c in SMALL for c in batch)
        seen += [SMALL.index(c) for c in batch]
        tuner.update(batch, [small_cost(c) for c in batch])
    assert sorted(seen) == list(range(len(SMALL))), f"{name}: {seen}"
    assert tuner.next_batch(5) == [] and tuner.trials == len(SMALL)
    assert tuner.best == ({"algo": "winograd", "tile": 4}, 0.5)


def test_last_batch_is_short_when_the_space_runs_out():
    tuner = make_tuner("random", SMALL, seed=0)
    sizes = [len(tuner.next_batch(4)) for _ in range(5)]
    assert sizes == [4, 4, 4, 2, 0] and tuner.exhausted()  # 14 configs: proposing counts, measuring need not


def test_grid_walks_the_space_in_order():
    tuner = make_tuner("grid", SMALL)
    got = tuner.next_batch(3) + tuner.next_batch(100)
    assert got == [SMALL.at(i) for i in range(len(SMALL))]


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_configs_replayed_through_update_are_never_proposed(name):
    """A run resumed from its log replays its records first; none of them is measured again."""
    replayed = [SMALL.at(i) for i in range(0, len(SMALL), 2)]
    tuner = make_tuner(name, SMALL, seed=1)
    tuner.update(replayed, [small_cost(c) for c in replayed])
    rest = tuner.next_batch(len(SMALL))
    assert sorted(SMALL.index(c) for c in rest) == list(range(1, len(SMALL), 2))


def test_space_index_moves_are_the_space_neighbors():
    index = SpaceIndex(SMALL)
    for i in range(len(SMALL)):
        want = sorted(SMALL.index(c) for c in SMALL.neighbors(SMALL.at(i)))
        assert sorted(index.neighbors(i)) == want, SMALL.at(i)


def test_knob_encoding_logs_ints_and_one_hots_strings():
    enc = KnobEncoding(SMALL)
    assert enc.columns == [
        "branch=0",
        "branch=1",
        "branch=2",
        "algo=direct",
        "algo=winograd",
        "algo=im2col",
        "tile",
        "unroll",
    ]
    row = enc.row(SMALL.index({"algo": "direct", "tile": 8, "unroll": True}))
    assert row.tolist() == [1, 0, 0, 1, 0, 0, math.log2(9), 1]
    assert enc.row(SMALL.index({"algo": "im2col"})).tolist() == [0, 0, 1, 0, 0, 1, 0, 0]


def test_unknown_tuner_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="random, grid, ga, xgb"):
        make_tuner("annealing", SMALL)


def trials_to_reach(tuner, budget: int = 2048, batch: int = 16, noise_seed: int = 0) -> int:
    """Trials until a config within 5% of the optimum is measured (5% multiplicative noise on costs)."""
    rng = np.random.default_rng(noise_seed)
    while not tuner.exhausted() and tuner.trials < budget:
        configs = tuner.next_batch(batch)
        true = [synth_cost(c) for c in configs]
        for k, cost in enumerate(true):
            if cost <= 1.05 * SYNTH_BEST:
                return tuner.trials + k + 1
        tuner.update(configs, [c * (1 + 0.05 * rng.standard_normal()) for c in true])
    return budget


def test_xgb_reaches_the_optimum_in_under_half_the_trials_of_random():
    assert sum(synth_cost(c) <= 1.05 * SYNTH_BEST for c in SYNTH) == 8  # 8 of 2048: random needs hundreds
    rand = [trials_to_reach(make_tuner("random", SYNTH, seed=s), noise_seed=s) for s in range(5)]
    xgb = [trials_to_reach(make_tuner("xgb", SYNTH, seed=s), noise_seed=s) for s in range(5)]
    assert np.median(xgb) <= 0.5 * np.median(rand), f"xgb {xgb} vs random {rand}"


def first_batches_best(tuner, batches: int = 2, batch: int = 16) -> float:
    best = math.inf
    for _ in range(batches):
        configs = tuner.next_batch(batch)
        costs = [synth_cost(c) for c in configs]
        best = min(best, *costs)
        tuner.update(configs, costs)
    return best


def log_tiles(cfg) -> np.ndarray:
    """A task-independent featurize for the synthetic spaces (what loop_features is for real kernels)."""
    return np.array([math.log2(cfg["a"]), math.log2(cfg["b"]), float(cfg["c"])])


@pytest.mark.parametrize("source", ["same space, knob encoding", "other space, featurize"])
def test_history_of_a_shifted_objective_warms_the_first_batches(source):
    rng = np.random.default_rng(7)
    if source == "same space, knob encoding":
        enc = KnobEncoding(SYNTH)
        picks = [SYNTH.at(int(i)) for i in rng.choice(len(SYNTH), 256, replace=False)]
        history = [(enc.row(SYNTH.index(c)), synth_cost(c, shift=0.4)) for c in picks]
        kw = {}
    else:  # another task's space: powers of two only, its records carry the shared features
        other = Space.of(a=[1, 2, 4, 8, 16, 32, 64], b=[1, 2, 4, 8, 16, 32, 64], c=[False, True])
        history = [(log_tiles(c), synth_cost(c, shift=0.4), "other-task") for c in other]
        kw = {"featurize": log_tiles}
    cold = [first_batches_best(make_tuner("xgb", SYNTH, seed=s)) - SYNTH_BEST for s in range(5)]
    warm = [
        first_batches_best(make_tuner("xgb", SYNTH, seed=s, history=history, **kw)) - SYNTH_BEST
        for s in range(5)
    ]
    # the first batches of a cold start are random; warm ones already aim at the old optimum's neighborhood
    assert np.mean(warm) <= 0.5 * np.mean(cold), f"gap to optimum: warm {warm} vs cold {cold}"


def test_history_from_another_space_needs_featurize():
    other = Space.of(x=range(4))
    history = [(KnobEncoding(other).row(i), 1.0 + i) for i in range(4)]
    with pytest.raises(ValueError, match="featurize"):
        make_tuner("xgb", SYNTH, history=history)
