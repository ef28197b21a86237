"""Compiled reductions, arg-reductions, norms, hardmax and Lp pooling (issue 12: every op the interpreter runs also
compiles). Each op's TE compute goes through the default schedule for a pinned x86 target, runs, and must match the
op's NumPy reference on odd (prime) shapes, ties and NaN; a small model of the ONNX ops is compared with ONNX
Runtime end to end. The schedule must not be naive: parallel and vectorized."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kiln.ir.ops import norm as nm
from kiln.ir.ops import pool as pl
from kiln.ir.ops import reduce as rd
from kiln.ir.ops import softmax as sm

tvm = pytest.importorskip("tvm")


@pytest.fixture(scope="module")
def target():
    from kiln.codegen.target import resolve_target

    return resolve_target("x86-avx2")


def compile_op(op, attrs, arrays, target):
    """(output, schedule description) of one op compiled alone, as a fused group of one."""
    from tests.groups import lower, op_group, run_lowered

    g = lower(op_group(op, arrays, attrs), target)
    return run_lowered(g, target, arrays), g.schedule


def check(op, attrs, *arrays, target, rtol=1e-5, atol=1e-6, vector=True):
    got, how = compile_op(op, attrs, list(arrays), target)
    want = op.reference(*arrays, attrs)
    assert got.dtype == want.dtype, f"{op.name} {attrs}: {got.dtype}, reference {want.dtype}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True, err_msg=f"{op.name} {attrs}")
    assert "parallel" in how or got.size < 64, f"{op.name} {attrs}: {how}"  # fewer outputs than worth sharing
    if vector:
        assert "vectoriz" in how, f"{op.name} {attrs}: {how}"
    return how


RNG = np.random.default_rng(12)
X = RNG.standard_normal((3, 7, 37)).astype(np.float32)


@pytest.mark.parametrize("kind", ["sum", "mean", "l1", "l2", "sum_square", "log_sum_exp"])
@pytest.mark.parametrize("axes", [(1,), (2,), (0, 2), (1, 2)])
@pytest.mark.parametrize("keepdims", [True, False])
def test_reductions_match_reference(kind, axes, keepdims, target):
    check(rd.REDUCE_OPS[kind], rd.ReduceAttrs(axes, keepdims), X, target=target, rtol=1e-5)


def test_reductions_over_everything_and_of_integers(target):
    for kind in ("sum", "l1", "l2", "log_sum_exp", "mean"):
        got, _ = compile_op(rd.REDUCE_OPS[kind], rd.ReduceAttrs(None, False), [X], target)
        np.testing.assert_allclose(got, rd.REDUCE_OPS[kind].reference(X, rd.ReduceAttrs(None, False)), rtol=1e-5)
    xi = RNG.integers(-9, 9, (5, 11)).astype(np.int32)
    for kind in ("sum", "mean", "l1", "l2", "sum_square", "log_sum_exp"):
        check(rd.REDUCE_OPS[kind], rd.ReduceAttrs((1,), True), xi, target=target, vector=False)
    check(rd.REDUCE_OPS["log_sum"], rd.ReduceAttrs((0,), False), np.abs(X), target=target)


@pytest.mark.parametrize("kind", ["max", "min"])
@pytest.mark.parametrize("keepdims", [True, False])
def test_whole_tensor_max_and_min_run_in_parallel_parts(kind, keepdims, target):
    """A max/min over every element of a large tensor (DynamicQuantizeLinear's range) in 16 × 16 parallel,
    vectorized partial results; a NaN anywhere still gives NaN, and ±inf ends win."""
    x = RNG.standard_normal((2, 64, 192)).astype(np.float32)
    how = check(rd.REDUCE_OPS[kind], rd.ReduceAttrs(None, keepdims), x, target=target)
    assert "parallel" in how and "reduction_vectorized" in how, how
    x[1, 63, 191] = np.inf if kind == "max" else -np.inf  # the very last element
    check(rd.REDUCE_OPS[kind], rd.ReduceAttrs(None, keepdims), x, target=target)
    x[0, 5, 7] = np.nan
    check(rd.REDUCE_OPS[kind], rd.ReduceAttrs(None, keepdims), x, target=target)


def test_reductions_vectorize_the_reduction_itself(target):
    """A plain sum is the group's output: its reduction loop runs outside a vector of output elements."""
    how = check(rd.SUM, rd.ReduceAttrs((1,), False), X, target=target)
    assert "reduction_vectorized" in how


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the reference, on the row holding inf
def test_log_sum_exp_is_stable_and_keeps_nan_and_inf(target):
    x = (X * 100).astype(np.float32)  # exp would overflow without the max shift
    x[0, 1, 2] = np.nan
    x[1, :, 3] = -np.inf
    x[2, 3, 4] = np.inf
    check(rd.REDUCE_OPS["log_sum_exp"], rd.ReduceAttrs((1,), True), x, target=target)
    out, _ = compile_op(rd.REDUCE_OPS["log_sum_exp"], rd.ReduceAttrs((1,), True), [x], target)
    assert np.isnan(out[0, 0, 2]) and out[1, 0, 3] == -np.inf and out[2, 0, 4] == np.inf
    assert np.isfinite(out[0, 0, 0]) and out[0, 0, 0] > 100


@pytest.mark.parametrize("op", [rd.ARGMAX, rd.ARGMIN], ids=["argmax", "argmin"])
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("keepdims", [True, False])
@pytest.mark.parametrize("last", [False, True])
def test_arg_reductions_with_ties_and_nan(op, axis, keepdims, last, target):
    x = RNG.integers(0, 3, (5, 7, 11)).astype(np.float32)  # many ties
    x[0, 2, 3] = np.nan
    x[1, 2, 3] = x[1, 4, 3] = np.nan  # two NaN in one row: the first (or last) wins
    x[2, :, :] = np.nan
    attrs = rd.ArgReduceAttrs(axis, keepdims, last)
    check(op, attrs, x, target=target, vector=False)
    check(op, attrs, RNG.integers(-3, 3, (5, 7, 11)).astype(np.int32), target=target, vector=False)


def test_arg_reduction_of_nested_math_keeps_its_input_a_stage(target):
    # found by fuzzing: erf(erf(x)) inlined into an arg-min's combiner, which names its value several times,
    # kept LLVM compiling for minutes; the input is now computed once, as a stage of its own
    from kiln.ir import Call
    from kiln.ir.ops.elementwise import ERF
    from tests.groups import group, lower, params, run_lowered

    x = RNG.standard_normal((3, 7, 9)).astype(np.float32)
    ps = params(x)
    inner = Call(ERF, (Call(ERF, (ps[0],), ERF.attrs_type()),), ERF.attrs_type())
    attrs = rd.ArgReduceAttrs(axis=2, keepdims=False)
    g = lower(group(ps, Call(rd.ARGMIN, (inner,), attrs)), target)
    assert len(g.prim_func.script()) < 8000  # 22 KB with the input inlined into the combiner
    from kiln.ir.ops.elementwise import _erf  # the reference's erf
    np.testing.assert_array_equal(run_lowered(g, target, [x]), np.argmin(_erf(_erf(x)), axis=2))


def test_hardmax(target):
    x = RNG.integers(0, 3, (3, 5, 7)).astype(np.float32)
    x[0, 1, 2] = np.nan
    for axis in range(3):
        check(sm.HARDMAX, sm.SoftmaxAttrs(axis), x, target=target)
        check(sm.HARDMAX, sm.SoftmaxAttrs(axis), RNG.standard_normal((3, 5, 7)).astype(np.float32), target=target)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 5, 11), (3, 2, 13, 2, 3)])
