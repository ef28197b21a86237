"""Computes of gathers, scatters, pads, scans, depth/space, one-hot, triangles, quantization, activations, matmul
with 1-D operands and einsum (issue 12: every op the interpreter runs also compiles). Each op's TE compute is
scheduled by the default schedule for a pinned x86 target, compiled, and compared with the op's NumPy reference
on odd shapes; injective ops must come out parallel and vectorized, not naive."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from kiln.codegen.target import resolve_target
from kiln.ir.ops import dense as dn
from kiln.ir.ops import elementwise as ew
from kiln.ir.ops import transform as tf
from tests.groups import schedule_op
from tvm import te

TARGET = resolve_target("x86-avx2")
rng = np.random.default_rng(0)


def run(op, args, attrs, *, variadic=False, rtol=1e-5, atol=1e-6):
    """Compile op.compute on `args` (NumPy arrays), run it, compare with op.reference; the schedule's steps."""
    scheduled, steps = schedule_op(op, args, attrs, TARGET, variadic)
    ex = tvm.compile(tvm.IRModule({"main": scheduled}), target=TARGET)
    want = op.reference(list(args), attrs) if variadic else op.reference(*args, attrs)
    dev = tvm.cpu()
    got = tvm.runtime.empty(want.shape, str(want.dtype), dev)
    ex["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in args], got)
    if want.dtype.kind == "f":
        np.testing.assert_allclose(got.numpy(), want, rtol=rtol, atol=atol, equal_nan=True)
    else:
        np.testing.assert_array_equal(got.numpy(), want)
    return steps


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def injective(steps):
    assert "parallel" in steps and "vectorize" in steps, steps


# --- gathers ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [0, 1, 2])
def test_gather_elements(axis):
    x = f32(5, 7, 9)
    shape = list(x.shape)
    shape[axis] = 3
    i = rng.integers(-x.shape[axis], x.shape[axis], shape).astype(np.int64)
    run(tf.GATHER_ELEMENTS, [x, i], tf.AxisAttrs(axis))


@pytest.mark.parametrize("batch_dims,ishape", [(0, (3, 5, 2)), (0, (4, 3)), (1, (5, 6, 1)), (2, (5, 7, 1))])
def test_gather_nd(batch_dims, ishape):
    x = f32(5, 7, 33)
    k = ishape[-1]
    dims = x.shape[batch_dims:batch_dims + k]
    i = np.stack([rng.integers(-d, d, ishape[:-1]) for d in dims], axis=-1).astype(np.int64)
    if batch_dims:
        i = np.broadcast_to(i[:1], ishape).copy() if ishape[0] != x.shape[0] else i
    run(tf.GATHER_ND, [x, i], tf.GatherNDAttrs(batch_dims))


# --- scatters --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
@pytest.mark.parametrize("axis", [0, 2])
def test_scatter_elements(reduction, axis):
    x = f32(4, 5, 7)
    shape = [3, 4, 5]
    i = rng.integers(-x.shape[axis], x.shape[axis], shape).astype(np.int64)  # duplicates, negatives
    u = f32(*shape)
    if reduction in ("max", "min"):
        x[0, 0, 0] = u[1, 1, 1] = np.nan
    steps = run(tf.SCATTER_ELEMENTS, [x, i, u], tf.ScatterAttrs(axis, reduction))
    assert steps.startswith("extern+vectorized(1 of 1"), steps  # the copy of the data; the updates stay scalar


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter_nd(reduction):
    x = f32(6, 5, 9)
    i = np.array([[[1, -2], [3, 0]], [[1, 3], [5, 4]], [[0, 0], [1, -2]]], np.int64)  # duplicate rows
    u = f32(3, 2, 9)
    run(tf.SCATTER_ND, [x, i, u], tf.ScatterAttrs(0, reduction))


# --- tile, pad, depth/space ------------------------------------------------------------------------------------

def test_tile():
    injective(run(tf.TILE, [f32(3, 5, 7)], tf.TileAttrs((2, 1, 3))))


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("pads", [((1, 2), (3, 0), (2, 5)), ((0, 0), (-1, 2), (4, -3)), ((0, 0), (8, 9), (1, 1))])
def test_pad(mode, pads):
    x = f32(2, 5, 7)
    if mode == "reflect" and any(max(b, e) >= n for (b, e), n in zip(pads, x.shape)):
        pads = tuple((min(b, n - 1), min(e, n - 1)) for (b, e), n in zip(pads, x.shape))
    injective(run(tf.PAD, [x], tf.PadAttrs(pads, mode, 1.5)))


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space_and_back(mode):
    injective(run(tf.DEPTH_TO_SPACE, [f32(2, 27, 5, 7)], tf.BlockAttrs(3, mode)))
    injective(run(tf.SPACE_TO_DEPTH, [f32(2, 3, 15, 21)], tf.BlockAttrs(3, mode)))


# --- scans -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", [tf.CUMSUM, tf.CUMPROD])
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("exclusive,reverse", [(False, False), (True, False), (False, True), (True, True)])
def test_scans(op, axis, exclusive, reverse):
    x = (rng.random((3, 9, 5)) + 0.5).astype(np.float32)
    run(op, [x], tf.CumsumAttrs(axis, exclusive, reverse), rtol=1e-4)
    run(op, [rng.integers(-3, 4, (3, 9, 5)).astype(np.int32)], tf.CumsumAttrs(axis, exclusive, reverse))


# --- one-hot, trilu, reverse_sequence --------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_one_hot(axis):
    i = rng.integers(-12, 12, (5, 7)).astype(np.int64)  # negatives and out-of-range
    run(tf.ONE_HOT, [i, np.array([-1.0, 3.0], np.float32)], tf.OneHotAttrs(10, axis))


@pytest.mark.parametrize("upper", [True, False])
@pytest.mark.parametrize("k", [-2, 0, 3])
def test_trilu(upper, k):
    injective(run(tf.TRILU, [f32(2, 5, 37)], tf.TriluAttrs(upper, k)))


def test_trilu_zero_size():
    assert run(tf.TRILU, [np.zeros((3, 0, 5), np.int64)], tf.TriluAttrs(False, 0)) == "empty"


@pytest.mark.parametrize("batch_axis,time_axis", [(1, 0), (0, 1)])
def test_reverse_sequence(batch_axis, time_axis):
    x = f32(6, 6, 19)
    lens = np.array([1, 6, 3, 0, 5, 2], np.int64)
    run(tf.REVERSE_SEQUENCE, [x, lens], tf.ReverseSequenceAttrs(batch_axis, time_axis))


# --- elementwise: activations, isinf/isnan, quantization -------------------------------------------------------

def special(*shape):
    x = f32(*shape) * 3
    x.flat[:6] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 0.5]
    return x


