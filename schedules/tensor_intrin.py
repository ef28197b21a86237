"""Registering TVM tensor intrinsics once per process, safely from any thread.

TVM keeps tensor intrinsics in one process-wide table that refuses a second registration of a name. Templates
register theirs lazily, the first time a schedule needs one, and two models compiled at once in two threads
(an application compiling several models from a thread pool) reach that first use together: a check and a
register without a lock let both threads register, and the second compile failed with "has already been
registered".
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from kiln.ir.tvm_import import import_tvm

_lock = threading.Lock()


def register_once(name: str, make: Callable[[], tuple]) -> str:
    """Register `make()`'s (description, implementation) under `name` unless it is registered; return `name`.
    `make` runs only when the name is new, under the lock."""
    import_tvm()
    from tvm.s_tir import TensorIntrin

    if TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    with _lock:
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, *make())
    return name
