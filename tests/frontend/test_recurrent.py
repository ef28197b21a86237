"""LSTM, GRU and RNN unrolled at import onto dense and elementwise ops: interpreter and compiled artifacts against
ONNX Runtime."""

import numpy as np
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from kiln.errors import NeedsConstantError
from kiln.frontend import from_onnx

from .unrolled import check, make_model, rand, tensor

SEQ, BATCH, INPUT, HIDDEN = 5, 2, 3, 4
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_model(op, direction="forward", *, bias=True, init_h=False, init_c=False, peepholes=False,
                    layout=0, seq_lens=None, seq_lens_input=False, **attrs):
    rng = np.random.default_rng(0)
    dirs = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    inits = [numpy_helper.from_array(rand(rng, dirs, g * HIDDEN, INPUT) * 0.5, "W"),
             numpy_helper.from_array(rand(rng, dirs, g * HIDDEN, HIDDEN) * 0.5, "R")]
    names = ["X", "W", "R", "", "", "", "", ""]
    if bias:
        inits.append(numpy_helper.from_array(rand(rng, dirs, 2 * g * HIDDEN) * 0.5, "B"))
        names[3] = "B"
    inputs = [tensor("X", [BATCH, SEQ, INPUT] if layout else [SEQ, BATCH, INPUT])]
    if seq_lens is not None:
        inits.append(numpy_helper.from_array(np.array(seq_lens, np.int32), "lens"))
        names[4] = "lens"
    if seq_lens_input:
        inputs.append(tensor("lens", [BATCH], 6))  # int32
        names[4] = "lens"
    state = [BATCH, dirs, HIDDEN] if layout else [dirs, BATCH, HIDDEN]
    if init_h:
        inputs.append(tensor("h0", state))
        names[5] = "h0"
    if init_c:
        inputs.append(tensor("c0", state))
        names[6] = "c0"
    if peepholes:
        inits.append(numpy_helper.from_array(rand(rng, dirs, 3 * HIDDEN) * 0.5, "P"))
        names[7] = "P"
    while names[-1] == "":
        names.pop()
    outs = ["Y", "Y_h", "Y_c"][: 3 if op == "LSTM" else 2]
    node = helper.make_node(op, names, outs, name=f"my_{op.lower()}", hidden_size=HIDDEN, direction=direction,
                            **({"layout": layout} if layout else {}), **attrs)
    y_shape = [BATCH, SEQ, dirs, HIDDEN] if layout else [SEQ, dirs, BATCH, HIDDEN]
    outputs = [tensor("Y", y_shape)] + [tensor(o, state) for o in outs[1:]]
    return make_model([node], inputs, outputs, inits, opset=14)


def feeds(model, seed=1):
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = rand(rng, *shape)
    return out


def test_lstm_bidirectional_seq5_compiles(tmp_path):
    model = recurrent_model("LSTM", "bidirectional", init_h=True, init_c=True)
    check(model, feeds(model), tmp_path)


def test_gru_linear_before_reset_compiles(tmp_path):
    model = recurrent_model("GRU", "bidirectional", linear_before_reset=1)
    check(model, feeds(model), tmp_path)


def test_rnn_initial_h_compiles(tmp_path):
    model = recurrent_model("RNN", "reverse", init_h=True)
    check(model, feeds(model), tmp_path)


@pytest.mark.parametrize("op,direction,kw", [
    ("LSTM", "forward", {"bias": False}),
    ("LSTM", "reverse", {"peepholes": True, "init_c": True}),
    ("LSTM", "forward", {"clip": 0.5}),
    ("LSTM", "bidirectional", {"layout": 1, "init_h": True, "init_c": True}),
    ("LSTM", "forward", {"input_forget": 1}),
    ("GRU", "forward", {"linear_before_reset": 0, "init_h": True}),
    ("GRU", "reverse", {"layout": 1}),
    ("RNN", "bidirectional", {"activations": ["Relu", "Sigmoid"]}),
    ("RNN", "forward", {"activations": ["LeakyRelu"], "activation_alpha": [0.2]}),
    ("GRU", "forward", {"activations": ["HardSigmoid", "Tanh"], "activation_alpha": [0.3],
                        "activation_beta": [0.4]}),
    ("LSTM", "bidirectional", {"seq_lens": [5, 3]}),
    ("GRU", "reverse", {"seq_lens": [2, 5], "init_h": True}),
    ("RNN", "forward", {"seq_lens": [5, 5]}),
])
def test_recurrent_variants_match_onnxruntime(op, direction, kw):
    model = recurrent_model(op, direction, **kw)
    f = feeds(model)
    # ONNX Runtime refuses batch-major layout; ONNX's reference evaluator is the oracle there
    want = ReferenceEvaluator(model).run(None, f) if kw.get("layout") else None
    check(model, f, want=want)


def test_data_dependent_sequence_lens_is_refused_naming_the_node():
    model = recurrent_model("LSTM", seq_lens_input=True)
    with pytest.raises(NeedsConstantError, match="my_lstm.*sequence_lens"):
        from_onnx(model)


def test_lstm_sequence_lens_peepholes_and_clip_compile(tmp_path):
    """Constant sequence_lens become where-masks, peepholes and clip elementwise ops: all have kernels."""
    model = recurrent_model("LSTM", "bidirectional", seq_lens=[5, 3], peepholes=True, clip=0.7)
    check(model, feeds(model), tmp_path)
