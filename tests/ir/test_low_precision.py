"""float16 and bfloat16 kernels accumulate in float32 and round once (ir/ops/accumulate.py): long float16 dot
products, softmax rows, layer norms, means and global pools (through the x86 templates that claim them), and
bfloat16 attention and einsum compiled end to end, against NumPy in float32 or float64. Summed in float16, a row
of 4096 values near 1 stops growing at 2048 (where a float16 ulp is 2): kernels that accumulate in x's dtype fail
these by 10-50%."""

import ml_dtypes
import numpy as np
import pytest
from kiln.codegen.target import resolve_target
from kiln.ir.ops import dense as dn
from kiln.ir.ops import norm as nm
from kiln.ir.ops import pool as pl
from kiln.ir.ops import reduce as rd
from kiln.ir.ops import softmax as sm
from kiln.schedules.x86 import batch_matmul, dense_packed, layer_norm, softmax
from onnx import TensorProto, helper

import kiln
from kiln.config import Options

from ..groups import lower, op_group, run_lowered
from ..tolerances import assert_close

RUN = resolve_target("x86-avx2")  # kernels that run here: AVX2 code runs on any x86-64 machine the suite runs on
BF16 = np.dtype(ml_dtypes.bfloat16)
K = 4096


def run_group(op, arrays, attrs, template=None, variadic=False):
    """The op alone, lowered as a fused group (through `template` at its default config when given), run."""
    g = lower(op_group(op, arrays, attrs, variadic), RUN)
    if template is not None:
        assert g.template == template.TEMPLATE.key and g.config_source == "default", (g.template, g.schedule)
    return run_lowered(g, RUN, arrays)


def test_float16_matmul_of_4096_terms_matches_float32_rounded_once():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 1.0, (8, K)).astype(np.float16)
    b = rng.uniform(0.5, 1.0, (K, 32)).astype(np.float16)
    want = (a.astype(np.float32) @ b.astype(np.float32)).astype(np.float16)  # about 2300: a float16 ulp is 2
    got = run_group(dn.MATMUL, [a, b], dn.DenseAttrs(), batch_matmul)
    assert got.dtype == np.float16
    assert_close(got, want, rtol=1e-3, atol=0, what="nn.matmul through x86.batch_matmul")
    packed = dn.pack_dense_weight(np.ascontiguousarray(b.T), 16)
    got = run_group(dn.DENSE_PACKED, [a, packed], dn.PackedDenseAttrs(block=16), dense_packed)
    assert_close(got, want, rtol=1e-3, atol=0, what="nn.dense_packed through x86.dense_packed")


def test_float16_softmax_of_4096_columns_matches_float32():
    x = np.random.default_rng(1).uniform(-1.0, 1.0, (4, K)).astype(np.float16)
    xf = x.astype(np.float32)
    e = np.exp(xf - xf.max(axis=1, keepdims=True))
    want = (e / e.sum(axis=1, keepdims=True)).astype(np.float16)
    got = run_group(sm.SOFTMAX, [x], sm.SoftmaxAttrs(axis=1), softmax)
    # exp, its sum and the quotient each round to float16, as ONNX's reference: within 2 ulp of float32's
    assert_close(got, want, rtol=2e-3, atol=1e-7, what="nn.softmax through x86.softmax")


def test_float16_layer_norm_and_mean_of_4096_columns_match_float64():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((4, K)) + 8.0).astype(np.float16)  # a row sums to about 32768: a float16 ulp is 32
    gamma, beta = rng.standard_normal((2, K)).astype(np.float16)
    attrs = nm.LayerNormAttrs(axis=1, epsilon=1e-5)
    got = run_group(nm.LAYER_NORM, [x, gamma, beta], attrs, layer_norm)
    assert_close(got, nm.LAYER_NORM.reference(x, gamma, beta, attrs), rtol=4e-3, atol=4e-3,
                 what="nn.layer_norm through x86.layer_norm")
    mean = run_group(rd.MEAN, [x], rd.ReduceAttrs(axes=(1,), keepdims=False))
    assert_close(mean, x.astype(np.float64).mean(axis=1).astype(np.float16), rtol=1e-3, atol=0, what="mean")


def test_bfloat16_einsum_compiles_and_matches_float32():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((3, 5, 64)).astype(BF16), rng.standard_normal((3, 64, 7)).astype(BF16)
    got = run_group(dn.EINSUM, [a, b], dn.EinsumAttrs("bij,bjk->bik"), variadic=True)
    want = np.einsum("bij,bjk->bik", a.astype(np.float32), b.astype(np.float32))
    assert got.dtype == BF16
    assert_close(got.astype(np.float32), want, rtol=8e-3, atol=8e-3, what="einsum of bfloat16")


