"""The model zoo Kiln can use without a network: the nine ONNX zoo models inside the onnx wheel, plus the
architectures built in code (`kiln.model_builders`). `zoo:<name>` names one wherever a model path is taken.

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


def zoo_model(name: str, random_weights: bool = True, seed: int = 0) -> onnx.ModelProto:
    """A zoo model as an onnx.ModelProto (with random weights unless asked otherwise)."""
    from kiln import model_builders

    if name in model_builders.BUILDERS:
        return model_builders.BUILDERS[name](seed=seed)
    if name not in WHEEL_MODELS:
        raise KilnError(f"no zoo model {name!r}; known: {', '.join(names())}")
    model = onnx.load(str(wheel_model_path(name)))
    return calibrate_logits(randomize_weights(model, seed), seed) if random_weights else model


def feeds(model: onnx.ModelProto, seed: int = 0, shapes=None) -> dict[str, np.ndarray]:
    from kiln.model_builders import random_feeds

    return random_feeds(model, seed, shapes)


def resolve(model: str | os.PathLike) -> str | onnx.ModelProto:
    """A CLI model argument: `zoo:name` becomes the model itself, anything else stays a path."""
    text = str(model)
    if text.startswith(PREFIX):
        return zoo_model(text[len(PREFIX):])
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

