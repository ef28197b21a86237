"""The dense_packed and batch_matmul templates against NumPy, over a sweep of shapes (odd sizes, primes, sizes
smaller than a vector) and at random configs from their knob spaces; the GELU epilogue stays vectorized."""

import random
import re

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kiln.codegen.target import resolve_target
from kiln.ir.ops.dense import DENSE_PACKED, MATMUL, DenseAttrs, PackedDenseAttrs, pack_dense_weight
from kiln.ir.ops.elementwise import GELU
from kiln.schedules.default import schedule_group
from kiln.schedules.x86 import batch_matmul, dense_packed

from ..tolerances import assert_close

TARGET = resolve_target(None)  # the host: AVX-512 code on the machines we test on


def sample(space: dict, seed: int) -> dict:
    r = random.Random(seed)
    return {name: r.choice(values) for name, values in space.items()}


def compile_and_run(sch, arrays, out_shape):
    import tvm

    f = tvm.compile(sch.mod, target=TARGET)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]  # aligned, as the runtime's are
    out = tvm.runtime.empty(out_shape, "float32")
    f(*args, out)
    return out.numpy()


def dense_group(x_shape, wp_shape, block: int, epilogue: str):
    """(placeholders, output) of a dense_packed group with its epilogue: none, bias, or bias + GELU."""
    from tvm import te

    X, W = te.placeholder(x_shape, name="x"), te.placeholder(wp_shape, name="w")
    y = DENSE_PACKED.compute(X, W, PackedDenseAttrs(block))
    if epilogue == "none":
        return [X, W], y
    B = te.placeholder((y.shape[-1],), name="bias")
    biased = te.compute(y.shape, lambda *i: y(*i) + B[i[-1]], name="add")
    out = biased if epilogue == "bias" else GELU.compute(biased, GELU.make_attrs())
    return [X, W, B], out


def dense_want(x, w, bias, epilogue: str):
    y = x.astype(np.float64) @ w.astype(np.float64).T
    if epilogue != "none":
        y = y + bias
    return GELU.reference(y, GELU.make_attrs()) if epilogue == "gelu" else y


@settings(max_examples=20, deadline=None)
@given(rows=st.tuples(st.integers(1, 2), st.integers(1, 37)), n_blocks=st.integers(1, 7),
       block=st.sampled_from([4, 8, 16]), k=st.integers(1, 70), epilogue=st.sampled_from(["none", "bias", "gelu"]),
       seed=st.integers(0, 10**6))
@example(rows=(1, 1), n_blocks=1, block=4, k=1, epilogue="none", seed=0)  # smaller than one vector
@example(rows=(1, 7), n_blocks=3, block=16, k=257, epilogue="gelu", seed=1)  # primes: nothing divides
@example(rows=(2, 24), n_blocks=6, block=16, k=48, epilogue="bias", seed=2)  # the default's 8x3 tiles
@example(rows=(2, 17), n_blocks=1, block=4, k=1, epilogue="none", seed=0)  # tiles never span two batches
def test_dense_packed_matches_reference(rows, n_blocks, block, k, epilogue, seed):
    from tvm import s_tir, te

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*rows, k)).astype(np.float32)
    w = rng.standard_normal((n_blocks * block, k)).astype(np.float32)
    bias = rng.standard_normal(n_blocks * block).astype(np.float32)
    wp = pack_dense_weight(w, block)
    params, out = dense_group(x.shape, wp.shape, block, epilogue)
    cfg = dense_packed.Config(**sample(dense_packed.space(rows[1], n_blocks, k), seed))
    sch = s_tir.Schedule(te.create_prim_func([*params, out]))
    dense = sch.get_sblock("dense_packed")
    for b in sch.get_child_blocks(sch.get_sblock("root"))[:-1]:
        if not sch.get(b).same_as(sch.get(dense)):
            sch.compute_inline(b)
    dense_packed.schedule(sch, dense, sch.get_child_blocks(sch.get_sblock("root"))[-1], block, cfg)
    got = compile_and_run(sch, [x, wp, bias][:len(params)], tuple(rows) + (n_blocks * block,))
    assert_close(got, dense_want(x, w, bias, epilogue).astype(np.float32), rtol=1e-4, atol=1e-4,
                 what=f"seed {seed}, {cfg}")


@settings(max_examples=20, deadline=None)
@given(batch=st.sampled_from([(), (1,), (3,), (2, 3)]), m=st.integers(1, 29), n=st.integers(1, 70),
       k=st.integers(1, 40), broadcast_a=st.booleans(), epilogue=st.booleans(), seed=st.integers(0, 10**6))