def _attention_reference(q, k, v, mask):
    qd, kd, vd = (t.astype(np.float64) for t in (q, k, v))
    scores = qd @ kd.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    scores = np.where(mask, scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ vd


@pytest.mark.parametrize("seq", [6, 64])
def test_bfloat16_attention_with_a_runtime_mask_compiles_and_matches_float64(tmp_path, seq):
    """A bool mask fed at run time: the row-max of the bias that guards fully masked rows is a bfloat16 max,
    whose NaN check, and the softmax's exp, must compile for bfloat16."""
    b, h, d = 2, 3, 16
    dims = [b, h, seq, d]
    node = helper.make_node("Attention", ["Q", "K", "V", "mask"], ["Y"], name="attn")
    inputs = [helper.make_tensor_value_info(n, TensorProto.BFLOAT16, dims) for n in "QKV"]
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [seq, seq]))
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.BFLOAT16, dims)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    rng = np.random.default_rng(seq)
    q, k, v = (rng.uniform(-1.0, 1.0, dims).astype(BF16) for _ in range(3))
    mask = np.tril(np.ones((seq, seq), bool)) | (rng.random((seq, seq)) > 0.5)  # the diagonal keeps rows alive
    report = kiln.compile(model, tmp_path / "attn.so", Options(target="x86-avx2"))
    (got,) = kiln.load(report.path).run(Q=q, K=k, V=v, mask=mask)
    assert got.dtype == BF16
    # a bfloat16 ulp is 2^-8 relative: the output rounds once, its inputs (scores, probabilities) each once
    assert_close(got.astype(np.float64), _attention_reference(q, k, v, mask), rtol=1e-2, atol=1e-2,
                 what=f"bfloat16 attention, seq {seq}")


def test_float16_global_pools_sum_in_float32():
    """64 x 64 positions around 4: the average sums to about 16384, the L2 pool's squares past float16's 65504."""
    x = (np.random.default_rng(4).standard_normal((1, 8, 64, 64)) + 4.0).astype(np.float16)
    for op in (pl.GLOBAL_AVG_POOL, pl.GLOBAL_LP_POOL):
        attrs = op.attrs_type()
        want = op.reference(x, attrs)  # float64 sums
        assert_close(run_group(op, [x], attrs), want, rtol=1e-3, atol=0, what=op.name)


@pytest.mark.parametrize("groups", [1, 256])
def test_float16_conv_sums_in_float32_through_the_compiled_model(tmp_path, groups):
    """A 3x3 conv over 256 channels of values near 1 (sums near 2300 for the dense conv, where a float16 ulp is 2)
    compiled end to end: NCHWc direct for the dense conv (never Winograd in float16), depthwise for groups=256."""
    c, size = 256, 12
    w_shape = [c, c // groups, 3, 3]
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=groups)
    rng = np.random.default_rng(5)
    w = rng.uniform(0.5, 1.0, w_shape).astype(np.float16)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, c, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, c, size, size])],
        [helper.make_tensor("w", TensorProto.FLOAT16, w_shape, w.tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.uniform(0.5, 1.0, (1, c, size, size)).astype(np.float16)
    report = kiln.compile(model, tmp_path / "conv.so", Options(target="x86-avx2"))
    assert not any("winograd" in s.get("schedule", "") for s in report.steps)
    (got,) = kiln.load(report.path).run(x)
    from kiln.ir.ops.conv import CONV2D

    want = CONV2D.reference(x.astype(np.float32), w.astype(np.float32),
                            CONV2D.make_attrs(strides=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=groups)).astype(np.float16)
    assert got.dtype == np.float16
    assert_close(got, want, rtol=2e-3, atol=0, what=f"float16 conv, groups {groups}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_every_elementwise_compute_keeps_a_half_precision_dtype(dtype):
    # a Python float constant (0.5) makes a float16 expression float32 in TVM 0.27: hard swish's kernel then
    # wrote float32 into a planned float16 buffer, which failed at run time (found by fuzzing at fp16)
    from tvm import te

    from kiln.ir.ops import elementwise as el

    changed = {}
    for name, op in el.OPS.items():
        if op.compute is None or op.variadic:
            continue
        x = te.placeholder((4,), dtype, name="x")
        attrs = op.attrs_type() if op.attrs_type else None
        out = None
        for args in ((x,), (x, x)):  # unary, then binary
            try:
                out = op.compute(*args, attrs)
                break
            except Exception:  # noqa: BLE001  (the other arity, or an op for other dtypes: its type rule refuses)
                continue
        if out is not None and str(out.dtype) not in (dtype, "bool"):
            changed[name] = str(out.dtype)
    assert not changed


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("precision, dtype", [("fp16", np.float16), ("bf16", BF16)])
def test_half_precision_arg_reductions_compile_and_match(op, precision, dtype, tmp_path):
    # TVM's bfloat16 lowering did not rewrite the reduction's value binding: arg-max at bf16 failed to build
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node(op, ["r"], ["y"], axis=1,
                                                                                      keepdims=0)],
                          "arg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 33])],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, [6])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(3).standard_normal((6, 33)).astype(np.float32)
    x[2, 5] = x[2, 20] = -x[2, 5] if op == "ArgMin" else 9  # a tie: the first index wins
    m = kiln.load(kiln.compile(model, tmp_path / "m.so", Options(target="x86-avx2", precision=precision)).path)
    rounded = np.maximum(x.astype(dtype).astype(np.float32), 0)
    np.testing.assert_array_equal(m.run(x)[0], (np.argmax if op == "ArgMax" else np.argmin)(rounded, axis=1))
    # and the group alone, reading a half-precision parameter (as after a conv): it builds
    import tvm

    kind = rd.ARGMAX if op == "ArgMax" else rd.ARGMIN
    g = lower(op_group(kind, [x.astype(dtype)], rd.ArgReduceAttrs(axis=1, keepdims=False)), RUN)
    tvm.compile(tvm.IRModule({"main": g.prim_func}), target=RUN)
