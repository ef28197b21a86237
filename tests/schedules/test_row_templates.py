"""The softmax and layer-norm templates against NumPy, lowered as fused groups through the template registry:
over a sweep of row counts and lengths (primes, rows shorter than a vector) at their default configs, at random
configs from their spaces, their steps on pinned targets, and the groups they leave to the generic schedule."""

import random

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kiln.codegen.target import resolve_target
from kiln.ir.ops.norm import LAYER_NORM, LayerNormAttrs
from kiln.ir.ops.softmax import SOFTMAX, SoftmaxAttrs
from kiln.schedules.dispatch import task_of
from kiln.schedules.target_info import target_info
from kiln.schedules.workload import Group
from kiln.schedules.x86 import layer_norm, softmax

from ..groups import lower, op_group, run_lowered
from ..tolerances import assert_close

AVX512, AVX2 = resolve_target("x86-avx512"), resolve_target("x86-avx2")
RUN = AVX2  # kernels that run here: AVX2 code runs on any x86-64 machine the suite runs on


def softmax_group(shape, axis=None):
    return op_group(SOFTMAX, [(shape, "float32")], SoftmaxAttrs(axis=len(shape) - 1 if axis is None else axis))


def layer_norm_group(shape, axis=None):
    axis = len(shape) - 1 if axis is None else axis
    normed = tuple(shape[axis:])
    return op_group(LAYER_NORM, [(shape, "float32"), (normed, "float32"), (normed, "float32")],
                    LayerNormAttrs(axis=axis, epsilon=1e-5))


