"""The softmax and layer-norm templates against NumPy, over a sweep of row counts and lengths (primes, rows
shorter than a vector) and at random configs from their knob spaces; and their dispatch by stage names."""

import random

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kiln.codegen.target import resolve_target
from kiln.ir.ops.norm import LAYER_NORM, LayerNormAttrs
from kiln.ir.ops.softmax import SOFTMAX, SoftmaxAttrs
from kiln.schedules.default import schedule_group
from kiln.schedules.x86 import layer_norm, softmax

from ..tolerances import assert_close

TARGET = resolve_target(None)


def run(prim_or_sch, arrays, out_shape):
    import tvm

    mod = prim_or_sch.mod if hasattr(prim_or_sch, "mod") else tvm.IRModule({"main": prim_or_sch})
    f = tvm.compile(mod, target=TARGET)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    out = tvm.runtime.empty(out_shape, "float32")
    f(*args, out)
    return out.numpy()


def softmax_want(x, axis=-1):
    xd = x.astype(np.float64)
    e = np.exp(xd - xd.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


@settings(max_examples=20, deadline=None)
@given(rows=st.lists(st.integers(1, 13), min_size=1, max_size=3), n=st.integers(1, 70),
       scale=st.sampled_from([1.0, 30.0]), seed=st.integers(0, 10**6))
@example(rows=[12, 8], n=128, scale=1.0, seed=0)  # attention scores, fewer rows
@example(rows=[3], n=1, scale=1.0, seed=1)  # a row of one: all ones
@example(rows=[5, 7], n=13, scale=30.0, seed=2)  # primes; large logits
def test_softmax_matches_reference(rows, n, scale, seed):
    from tvm import s_tir, te

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((*rows, n)) * scale).astype(np.float32)
    x.flat[::7] = -10000.0  # masked positions, as BERT's attention mask adds
    X = te.placeholder(x.shape, name="x")
    sch = s_tir.Schedule(te.create_prim_func([X, SOFTMAX.compute(X, SoftmaxAttrs(axis=len(rows)))]))
    r = random.Random(seed)
    cfg = softmax.Config(**{name: r.choice(values) for name, values in softmax.space(n).items()})
    softmax.schedule(sch, cfg)
    assert_close(run(sch, [x], x.shape), softmax_want(x), rtol=1e-5, atol=1e-6, what=f"seed {seed}, {cfg}")


@settings(max_examples=15, deadline=None)
@given(rows=st.lists(st.integers(1, 11), min_size=1, max_size=2), n=st.integers(2, 100),
       offset=st.sampled_from([0.0, 100.0]), seed=st.integers(0, 10**6))
@example(rows=[1, 16], n=768, offset=0.0, seed=0)  # BERT's hidden size, fewer rows
@example(rows=[7], n=17, offset=100.0, seed=1)  # primes; a large mean
def test_layer_norm_matches_reference(rows, n, offset, seed):
    from tvm import s_tir, te

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((*rows, n)) + offset).astype(np.float32)
    gamma, beta = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    attrs = LayerNormAttrs(axis=len(rows), epsilon=1e-5)
    X, G, B = (te.placeholder(s, name=name) for s, name in [(x.shape, "x"), ((n,), "g"), ((n,), "b")])
    sch = s_tir.Schedule(te.create_prim_func([X, G, B, LAYER_NORM.compute(X, G, B, attrs)]))
    r = random.Random(seed)
    cfg = layer_norm.Config(**{name: r.choice(values) for name, values in layer_norm.space(n).items()})
    layer_norm.schedule(sch, cfg)
    got = run(sch, [x, gamma, beta], x.shape)
    # a mean of 100 leaves fp32 about 1e-5 * 100 of absolute precision in x - mean: 1e-3 after normalizing
    tol = 1e-4 if offset == 0 else 1e-3
    want = LAYER_NORM.reference(x, gamma, beta, attrs)
    assert_close(got, want, rtol=tol, atol=tol, what=f"seed {seed}, {cfg}")


@pytest.mark.parametrize("n", [1, 7, 64, 128, 768, 1000])
def test_defaults_lie_in_the_spaces(n):
    for template in (softmax, layer_norm):
        cfg = template.default(n)
        assert cfg.lanes in template.space(n)["lanes"] and n % cfg.lanes == 0


def test_groups_are_dispatched_by_their_stages():
    from tvm import te

    avx512 = resolve_target("x86-avx512")  # the lane count is the target's, never the host's
    X = te.placeholder((2, 4, 32), name="x")
    _, how = schedule_group(te.create_prim_func([X, SOFTMAX.compute(X, SoftmaxAttrs(axis=2))]), avx512)
    assert how == "softmax(lanes=16,store_exp)"
    G, B = te.placeholder((32,), name="g"), te.placeholder((32,), name="b")
    y = LAYER_NORM.compute(X, G, B, LayerNormAttrs(axis=2))
    _, how = schedule_group(te.create_prim_func([X, G, B, y]), avx512)
    assert how == "layer_norm(lanes=16)"


def test_softmax_along_another_axis_falls_back_and_matches():
    from tvm import te

    x = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)
    X = te.placeholder(x.shape, name="x")
    scheduled, how = schedule_group(te.create_prim_func([X, SOFTMAX.compute(X, SoftmaxAttrs(axis=1))]), TARGET)
    assert not how.startswith("softmax(")
    assert_close(run(scheduled, [x], x.shape), softmax_want(x, axis=1), rtol=1e-5, atol=1e-6)


def test_layer_norm_over_two_axes_falls_back_and_matches():
    from tvm import te

    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 6)).astype(np.float32)
    gamma, beta = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((4, 6)).astype(np.float32)
    attrs = LayerNormAttrs(axis=1)
    X, G, B = te.placeholder(x.shape, name="x"), te.placeholder((4, 6), name="g"), te.placeholder((4, 6), name="b")
    scheduled, how = schedule_group(te.create_prim_func([X, G, B, LAYER_NORM.compute(X, G, B, attrs)]), TARGET)
    assert not how.startswith("layer_norm(")
    assert_close(run(scheduled, [x, gamma, beta], x.shape), LAYER_NORM.reference(x, gamma, beta, attrs),
                 rtol=1e-4, atol=1e-4)
