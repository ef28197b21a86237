"""loop_features of real scheduled kernels: one length for every kernel (so records of other tasks train the
model), and different vectors for different configs of one template (so the model can tell them apart)."""

from __future__ import annotations

import numpy as np
import pytest
from kiln.autotune.features import LENGTH, loop_features
from kiln.autotune.tuners import make_tuner
from kiln.codegen.target import resolve_target
from kiln.ir.ops import conv as cv
from kiln.ir.ops.dense import DENSE
from kiln.schedules.dispatch import task_of
from kiln.schedules.target_info import target_info

from tests.groups import lower, op_group

TARGET = "x86-avx512"


@pytest.fixture(scope="module")
def target():
    return resolve_target(TARGET)


def dense_group():
    return op_group(DENSE, [((8, 64), "float32"), ((32, 64), "float32")])


def conv_group():
    attrs = cv.ConvAttrs(strides=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1))
    return op_group(cv.CONV_BY_RANK[2], [((1, 16, 14, 14), "float32"), ((16, 16, 3, 3), "float32")], attrs)


def test_two_different_kernels_give_vectors_of_one_length(target):
    dense, conv = (loop_features(lower(g, target).prim_func, target) for g in (dense_group(), conv_group()))
    assert dense.shape == conv.shape == (LENGTH,)
    assert np.isfinite(dense).all() and np.isfinite(conv).all()
    assert not np.array_equal(dense, conv)


def conv_task(target):
    fn = conv_group()
    template, wl = task_of(fn, target)
    return fn, template, wl, template.space(wl, target_info(target))


def test_configs_of_one_template_give_different_vectors(target):
    fn, template, wl, space = conv_task(target)
    assert len(space) > 1, f"{template.name} has no knobs for {wl.key}: pick a tunable conv"
    vectors = {}
    for cfg in space:
        g = lower(fn, target, {wl.key: cfg})
        assert g.config == cfg, f"{template.name} fell back from {cfg}"
        vectors[tuple(sorted(cfg.items()))] = loop_features(g.prim_func, target)
    distinct = {v.tobytes() for v in vectors.values()}
    assert len(distinct) == len(vectors), (
        f"{len(vectors)} configs of {template.name}, {len(distinct)} vectors"
    )


def test_xgb_tuner_runs_on_loop_features_of_a_real_task(target):
    """The featurize the tuning loop passes: lower the config, take its loop features."""
    fn, _, wl, space = conv_task(target)
    lowered = []

    def featurize(cfg):
        lowered.append(cfg)
        return loop_features(lower(fn, target, {wl.key: cfg}).prim_func, target)

    tuner = make_tuner("xgb", space, seed=0, featurize=featurize, min_train=4, chains=8, steps=4)
    first = tuner.next_batch(6)
    tuner.update(first, [1.0 + i for i in range(len(first))])  # fake costs: the model only needs an order
    second = tuner.next_batch(4)
    assert tuner.model.booster is not None, "the second batch should come from the trained model"
    assert (
        len(tuner.features(space.index(second[0]))) == len(tuner.encoding) + LENGTH
    )  # knobs + loop features
    assert len(lowered) == len(
        {tuple(sorted(c.items())) for c in lowered}
    )  # each config lowered once (cached)
    assert not {space.index(c) for c in first} & {space.index(c) for c in second}