def softmax_inputs(shape, scale: float, seed: int, axis: int = -1):
    x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
    x.flat[::7] = -10000.0  # masked positions, as BERT's attention mask adds
    xd = x.astype(np.float64)
    e = np.exp(xd - xd.max(axis=axis, keepdims=True))
    return [x], (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def layer_norm_inputs(shape, offset: float, seed: int, axis: int = -1):
    rng = np.random.default_rng(seed)
    axis = axis % len(shape)
    x = (rng.standard_normal(shape) + offset).astype(np.float32)
    gamma = rng.standard_normal(shape[axis:]).astype(np.float32)
    beta = rng.standard_normal(shape[axis:]).astype(np.float32)
    return [x, gamma, beta], LAYER_NORM.reference(x, gamma, beta, LayerNormAttrs(axis=axis, epsilon=1e-5))


@settings(max_examples=12, deadline=None)
@given(rows=st.lists(st.integers(1, 13), min_size=1, max_size=3), n=st.integers(1, 70),
       scale=st.sampled_from([1.0, 30.0]), seed=st.integers(0, 10**6))
@example(rows=[12, 8], n=128, scale=1.0, seed=0)  # attention scores, fewer rows
@example(rows=[3], n=1, scale=1.0, seed=1)  # a row of one: all ones
@example(rows=[5, 7], n=13, scale=30.0, seed=2)  # primes; large logits
def test_softmax_matches_reference(rows, n, scale, seed):
    shape = (*rows, n)
    g = lower(softmax_group(shape), RUN)
    assert g.template == softmax.TEMPLATE.key and g.config_source == "default", (g.template, g.schedule)
    arrays, want = softmax_inputs(shape, scale, seed)
    assert_close(run_lowered(g, RUN, arrays), want, rtol=1e-5, atol=1e-6, what=f"seed {seed}, {g.schedule}")


@settings(max_examples=10, deadline=None)
@given(rows=st.lists(st.integers(1, 11), min_size=1, max_size=2), n=st.integers(2, 100),
       offset=st.sampled_from([0.0, 100.0]), seed=st.integers(0, 10**6))
@example(rows=[1, 16], n=768, offset=0.0, seed=0)  # BERT's hidden size, fewer rows
@example(rows=[7], n=17, offset=100.0, seed=1)  # primes; a large mean
def test_layer_norm_matches_reference(rows, n, offset, seed):
    shape = (*rows, n)
    g = lower(layer_norm_group(shape), RUN)
    assert g.template == layer_norm.TEMPLATE.key and g.config_source == "default", (g.template, g.schedule)
    arrays, want = layer_norm_inputs(shape, offset, seed)
    # a mean of 100 leaves fp32 about 1e-5 * 100 of absolute precision in x - mean: 1e-3 after normalizing
    tol = 1e-4 if offset == 0 else 1e-3
    assert_close(run_lowered(g, RUN, arrays), want, rtol=tol, atol=tol, what=f"seed {seed}, {g.schedule}")


ROW_SHAPES = [(4, 96), (3, 5, 13), (2, 64)]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("template", [softmax.TEMPLATE, layer_norm.TEMPLATE], ids=["softmax", "layer_norm"])
def test_row_templates_at_random_configs(template, shape, seed):
    is_softmax = template is softmax.TEMPLATE
    fn = softmax_group(shape) if is_softmax else layer_norm_group(shape)
    found, wl = task_of(fn, RUN)
    assert found is template
    cfg = template.space(wl, target_info(RUN)).sample(random.Random(seed))
    g = lower(fn, RUN, {wl.key: cfg})
    assert g.config_source == "given" and g.config == cfg, (g.config_source, g.config, cfg)
    arrays, want = softmax_inputs(shape, 1.0, seed) if is_softmax else layer_norm_inputs(shape, 0.0, seed)
    assert_close(run_lowered(g, RUN, arrays), want, rtol=1e-4, atol=1e-5, what=f"seed {seed}, {cfg}")


@pytest.mark.parametrize("n", [1, 7, 64, 128, 768, 1000])
@pytest.mark.parametrize("target", [AVX512, AVX2], ids=["avx512", "avx2"])
def test_defaults_lie_in_the_spaces(n, target):
    info = target_info(target)
    for fn in (softmax_group((3, n)), layer_norm_group((3, n))):
        template, wl = task_of(fn, target)
        cfg = template.default(wl, info)
        widest = info.lanes(32) * (4 if template is softmax.TEMPLATE else 1)  # softmax: up to 4 vectors
        assert cfg in template.space(wl, info) and n % cfg["lanes"] == 0 and cfg["lanes"] <= widest, cfg


@pytest.mark.parametrize("target,lanes", [(AVX512, 16), (AVX2, 8)], ids=["avx512", "avx2"])
def test_groups_are_dispatched_by_their_stages(target, lanes):
    """The lane count is the target's, never the host's (softmax takes four vectors where they divide the row)."""
    assert lower(softmax_group((2, 4, 128)), target).schedule == f"softmax(lanes={4 * lanes},store_exp)"
    assert lower(layer_norm_group((2, 4, 32)), target).schedule == f"layer_norm(lanes={lanes})"


def test_softmax_along_another_axis_is_left_to_the_generic_schedule():
    fn = softmax_group((3, 5, 4), axis=1)
    assert not softmax.TEMPLATE.applies(Group(fn))
    g = lower(fn, RUN)
    arrays, want = softmax_inputs((3, 5, 4), 1.0, 0, axis=1)
    assert_close(run_lowered(g, RUN, arrays), want, rtol=1e-5, atol=1e-6, what=g.schedule)


def test_layer_norm_over_two_axes_is_left_to_the_generic_schedule():
    fn = layer_norm_group((3, 4, 6), axis=1)
    assert not layer_norm.TEMPLATE.applies(Group(fn))
    g = lower(fn, RUN)
    arrays, want = layer_norm_inputs((3, 4, 6), 0.0, 1, axis=1)
    assert_close(run_lowered(g, RUN, arrays), want, rtol=1e-4, atol=1e-4, what=g.schedule)


@pytest.mark.parametrize("template,fn", [(softmax.TEMPLATE, softmax_group((7,))),
                                         (layer_norm.TEMPLATE, layer_norm_group((7,)))], ids=["softmax", "layer_norm"])
def test_a_single_row_without_row_dims_is_left_to_the_generic_schedule(template, fn):
    assert not template.applies(Group(fn))