def test_norms(shape, target):
    def r(*s):
        return RNG.standard_normal(s).astype(np.float32)

    c, tol = shape[1], dict(rtol=1e-4, atol=1e-5)
    check(nm.INSTANCE_NORM, nm.EpsAttrs(1e-5), r(*shape), r(c), r(c), target=target, **tol)
    check(nm.MEAN_VARIANCE_NORM, nm.MVNAttrs((0, 2)), r(*shape), target=target, **tol)
    check(nm.GROUP_NORM, nm.GroupNormAttrs(1, 1e-5), r(*shape), r(c), r(c), target=target, **tol)
    for axis in (1, len(shape) - 1):
        check(nm.RMS_NORM, nm.LayerNormAttrs(axis, 1e-5), r(*shape), r(*shape[axis:]), target=target, **tol)
        for p in (1, 2):
            check(nm.LP_NORMALIZE, nm.LpNormAttrs(axis, p), r(*shape), target=target, **tol)
    check(nm.RMS_NORM, nm.LayerNormAttrs(1, 1e-5), r(*shape), r(shape[-1]), target=target, **tol)
    check(nm.GROUP_NORM, nm.GroupNormAttrs(2, 1e-5), r(2, 6, 5, 7), r(6), r(6), target=target, **tol)


def test_norm_statistics_are_not_recomputed_per_row(target):
    """The (n, c) statistics are computed inside the output's parallel loop over (n, c) only, not (n, c, h)."""
    from tests.groups import schedule_op

    f32 = "float32"
    scheduled, _ = schedule_op(nm.INSTANCE_NORM, [((1, 4, 31, 17), f32), ((4,), f32), ((4,), f32)], nm.EpsAttrs(),
                               target)
    parallel = [int(n) for n in re.findall(r"T\.parallel\((\d+)\)", scheduled.script())]
    assert parallel and all(n <= 4 for n in parallel), parallel


