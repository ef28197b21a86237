"""Kiln's error hierarchy. A KilnError is anything a user can cause; the CLI prints it without a traceback.

Our own bugs stay ordinary exceptions. This module imports nothing from Kiln, so every layer may use it.
"""


class KilnError(Exception):
    """Something the user can fix: a bad model, an unsupported op, a wrong input."""


class ModelError(KilnError):
    """The model file itself is broken: unparsable, a dangling reference, a cycle, a wrong attribute type."""


class UnsupportedError(KilnError):
    """The model is valid, but Kiln does not handle one of its ops, opsets or features (yet)."""


class TypeCheckError(KilnError):
    """An op's inputs do not fit its type rule (shapes that do not broadcast, a wrong dtype, ...)."""


class ScheduleError(KilnError):
    """No schedule template applies to a workload on the chosen target."""


class InvalidConfig(ScheduleError):
    """A knob configuration that a template cannot build."""


class TemplateFallbackWarning(UserWarning):
    """A schedule template failed on a group it claimed (a template bug); the generic schedule was used. The
    test suite turns this warning into an error."""


class CodegenError(KilnError):
    """TVM failed to lower or build a kernel; the message names the group, its ops and the target."""


class ArtifactError(KilnError):
    """A compiled artifact is missing, truncated, corrupted, or built for another format, target or CPU."""


class InputError(KilnError):
    """Inputs given to a model at run time do not match what it was compiled for."""


class NeedsConstantError(UnsupportedError):
    """A value Kiln must know at compile time (a shape, axes, pads) comes from graph inputs.

    `inputs` names those graph inputs; binding them to values at import (`bind=`) resolves it.
    """

    def __init__(self, message: str, inputs: list[str]):
        super().__init__(message)
        self.inputs = inputs
