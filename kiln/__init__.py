"""Kiln: ONNX models in, fast shared libraries out.

The public API is re-exported lazily, so `import kiln.runtime` in a server does not pull in the compiler.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "compile": ("kiln.driver", "compile"),
    "Model": ("kiln.runtime", "Model"),
    "load": ("kiln.runtime", "load"),
    "Options": ("kiln.config", "Options"),
    "calibrate": ("kiln.calibrate", "calibrate"),
    "from_onnx": ("kiln.frontend", "from_onnx"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
