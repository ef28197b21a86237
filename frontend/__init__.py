"""Model importers: ONNX today, PyTorch later. Each turns a model into a typed Kiln IRModule."""

from .onnx import from_onnx, load_onnx

__all__ = ["from_onnx", "load_onnx"]
