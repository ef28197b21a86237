"""TVM imported once and whole, under a lock, before any thread first uses it.

Kiln imports TVM lazily: a process that only runs artifacts never loads the compiler. TVM's packages import
each other in cycles, and two threads importing different parts of it for the first time at once can meet a
module still half initialized: one thread resolving a target (`import tvm`) while another built the int8 kernel's
tensor intrinsic (`from tvm.script import tirx`) failed with "cannot import name 'tirx' from 'tvm.script'",
in every one of six fresh processes. The first caller of `import_tvm` imports every TVM package Kiln's compile
path uses; a concurrent caller waits for it, and afterwards each import is a lookup.
"""

from __future__ import annotations

import importlib
import threading

MODULES = ("tvm", "tvm.target", "tvm.te", "tvm.tirx", "tvm.topi", "tvm.s_tir", "tvm.script", "tvm.script.tirx",
           "tvm.script.ir_builder", "tvm.script.ir_builder.tirx", "tvm.support")

_lock = threading.Lock()
_done = False


def import_tvm() -> None:
    global _done
    if _done:
        return
    with _lock:
        if not _done:
            for name in MODULES:
                importlib.import_module(name)
            _done = True
