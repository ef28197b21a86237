"""Attention (opset 23), RotaryEmbedding (23) and SwiGLU (28) lowered onto matmul, softmax, take and elementwise
ops: interpreter and compiled artifacts against ONNX Runtime, or ONNX's reference evaluator where ONNX Runtime
does not run the op at that opset."""

import numpy as np
import onnxruntime as ort
import pytest
from kiln.frontend import from_onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from kiln.errors import UnsupportedError

from .unrolled import check, make_model, rand, tensor


def model_of(node, inputs, outputs, inits=(), opset=23):
    model = make_model([node], inputs, outputs, inits, opset=opset)
    model.ir_version = 10
    return model


def oracle(model, feeds):
    """ONNX Runtime's outputs when it runs the model, else the reference evaluator's."""
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - an op or opset ONNX Runtime does not implement
        return ReferenceEvaluator(model).run(None, feeds)
    return sess.run(None, feeds)


def test_attention_4d_causal_matches_and_compiles(tmp_path):
    b, h, s, d = 2, 3, 5, 8
    node = helper.make_node("Attention", ["Q", "K", "V"], ["Y"], name="attn", is_causal=1)
    model = model_of(node, [tensor(n, [b, h, s, d]) for n in "QKV"], [tensor("Y", [b, h, s, d])])
    rng = np.random.default_rng(0)
    feeds = {n: rand(rng, b, h, s, d) for n in "QKV"}
    check(model, feeds, tmp_path, want=oracle(model, feeds))


def test_attention_3d_gqa_with_past_and_mask_matches_and_compiles(tmp_path):
    """4 query heads share 2 key/value heads; the cache grows by the new keys; a float mask covers all keys."""
    b, sq, past, qh, kvh, d = 2, 3, 4, 4, 2, 6
    node = helper.make_node("Attention", ["Q", "K", "V", "mask", "past_k", "past_v"],
                            ["Y", "present_k", "present_v"], name="gqa", q_num_heads=qh, kv_num_heads=kvh)
    inputs = [tensor("Q", [b, sq, qh * d]), tensor("K", [b, sq, kvh * d]), tensor("V", [b, sq, kvh * d]),
              tensor("mask", [sq, past + sq]), tensor("past_k", [b, kvh, past, d]),
              tensor("past_v", [b, kvh, past, d])]
    outputs = [tensor("Y", [b, sq, qh * d]), tensor("present_k", [b, kvh, past + sq, d]),
               tensor("present_v", [b, kvh, past + sq, d])]
    model = model_of(node, inputs, outputs)
    rng = np.random.default_rng(1)
    feeds = {vi.name: rand(rng, *[x.dim_value for x in vi.type.tensor_type.shape.dim]) for vi in inputs}
    check(model, feeds, tmp_path, want=oracle(model, feeds))


def test_attention_runtime_bool_mask_fully_masked_row_gives_zeros():
    """A bool mask fed at run time: the row it masks out entirely is zeros in Y, not NaN."""
    b, h, s, d = 1, 2, 4, 4
    node = helper.make_node("Attention", ["Q", "K", "V", "mask"], ["Y", "", "", "qk"], name="attn",
                            qk_matmul_output_mode=3, softcap=2.0)
    inputs = [tensor(n, [b, h, s, d]) for n in "QKV"] + [tensor("mask", [s, s], TensorProto.BOOL)]
    model = model_of(node, inputs, [tensor("Y", [b, h, s, d]), tensor("qk", [b, h, s, s])])
    rng = np.random.default_rng(2)
    mask = rng.random((s, s)) > 0.4
    mask[1] = False
    feeds = {**{n: rand(rng, b, h, s, d) for n in "QKV"}, "mask": mask}
    want = ReferenceEvaluator(model).run(None, feeds)
    check(model, feeds, want=want)
    assert not np.isnan(want[0]).any()


def test_attention_unsupported_mode_names_node_and_attribute():
    node = helper.make_node("Attention", ["Q", "K", "V"], ["Y", "", "", "qk"], name="odd_attn",
                            qk_matmul_output_mode=7)
    model = model_of(node, [tensor(n, [1, 1, 2, 2]) for n in "QKV"],
                     [tensor("Y", [1, 1, 2, 2]), tensor("qk", [1, 1, 2, 2])])
    with pytest.raises(UnsupportedError, match="odd_attn.*qk_matmul_output_mode 7"):
        from_onnx(model)


def rotary_model(rank, *, interleaved=0, dim=0, heads=2, batch=2, seq=3, head_size=8, max_pos=10):
    rng = np.random.default_rng(3)
    half = (dim or head_size) // 2
    angles = rng.random((max_pos, half)).astype(np.float32) * 3
    inits = [numpy_helper.from_array(np.cos(angles), "cos"), numpy_helper.from_array(np.sin(angles), "sin")]
    shape = [batch, heads, seq, head_size] if rank == 4 else [batch, seq, heads * head_size]
    attrs = {"interleaved": interleaved, **({"rotary_embedding_dim": dim} if dim else {}),
             **({"num_heads": heads} if rank == 3 else {})}
    node = helper.make_node("RotaryEmbedding", ["X", "cos", "sin", "pos"], ["Y"], name="rope", **attrs)
    model = model_of(node, [tensor("X", shape), tensor("pos", [batch, seq], TensorProto.INT64)],
                     [tensor("Y", shape)], inits)
    feeds = {"X": rand(rng, *shape), "pos": rng.integers(0, max_pos, (batch, seq)).astype(np.int64)}
    return model, feeds


def test_rotary_embedding_position_ids_matches_and_compiles(tmp_path):
    model, feeds = rotary_model(4)
    check(model, feeds, tmp_path, want=oracle(model, feeds))


@pytest.mark.parametrize("rank,interleaved,dim", [(4, 1, 0), (4, 0, 4), (3, 0, 0), (3, 1, 4)])
def test_rotary_embedding_variants(rank, interleaved, dim):
    model, feeds = rotary_model(rank, interleaved=interleaved, dim=dim)
    check(model, feeds, want=oracle(model, feeds))


def test_swiglu_matches_reference(tmp_path):
    node = helper.make_node("SwiGLU", ["A", "B"], ["Y"], name="glu", alpha=0.7)
    model = model_of(node, [tensor("A", [3, 5]), tensor("B", [3, 5])], [tensor("Y", [3, 5])], opset=28)
    model.ir_version = 13
    rng = np.random.default_rng(4)
    feeds = {"A": rand(rng, 3, 5), "B": rand(rng, 3, 5)}
    check(model, feeds, tmp_path, want=ReferenceEvaluator(model).run(None, feeds))


def test_attention_float16_compiled_matches_reference_rounding(tmp_path):
    """float16 scores and exponentials are accumulated in float32 and rounded once, as ONNX's reference does."""
    b, h, s, d = 1, 2, 6, 16
    node = helper.make_node("Attention", ["Q", "K", "V"], ["Y"], name="attn16", is_causal=1)
    model = model_of(node, [tensor(n, [b, h, s, d], TensorProto.FLOAT16) for n in "QKV"],
                     [tensor("Y", [b, h, s, d], TensorProto.FLOAT16)])
    rng = np.random.default_rng(5)
    feeds = {n: rand(rng, b, h, s, d).astype(np.float16) for n in "QKV"}
    check(model, feeds, tmp_path, want=ReferenceEvaluator(model).run(None, feeds), rtol=1e-3, atol=1e-3)