@example(batch=(1, 12), m=16, n=32, k=64, broadcast_a=False, epilogue=True, seed=0)  # attention, smaller
@example(batch=(2,), m=13, n=17, k=7, broadcast_a=False, epilogue=False, seed=1)  # primes
@example(batch=(3,), m=2, n=3, k=1, broadcast_a=True, epilogue=True, seed=2)  # smaller than a vector
def test_batch_matmul_matches_reference(batch, m, n, k, broadcast_a, epilogue, seed):
    from tvm import s_tir, te

    rng = np.random.default_rng(seed)
    a = rng.standard_normal(((1,) * len(batch) if broadcast_a else batch) + (m, k)).astype(np.float32)
    b = rng.standard_normal(batch + (k, n)).astype(np.float32)
    mask = rng.standard_normal(n).astype(np.float32)
    A, B, M = te.placeholder(a.shape, name="a"), te.placeholder(b.shape, name="b"), te.placeholder((n,), name="m")
    y = MATMUL.compute(A, B, DenseAttrs())
    out = te.compute(y.shape, lambda *i: y(*i) * 0.125 + M[i[-1]], name="scale_mask") if epilogue else y
    sch = s_tir.Schedule(te.create_prim_func([A, B, M, out] if epilogue else [A, B, out]))
    for blk in sch.get_child_blocks(sch.get_sblock("root"))[:-1]:
        if sch.get(blk).name_hint != "matmul":
            sch.compute_inline(blk)
    cfg = batch_matmul.Config(**sample(batch_matmul.space(m, n, k, lanes=16), seed))
    batch_matmul.schedule(sch, sch.get_sblock("matmul"), sch.get_child_blocks(sch.get_sblock("root"))[-1], cfg)
    got = compile_and_run(sch, [a, b, mask] if epilogue else [a, b], batch + (m, n))
    want = np.matmul(a.astype(np.float64), b.astype(np.float64))
    if epilogue:
        want = want * 0.125 + mask
    assert_close(got, want.astype(np.float32), rtol=1e-4, atol=1e-4, what=f"seed {seed}, {cfg}")


@pytest.mark.parametrize("lanes", [16, 8, 4])  # AVX-512, AVX2, NEON
@pytest.mark.parametrize("rows,n_blocks,k", [(128, 48, 768), (128, 192, 3072), (1, 63, 100), (7, 5, 13),
                                             (1, 1, 1), (384, 4, 64)])
def test_dense_default_lies_in_the_space_and_fits_registers(rows, n_blocks, k, lanes):
    cfg = dense_packed.default(rows, n_blocks, k, lanes=lanes, block=16)
    space = dense_packed.space(rows, n_blocks, k)
    assert all(getattr(cfg, name) in values for name, values in space.items()), cfg
    assert cfg.tile_m * cfg.tile_n * (16 // lanes) <= dense_packed.accumulators(lanes)


def test_bert_shapes_get_the_wide_tiles():
    assert dense_packed.default(128, 48, 768) == dense_packed.Config(tile_m=8, tile_n=3, unroll_k=4)
    assert dense_packed.default(128, 48, 768, lanes=8) == dense_packed.Config(tile_m=4, tile_n=1, unroll_k=4)
    cfg = batch_matmul.default(128, 64, 128, lanes=16, batches=12)
    assert cfg.lanes == 16 and cfg.tile_m * cfg.tile_n >= 12


@pytest.mark.parametrize("m,n,k,batches", [(128, 128, 64, 12), (128, 64, 128, 12), (5, 7, 3, 1), (1, 1, 1, 4)])
def test_batch_matmul_default_lies_in_the_space(m, n, k, batches):
    cfg = batch_matmul.default(m, n, k, lanes=16, batches=batches)
    space = batch_matmul.space(m, n, k, lanes=16)
    assert all(getattr(cfg, name) in values for name, values in space.items()), cfg


def test_dense_gelu_group_is_dispatched_and_its_epilogue_vectorized():
    """The FFN group of a BERT layer: the template applies and erf is neither a libm call nor scalar code."""
    import tvm
    from tvm import te

    params, out = dense_group((1, 16, 64), (6, 64, 16), 16, "gelu")
    prim = te.create_prim_func([*params, out])
    scheduled, how = schedule_group(prim, TARGET, ("nn.dense_packed", PackedDenseAttrs(16)))
    assert how.startswith("dense_packed(m="), how
    asm = tvm.compile(tvm.IRModule({"main": scheduled}), target=TARGET).mod.inspect_source("asm")
    calls = set(re.findall(r"call\w*\s+\*?([\w@.]+)", asm))
    assert not {c for c in calls if "erf" in c or "exp" in c}, calls


def test_matmul_group_is_dispatched():
    from tvm import te

    A, B = te.placeholder((1, 4, 32, 16), name="a"), te.placeholder((1, 4, 16, 32), name="b")
    y = MATMUL.compute(A, B, DenseAttrs())
    _, how = schedule_group(te.create_prim_func([A, B, y]), TARGET, ("nn.matmul", DenseAttrs()))
    assert how.startswith("batch_matmul("), how
