"""Kiln as an `onnx.backend.base.Backend`, so ONNX's own test runners and the conformance command can drive it.

Kiln compiles static graphs. When a shape, axes or pads input is computed from graph inputs, import raises
NeedsConstantError; the rep then binds those inputs to the values given at run time and imports again (once
per distinct set of bound values). The `executor` turns an imported module into a callable, so the same backend
runs the reference interpreter today and compiled artifacts later.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.backend.base import Backend, BackendRep

from kiln.errors import NeedsConstantError
from kiln.frontend import from_onnx
from kiln.ir import IRModule, run_module

Runner = Callable[..., list]
Executor = Callable[[IRModule], Runner]


def interpret(mod: IRModule) -> Runner:
    return lambda **feeds: run_module(mod, **feeds)


def compiled(mod: IRModule) -> Runner:
    """Compile the module into an artifact in a temporary folder, load it, and run that."""
    import tempfile
    from pathlib import Path

    from kiln.codegen.artifact import write_artifact
    from kiln.codegen.build import build
    from kiln.codegen.target import resolve_target
    from kiln.passes import O2, run
    from kiln.runtime import load

    target = resolve_target("native")
    result = build(run(mod, O2), target)
    result.meta.update({"cpu_features": [], "cpu": "native"})
    with tempfile.TemporaryDirectory(prefix="kiln-conformance-") as tmp:
        model = load(write_artifact(Path(tmp) / "case.so", result.executable, result.meta, result.weights))
    return lambda **feeds: model.run(**feeds)


def as_array(value: Any) -> np.ndarray:
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)


class KilnRep(BackendRep):
    def __init__(self, model: onnx.ModelProto, executor: Executor = interpret):
        self.model = model
        self.executor = executor
        inits = {t.name for t in model.graph.initializer}
        self.input_names = [vi.name for vi in model.graph.input if vi.name not in inits]
        self.bound: list[str] = []  # graph inputs that must be constants
        self._cache: dict[bytes, Runner] = {}
        self._runner: Runner | None = None
        try:
            self._runner = executor(from_onnx(model))
        except NeedsConstantError as err:
            self.bound = sorted(set(err.inputs) & set(self.input_names))
            if not self.bound:
                raise

    def run(self, inputs: Sequence[Any] | dict[str, Any], **kwargs: Any) -> tuple[np.ndarray, ...]:
        feeds = dict(inputs) if isinstance(inputs, dict) else dict(zip(self.input_names, inputs))
        feeds = {k: as_array(v) for k, v in feeds.items()}
        runner = self._runner or self._bound_runner(feeds)
        return tuple(runner(**{k: v for k, v in feeds.items() if k not in self.bound}))

    def _bound_runner(self, feeds: dict[str, np.ndarray]) -> Runner:
        for _ in range(len(self.input_names) + 1):
            key = b"".join(feeds[k].tobytes() + str(feeds[k].shape).encode() for k in self.bound)
            if key in self._cache:
                return self._cache[key]
            try:
                runner = self.executor(from_onnx(self.model, bind={k: feeds[k] for k in self.bound}))
            except NeedsConstantError as err:
                more = sorted(set(err.inputs) & set(self.input_names) - set(self.bound))
                if not more:
                    raise
                self.bound = sorted(set(self.bound) | set(more))
                continue
            self._cache[key] = runner
            return runner
        raise AssertionError("binding inputs did not converge")


class KilnBackend(Backend):
    executor: Executor = interpret

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> KilnRep:
        # No onnx.checker here: the importer validates the graph itself, with errors that name the node.
        return KilnRep(model, kwargs.get("executor", cls.executor))

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device.upper() == "CPU"


prepare = KilnBackend.prepare
run_model = KilnBackend.run_model
supports_device = KilnBackend.supports_device
