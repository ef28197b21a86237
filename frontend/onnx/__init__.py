"""ONNX → Kiln IR. `from_onnx(path_or_model)`; converters live in `converters/`, one module per op family."""

from .functions import expandable_op_types
from .importer import from_onnx, load_onnx, supported_op_types

__all__ = ["expandable_op_types", "from_onnx", "load_onnx", "supported_op_types"]