@pytest.mark.parametrize("op,attrs", [
    (ew.SELU, ew.AlphaBetaAttrs(alpha=1.6732632, gamma=1.0507010)), (ew.CELU, ew.AlphaBetaAttrs(alpha=0.7)),
    (ew.THRESHOLDED_RELU, ew.AlphaBetaAttrs(alpha=0.5)), (ew.SHRINK, ew.AlphaBetaAttrs(alpha=0.5, beta=0.25)),
    (ew.SHRINK, ew.AlphaBetaAttrs(alpha=0.5, beta=0.0)),
])
def test_activations_keep_nan_as_reference(op, attrs):
    injective(run(op, [special(5, 67)], attrs))


@pytest.mark.parametrize("pos,neg", [(True, True), (True, False), (False, True)])
def test_isinf(pos, neg):
    run(ew.ISINF, [special(3, 37)], ew.IsInfAttrs(pos, neg))


def test_isnan():
    run(ew.ISNAN, [special(3, 37)], None)
    run(ew.ISNAN, [special(3, 37).astype(np.float16)], None)


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("per_axis", [False, True])
def test_quantize_dequantize(dtype, per_axis):
    x = f32(2, 3, 17) * 200
    x[0, 0, :4] = [0.5, 1.5, 2.5, -0.5]  # ties round half to even
    scale = (np.array([0.5, 1.0, 2.0], np.float32) if per_axis else np.array([1.0], np.float32))  # 0-d: conformance
    lo = np.iinfo(dtype).min
    zero = (np.array([lo + 128, lo + 100, lo + 120], dtype) if per_axis else np.array([lo + 128], dtype))
    a = ew.QuantAttrs(axis=1, out_dtype=dtype)
    injective(run(ew.QUANTIZE, [x, scale, zero], a))  # saturates: |x| up to ~600
    q = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, x.shape).astype(dtype)
    injective(run(ew.DEQUANTIZE, [q, scale, zero], a))


# --- matmul with 1-D operands, einsum --------------------------------------------------------------------------

@pytest.mark.parametrize("sa,sb", [((7,), (3, 7, 5)), ((2, 3, 4, 7), (7,)), ((9,), (9,)), ((5, 7), (7,))])
def test_matmul_1d(sa, sb):
    run(dn.MATMUL, [f32(*sa), f32(*sb)], dn.DenseAttrs(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("equation,shapes", [
    ("bij,bjk->bik", [(3, 5, 7), (3, 7, 9)]), ("ij->ji", [(5, 37)]), ("ij->i", [(5, 37)]), ("ij", [(5, 7)]),
    ("...ii->...i", [(3, 5, 5)]), ("i,i", [(9,), (9,)]), ("ij,jk", [(4, 6), (6, 33)]), ("a,b->ab", [(3,), (5,)]),
    ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 6)]), ("ii", [(4, 4)]),
])
def test_einsum(equation, shapes):
    run(dn.EINSUM, [f32(*s) for s in shapes], dn.EinsumAttrs(equation), variadic=True, rtol=1e-4, atol=1e-5)
