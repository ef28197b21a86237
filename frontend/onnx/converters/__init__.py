"""Importing this package registers every ONNX converter, one module per op family."""

from . import elementwise, nn, reduce, tensor  # noqa: F401
