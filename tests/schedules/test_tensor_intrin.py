"""Tensor intrinsics are registered lazily in TVM's process-wide table, which refuses a name twice: the first
two compiles that need one, in two threads at once, must both get it (a fresh process, so the first use is
really the first)."""

from __future__ import annotations

import subprocess
import sys

RACE = """
import threading
import tvm.s_tir, tvm.script  # imported, as by any compile before its first schedule
from kiln.schedules.x86.qconv2d_nchwc import intrinsic
from kiln.schedules.cuda.dense_tensorcore import _register_mma
errors, names = [], []
start = threading.Barrier(6)
def first_use(make):
    start.wait()
    try:
        names.append(make())
    except Exception as e:
        errors.append(repr(e))
makes = [lambda: intrinsic(16, "vnni")] * 3 + [lambda: _register_mma("float16", False)] * 3
threads = [threading.Thread(target=first_use, args=(m,)) for m in makes]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
assert len(names) == 6 and len(set(names)) == 2, names
print("ok")
"""


def test_two_threads_registering_the_same_intrinsic_first_both_get_it():
    # before the lock, each lost race failed: "TensorIntrin 'kiln_vnni_u8i8i32_16x4_local' has already been
    # registered" (a concurrent int8 compile)
    r = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


FIRST_IMPORT = """
import threading
from kiln.codegen.target import resolve_target
from kiln.schedules.x86.qconv2d_nchwc import intrinsic
errors = []
start = threading.Barrier(4)
def first_use(fn):
    start.wait()
    try:
        fn()
    except Exception as e:
        errors.append(repr(e))
calls = [lambda: intrinsic(16, "vnni")] * 2 + [lambda: resolve_target("x86-avx512-vnni")] * 2
threads = [threading.Thread(target=first_use, args=(c,)) for c in calls]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
print("ok")
"""


def test_threads_that_first_import_tvm_at_once_all_get_it_whole():
    # before ir/tvm_import.py, in every fresh process: "cannot import name 'tirx' from 'tvm.script'"
    # (TVM's packages import each other in cycles; a second thread saw one half initialized)
    r = subprocess.run([sys.executable, "-c", FIRST_IMPORT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
