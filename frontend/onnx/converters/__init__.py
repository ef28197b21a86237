"""Importing this package registers every ONNX converter, one module per op family."""

from . import attention, control_flow, elementwise, nn, quantized, recurrent, reduce, sequence, tensor  # noqa: F401