def test_lp_normalize_of_zero_and_nan(target):
    z = RNG.standard_normal((3, 5)).astype(np.float32)
    z[1] = 0
    z[2, 3] = np.nan
    for p in (1, 2):
        check(nm.LP_NORMALIZE, nm.LpNormAttrs(1, p), z, target=target)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_lp_pool(p, target):
    x = RNG.standard_normal((2, 3, 11, 13)).astype(np.float32)
    tol = dict(rtol=1e-4, atol=1e-5)
    check(pl.LP_POOL, pl.PoolAttrs((3, 2), (2, 1), (1, 0, 1, 1), (1, 1), p=p), x, target=target, **tol)
    check(pl.LP_POOL, pl.PoolAttrs((3, 3), (2, 2), (1, 1, 1, 1), (2, 1), ceil_mode=True, p=p), x, target=target,
          **tol)
    check(pl.LP_POOL, pl.PoolAttrs((3,), (1,), (0, 0), (1,), p=p), x[0], target=target, **tol)
    got, _ = compile_op(pl.GLOBAL_LP_POOL, pl.GlobalPoolAttrs(p), [x], target)
    np.testing.assert_allclose(got, pl.GLOBAL_LP_POOL.reference(x, pl.GlobalPoolAttrs(p)), **tol)


def _model() -> tuple[onnx.ModelProto, dict]:
    x = RNG.integers(0, 4, (2, 6, 5, 7)).astype(np.float32)  # ties for the arg-reductions
    y = RNG.standard_normal((2, 6, 5, 7)).astype(np.float32)
    c = helper.make_tensor
    nodes = [
        helper.make_node("ArgMax", ["x"], ["argmax"], axis=1, keepdims=0),
        helper.make_node("ArgMin", ["x"], ["argmin_last"], axis=3, select_last_index=1),
        helper.make_node("ReduceLogSumExp", ["y", "axes"], ["lse"], keepdims=0),
        helper.make_node("ReduceL2", ["y", "axes"], ["l2"]),
        helper.make_node("Hardmax", ["x"], ["hardmax"], axis=2),
        helper.make_node("InstanceNormalization", ["y", "scale", "bias"], ["instance"], epsilon=1e-3),
        helper.make_node("GroupNormalization", ["y", "scale", "bias"], ["group"], num_groups=3),
        helper.make_node("MeanVarianceNormalization", ["y"], ["mvn"]),
        helper.make_node("LpNormalization", ["y"], ["lpn"], axis=1, p=1),
        helper.make_node("LpPool", ["y"], ["lppool"], kernel_shape=[3, 2], pads=[1, 0, 1, 1], p=3),
    ]
    outs = ["argmax", "argmin_last", "lse", "l2", "hardmax", "instance", "group", "mvn", "lpn", "lppool"]
    graph = helper.make_graph(
        nodes, "reduce_norm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, v.shape) for n, v in (("x", x), ("y", y))],
        [helper.make_tensor_value_info(o, TensorProto.INT64 if o.startswith("arg") else TensorProto.FLOAT, None)
         for o in outs],
        [c("axes", TensorProto.INT64, [2], [1, 3]), c("scale", TensorProto.FLOAT, [6], RNG.random(6).tolist()),
         c("bias", TensorProto.FLOAT, [6], RNG.random(6).tolist())])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), {"x": x, "y": y}


def test_model_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import kiln
    from kiln.config import Options

    model, feeds = _model()
    model.ir_version = 10
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = kiln.load(kiln.compile(model, tmp_path / "m.so", Options(target="x86-avx2")).path).run(**feeds)
    names = [o.name for o in model.graph.output]
    for name, g, w in zip(names, got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-5, err_msg=name)
