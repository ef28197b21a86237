"""The model zoo Kiln can use without a network: the nine ONNX zoo models inside the onnx wheel, plus the
architectures built in code (`kiln.model_builders`). `zoo:<name>` names one wherever a model path is taken;
`zoo:<name>,batch=N` names it at batch N (the models are batch 1, fixed: see `rebatch`).

The wheel's "light" models carry no trained weights: every weight is a ConstantOfShape node filling one value,
which makes outputs degenerate. `zoo_model(name, random_weights=True)` swaps each for a seeded random
initializer, scaled by the tensor's role (He-init for conv and dense weights, near-one scales and variances
for batch norm), so activations stay finite through fifty layers and numerics comparisons mean something.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from kiln.errors import KilnError

WHEEL_MODELS = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
                "squeezenet", "vgg19", "zfnet512")
PREFIX = "zoo:"


def wheel_model_path(name: str) -> Path:
    return Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"


def names() -> list[str]:
    from kiln import model_builders

    return [*WHEEL_MODELS, *sorted(model_builders.BUILDERS)]


def zoo_model(name: str, random_weights: bool = True, seed: int = 0, batch: int = 1) -> onnx.ModelProto:
    """A zoo model as an onnx.ModelProto (with random weights unless asked otherwise), at `batch`."""
    from kiln import model_builders

    if name in model_builders.BUILDERS:
        model = model_builders.BUILDERS[name](seed=seed)
    elif name not in WHEEL_MODELS:
        raise KilnError(f"no zoo model {name!r}; known: {', '.join(names())}")
    else:
        model = onnx.load(str(wheel_model_path(name)))
        model = calibrate_logits(randomize_weights(model, seed), seed) if random_weights else model
    return model if batch == 1 else rebatch(model, batch)


def parse_name(text: str) -> tuple[str, int]:
    """"resnet50,batch=32" -> ("resnet50", 32); a plain name is batch 1."""
    name, _, opts = text.partition(",")
    batch = 1
    for opt in filter(None, opts.split(",")):
        key, _, value = opt.partition("=")
        if key != "batch" or not value.isdigit() or int(value) < 1:
            raise KilnError(f"zoo:{text}: unknown option {opt!r}; the one option is batch=N (N >= 1)")
        batch = int(value)
    return name, batch


def rebatch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """The batch-1 model at batch `batch`.

    The zoo's models fix their batch at 1, in the inputs and in the shape constants of their Reshapes
    (ResNet-50 flattens to [1, 2048], the BERT layer splits heads as [1, 128, 12, 64]). The inputs' first dim
    becomes `batch` and so does a Reshape constant's leading 1; ONNX's shape inference then has to agree: a
    tensor it can follow that still has a batch of 1 makes this refuse, naming the node (a model that mixed
    samples would otherwise compute something else without a word)."""
    from onnx import shape_inference

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    for vi in [*g.input, *g.output]:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not dims or dims[0].dim_value != 1:
            where = "input" if any(vi is x for x in g.input) else "output"
            raise KilnError(f"cannot rebatch: {where} {vi.name!r} does not start with a batch dim of 1 "
                            f"(dims {[d.dim_value or d.dim_param for d in dims]})")
        dims[0].dim_value = batch
    constants = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    for node in g.node:
        if node.op_type != "Reshape":
            continue
        shape_name = node.input[1]
        if shape_name in inits:
            tensor = inits[shape_name]
        elif shape_name in constants:
            tensor = constants[shape_name].attribute[0].t
        else:
            continue  # computed from the input's own shape: follows the batch by itself
        shape = numpy_helper.to_array(tensor)
        if shape.size and shape[0] == 1:
            shape = shape.copy()
            shape[0] = batch
            tensor.CopyFrom(numpy_helper.from_array(shape, tensor.name))
    del g.value_info[:]
    try:
        inferred = shape_inference.infer_shapes(out)
    except Exception as err:  # noqa: BLE001  (onnx raises several types; the message names the node)
        raise KilnError(f"cannot rebatch to {batch}: {str(err).splitlines()[0][:300]}") from None
    for vi in inferred.graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1 and len(dims) > 1:
            producer = next((n for n in g.node if vi.name in n.output), None)
            raise KilnError(f"cannot rebatch to {batch}: {vi.name!r} (from {producer.op_type if producer else '?'} "
                            f"node {producer.name if producer else '?'!r}) keeps a batch of 1")
    return out


def feeds(model: onnx.ModelProto, seed: int = 0, shapes=None) -> dict[str, np.ndarray]:
    from kiln.model_builders import random_feeds

    return random_feeds(model, seed, shapes)


def resolve(model: str | os.PathLike) -> str | onnx.ModelProto:
    """A CLI model argument: `zoo:name` becomes the model itself, anything else stays a path."""
    text = str(model)
    if text.startswith(PREFIX):
        name, batch = parse_name(text[len(PREFIX):])
        return zoo_model(name, batch=batch)
    return text


def _role(model: onnx.ModelProto, tensor: str) -> tuple[str, int]:
    for n in model.graph.node:
        for i, x in enumerate(n.input):
            if x == tensor:
                if n.op_type in ("Unsqueeze", "Reshape", "Identity"):  # follow to the real consumer
                    return _role(model, n.output[0])
                return n.op_type, i
    return "", -1


def randomize_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace each ConstantOfShape whose shape is an initializer by a random initializer of that shape."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    keep = []
    for n in out.graph.node:
        if n.op_type != "ConstantOfShape" or n.input[0] not in inits:
            keep.append(n)
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[n.input[0]]))
        op, index = _role(out, n.output[0])
        value = _random(rng, shape, op, index)
        out.graph.initializer.append(numpy_helper.from_array(value, n.output[0]))
    del out.graph.node[:]
    out.graph.node.extend(keep)
    used = {x for n in keep for x in n.input}
    survivors = [t for t in out.graph.initializer if t.name in used or t.name in {o.name for o in out.graph.output}]
    del out.graph.initializer[:]
    out.graph.initializer.extend(survivors)
    kept = {t.name for t in survivors}
    inputs = [vi for vi in out.graph.input if vi.name in kept or vi.name not in inits]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    return out


LOGIT_STD = 3.0  # spread of the final layer's outputs: a softmax over them is neither flat nor one-hot


def calibrate_logits(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Rescale the Gemm that feeds the final Softmax so its outputs have a standard deviation of LOGIT_STD.

    Random weights without real batch-norm statistics let residual networks grow their activations by orders
    of magnitude; a saturated softmax is then one-hot and hides any numeric difference in comparisons.
    """
    from kiln.frontend import from_onnx
    from kiln.ir import Function, IRModule, run_module

    nodes = {o: n for n in model.graph.node for o in n.output}
    last = nodes.get(model.graph.output[0].name)
    gemm = nodes.get(last.input[0]) if last is not None and last.op_type == "Softmax" else None
    if gemm is None or gemm.op_type != "Gemm":
        return model
    mod = from_onnx(model)
    softmax = mod.main.body
    logits = run_module(IRModule({"main": Function(mod.main.params, softmax.args[0])}), **feeds(model, seed))[0]
    scale = LOGIT_STD / max(float(logits.std()), 1e-12)
    inits = {t.name: t for t in model.graph.initializer}
    for name in gemm.input[1:3]:
        if name in inits:
            value = numpy_helper.to_array(inits[name]) * np.float32(scale)
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return model


def _random(rng: np.random.Generator, shape: tuple[int, ...], op: str, index: int) -> np.ndarray:
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(np.float32)
    if op == "BatchNormalization" and index in (1, 4):  # scale, variance
        return (1 + 0.1 * rng.random(shape)).astype(np.float32)
    if op == "Mul":  # the unsqueezed BN scales of DenseNet and Inception v2
        return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)

