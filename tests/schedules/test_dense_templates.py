"""The dense_packed and batch_matmul templates against NumPy, lowered as fused groups through the template
registry: over a sweep of shapes (odd sizes, primes, sizes smaller than a vector) at their default configs, at
random configs from their spaces, and their steps on pinned targets; the GELU epilogue stays vectorized."""

import random
import re

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kiln.codegen.target import resolve_target
from kiln.ir import Call
from kiln.ir.ops.dense import DENSE_PACKED, MATMUL, DenseAttrs, PackedDenseAttrs, pack_dense_weight
from kiln.ir.ops.elementwise import GELU, OPS
from kiln.passes.pack_dense_weights import dense_block
from kiln.schedules.dispatch import task_of
from kiln.schedules.target_info import target_info
from kiln.schedules.workload import Group
from kiln.schedules.x86 import batch_matmul, dense_packed

from ..groups import group, lower, params, run_lowered
from ..tolerances import assert_close

AVX512, AVX2 = resolve_target("x86-avx512"), resolve_target("x86-avx2")
RUN = AVX2  # kernels that run here: AVX2 code runs on any x86-64 machine the suite runs on
ADD, MULTIPLY = OPS["add"], OPS["multiply"]


def dense_group(x_shape, units: int, block: int, epilogue: str = "none"):
    """A dense_packed group with its epilogue: none, bias, bias + GELU, or bias + a residual add."""
    k = x_shape[-1]
    shapes = [(x_shape, "float32"), ((units // block, k, block), "float32")]
    shapes += [((units,), "float32")] if epilogue != "none" else []
    shapes += [(tuple(x_shape[:-1]) + (units,), "float32")] if epilogue == "residual" else []
    ps = params(*shapes)
    y = Call(DENSE_PACKED, (ps[0], ps[1]), PackedDenseAttrs(block))
    if epilogue != "none":
        y = Call(ADD, (y, ps[2]), ADD.attrs_type())
    if epilogue == "gelu":
        y = Call(GELU, (y,), GELU.make_attrs())
    if epilogue == "residual":
        y = Call(ADD, (y, ps[3]), ADD.attrs_type())
    return group(ps, y)


def dense_inputs(x_shape, units: int, block: int, epilogue: str, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((units, x_shape[-1])).astype(np.float32)
    bias = rng.standard_normal(units).astype(np.float32)
    residual = rng.standard_normal(tuple(x_shape[:-1]) + (units,)).astype(np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64).T
    arrays = [x, pack_dense_weight(w, block)]
    if epilogue != "none":
        want, arrays = want + bias, [*arrays, bias]
    if epilogue == "gelu":
        want = GELU.reference(want, GELU.make_attrs())
    if epilogue == "residual":
        want, arrays = want + residual, [*arrays, residual]
    return arrays, want.astype(np.float32)


def matmul_group(a_shape, b_shape, epilogue: bool):
    """nn.matmul, with a scale-and-mask epilogue as attention's scores have (mask along the columns)."""
    n = b_shape[-1]
    ps = params((a_shape, "float32"), (b_shape, "float32"), *([((n,), "float32")] if epilogue else []))
    y = Call(MATMUL, (ps[0], ps[1]), DenseAttrs())
    if epilogue:
        y = Call(ADD, (Call(MULTIPLY, (y, _scalar(0.125)), MULTIPLY.attrs_type()), ps[2]),
                 ADD.attrs_type())
    return group(ps, y)


def _scalar(value: float):
    from kiln.ir import Constant

    return Constant(np.array(value, dtype=np.float32))


def matmul_inputs(a_shape, b_shape, epilogue: bool, seed: int):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    mask = rng.standard_normal(b_shape[-1]).astype(np.float32)
    want = np.matmul(a.astype(np.float64), b.astype(np.float64))
    if epilogue:
        return [a, b, mask], (want * 0.125 + mask).astype(np.float32)
    return [a, b], want.astype(np.float32)


@settings(max_examples=12, deadline=None)
@given(rows=st.tuples(st.integers(1, 2), st.integers(1, 37)), n_blocks=st.integers(1, 7),
       block=st.sampled_from([4, 8, 16]), k=st.integers(1, 70),
       epilogue=st.sampled_from(["none", "bias", "gelu", "residual"]), seed=st.integers(0, 10**6))
@example(rows=(1, 1), n_blocks=1, block=4, k=1, epilogue="none", seed=0)  # smaller than one vector
@example(rows=(1, 7), n_blocks=3, block=16, k=257, epilogue="gelu", seed=1)  # primes: nothing divides
@example(rows=(2, 24), n_blocks=6, block=16, k=48, epilogue="residual", seed=2)  # the default's wide tiles
@example(rows=(2, 17), n_blocks=1, block=4, k=1, epilogue="none", seed=0)  # tiles never span two batches
def test_dense_packed_matches_reference(rows, n_blocks, block, k, epilogue, seed):
    x_shape, units = (*rows, k), n_blocks * block
    g = lower(dense_group(x_shape, units, block, epilogue), RUN)
    assert g.template == dense_packed.TEMPLATE.key and g.config_source == "default", (g.template, g.schedule)
    arrays, want = dense_inputs(x_shape, units, block, epilogue, seed)
    assert_close(run_lowered(g, RUN, arrays), want, rtol=1e-4, atol=1e-4, what=f"seed {seed}, {g.schedule}")


DENSE_SHAPES = [((1, 24, 48), 96, 16, "gelu"), ((7, 13), 20, 4, "bias"), ((2, 5, 64), 48, 8, "residual")]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("x_shape,units,block,epilogue", DENSE_SHAPES)
def test_dense_packed_at_random_configs(x_shape, units, block, epilogue, seed):
    fn = dense_group(x_shape, units, block, epilogue)
    template, wl = task_of(fn, RUN)
    assert template is dense_packed.TEMPLATE
    cfg = template.space(wl, target_info(RUN)).sample(random.Random(seed))
    g = lower(fn, RUN, {wl.key: cfg})
    assert g.config_source == "given" and g.config == cfg, (g.config_source, g.config, cfg)
    arrays, want = dense_inputs(x_shape, units, block, epilogue, seed)
    assert_close(run_lowered(g, RUN, arrays), want, rtol=1e-4, atol=1e-4, what=f"seed {seed}, {cfg}")


@pytest.mark.parametrize("x_shape,units,epilogue", [((1, 16, 2048), 48, "gelu"), ((2, 16, 3072), 24, "residual")])
def test_a_long_reduction_on_avx2_runs_in_chunks_at_every_chunk(x_shape, units, epilogue):
    """k ≥ 2048 on AVX2: the chunked branch of the space (the default takes 256) matches the reference at every
    chunk and row tile, batches included (a column tile spans all of one batch's rows)."""
    fn = dense_group(x_shape, units, 8, epilogue)
    template, wl = task_of(fn, AVX2)
    info = target_info(AVX2)
    space = template.space(wl, info)
    assert template.default(wl, info)["k_chunk"] == 256 and template.default(wl, info) in space
    chunked = [c for c in space if c.get("k_chunk")]
    assert {c["k_chunk"] for c in chunked} == set(dense_packed.k_chunks(wl)) and "n_outer" not in chunked[0]
    arrays, want = dense_inputs(x_shape, units, 8, epilogue, seed=3)
    for cfg in random.Random(0).sample(chunked, 4) + [template.default(wl, info)]:
        g = lower(fn, AVX2, {wl.key: cfg})
        assert g.config == cfg and "k_chunk=" in g.schedule, g.schedule
        assert_close(run_lowered(g, RUN, arrays), want, rtol=1e-4, atol=1e-4, what=str(cfg))


@pytest.mark.parametrize("target,rows,k,chunks", [(AVX2, 128, 3072, [256, 384, 512, 768]), (AVX2, 128, 768, []),
                                                  (AVX2, 1, 2048, []), (AVX512, 128, 3072, [])],
                         ids=["avx2-ffn2", "avx2-short-k", "avx2-one-row", "avx512"])
def test_only_long_reductions_on_avx2_get_a_chunk_knob(target, rows, k, chunks):
    """Elsewhere the space is as before, so the records shipped for it still apply."""
    template, wl = task_of(dense_group((1, rows, k), 768, dense_block(target_info(target).lanes(32))), target)
    assert dense_packed.k_chunks(wl) == chunks
    assert ("k_chunk" in template.space(wl, target_info(target)).knobs) == bool(chunks)


@settings(max_examples=12, deadline=None)
@given(batch=st.sampled_from([(), (1,), (3,), (2, 3)]), m=st.integers(1, 29), n=st.integers(1, 70),
       k=st.integers(1, 40), epilogue=st.booleans(), seed=st.integers(0, 10**6))
@example(batch=(1, 12), m=16, n=32, k=64, epilogue=True, seed=0)  # attention, smaller
@example(batch=(2,), m=13, n=17, k=7, epilogue=False, seed=1)  # primes, no epilogue
@example(batch=(3,), m=2, n=3, k=1, epilogue=True, seed=2)  # smaller than a vector
def test_batch_matmul_matches_reference(batch, m, n, k, epilogue, seed):
    a_shape, b_shape = (*batch, m, k), (*batch, k, n)
    g = lower(matmul_group(a_shape, b_shape, epilogue), RUN)
    assert g.template == batch_matmul.TEMPLATE.key and g.config_source == "default", (g.template, g.schedule)
    arrays, want = matmul_inputs(a_shape, b_shape, epilogue, seed)
    assert_close(run_lowered(g, RUN, arrays), want, rtol=1e-4, atol=1e-4, what=f"seed {seed}, {g.schedule}")


MATMUL_SHAPES = [((2, 16, 24), (2, 24, 32), True), ((1, 5, 3), (4, 3, 16), False), ((9, 7), (7, 40), True)]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("a_shape,b_shape,epilogue", MATMUL_SHAPES)  # the second broadcasts a's batch
def test_batch_matmul_at_random_configs(a_shape, b_shape, epilogue, seed):
    fn = matmul_group(a_shape, b_shape, epilogue)
    template, wl = task_of(fn, RUN)
    assert template is batch_matmul.TEMPLATE
    cfg = template.space(wl, target_info(RUN)).sample(random.Random(seed))
    g = lower(fn, RUN, {wl.key: cfg})
    assert g.config_source == "given" and g.config == cfg, (g.config_source, g.config, cfg)
    arrays, want = matmul_inputs(a_shape, b_shape, epilogue, seed)
    assert_close(run_lowered(g, RUN, arrays), want, rtol=1e-4, atol=1e-4, what=f"seed {seed}, {cfg}")


@pytest.mark.parametrize("target", [AVX512, AVX2], ids=["avx512", "avx2"])
@pytest.mark.parametrize("x_shape,units", [((1, 128, 768), 768), ((128, 3072), 3072), ((1, 100), 1008),
                                           ((7, 13), 80), ((1, 1), 16), ((384, 64), 64)])
def test_dense_default_lies_in_the_space_and_fits_registers(x_shape, units, target):
    template, wl = task_of(dense_group(x_shape, units, 16, "bias"), target)
    info = target_info(target)
    cfg = template.default(wl, info)
    assert cfg in template.space(wl, info), cfg
    assert cfg["tile_m"] * cfg["tile_n"] * max(1, 16 // info.lanes(32)) <= dense_packed.accumulators(info.lanes(32))


@pytest.mark.parametrize("target,steps", [  # 24 of 32 zmm, 12 of 16 ymm hold accumulators
    (AVX512, ["dense_packed(m=8,n=3,k=4,n_outer,block=16)", "batch_matmul(m=8,n=2x16,k=4)"]),
    (AVX2, ["dense_packed(m=4,n=3,k=4,n_outer,block=8)", "batch_matmul(m=4,n=2x8,k=4)"]),
], ids=["avx512", "avx2"])
def test_bert_shapes_get_the_wide_tiles(target, steps):
    block = dense_block(target_info(target).lanes(32))  # as pack_dense_weights packs for the target
    ffn = lower(dense_group((1, 128, 768), 3072, block, "gelu"), target)
    scores = lower(matmul_group((1, 12, 128, 64), (1, 12, 64, 128), True), target)
    assert [ffn.schedule, scores.schedule] == steps
    down = lower(dense_group((1, 128, 3072), 768, block, "residual"), target)  # the FFN's 3072 → 768
    assert down.schedule == steps[0].replace(",n_outer", ",k_chunk=256" if block == 8 else ",n_outer")


def test_dense_gelu_epilogue_is_vectorized():
    """The FFN group of a BERT layer: erf is neither a libm call nor scalar code."""
    import tvm

    g = lower(dense_group((1, 16, 64), 96, 16, "gelu"), AVX512)
    assert g.schedule.startswith("dense_packed(m="), g.schedule
    asm = tvm.compile(tvm.IRModule({"main": g.prim_func}), target=AVX512).mod.inspect_source("asm")
    calls = set(re.findall(r"call\w*\s+\*?([\w@.]+)", asm))
    assert not {c for c in calls if "erf" in c or "exp" in c}, calls


@pytest.mark.parametrize("a_shape,b_shape", [((16,), (3, 16, 32)), ((3, 8, 16), (16,))])
def test_matrix_vector_products_are_left_to_the_generic_schedule(a_shape, b_shape):
    fn = matmul_group(a_shape, b_shape, False)
    assert not batch_matmul.TEMPLATE.applies(Group(fn))
    g = lower(fn, RUN)
    arrays, want = matmul_inputs(a_shape, b_shape, False, 0)
    assert_close(run_lowered(g, RUN, arrays), want, rtol=1e-4, atol=1e-4, what=g.schedule)


def test_a_dense_of_a_vector_is_left_to_the_generic_schedule():
    fn = dense_group((64,), 32, 16, "none")
    assert not dense_packed.TEMPLATE.applies(Group(fn))
    g = lower(fn, RUN)
    arrays, want = dense_inputs((64,), 32, 16, "none", 0)
    assert_close(run_lowered(g, RUN, arrays), want, rtol=1e-4, atol=1e-4, what=g.schedule)
