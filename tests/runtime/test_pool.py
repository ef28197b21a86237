"""The artifact's own pool for parallel loops (codegen/pool.py): same answers as TVM's, no stall when a worker
is not scheduled, and threads that end with the Model and do not survive a fork."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.config import Options
from kiln.model_builders import GraphBuilder


def conv_chain(n: int = 12, c: int = 32, size: int = 28):
    """n 3x3 convs with relu, each a kernel with a parallel loop: many short launches, as in ShuffleNet."""
    g = GraphBuilder("conv_chain", 0)
    x = g.op("Conv", ["data", g.weight((c, 3, 3, 3), 27, "w")], kernel_shape=[3, 3], pads=[1] * 4)
    for i in range(n):
        y = g.op("Relu", [g.op("Conv", [x, g.weight((c, c, 3, 3), c * 9, "w")], kernel_shape=[3, 3], pads=[1] * 4)])
        x = g.op("Add", [x, y]) if i % 2 else y
    return g.model([helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, size, size])],
                   [(x, TensorProto.FLOAT, [1, c, size, size])])


TARGET = "x86-avx2"  # preset, so the schedules (and their parallel loops) are the same on every host


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    return kiln.compile(conv_chain(), tmp_path_factory.mktemp("pool") / "chain.so", Options(target=TARGET)).path


def x_input() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 3, 28, 28)).astype(np.float32)


def test_the_pool_is_installed_and_answers_as_tvms_does(chain, monkeypatch):
    ours = kiln.load(chain, num_threads=2)
    assert ours._parallel is not None and ours._parallel._fn(-1) == 2  # installed, with 2 threads
    monkeypatch.setenv("KILN_THREAD_POOL", "tvm")
    tvms = kiln.load(chain, num_threads=2)
    assert tvms._parallel is None
    x = x_input()
    want = tvms.run(x)[0]
    for _ in range(20):
        assert np.array_equal(ours.run(x)[0], want)


def test_the_pool_can_hand_the_loops_back_to_tvm(chain):
    m = kiln.load(chain, num_threads=2)
    x = x_input()
    want = m.run(x)[0]
    assert m._parallel._fn(0) == 2  # TVM's pool back
    assert m._parallel._fn(-1) == 0
    assert np.array_equal(m.run(x)[0], want)
    assert m._parallel._fn(2) == 0  # and ours again
    assert np.array_equal(m.run(x)[0], want)


def run_script(script: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_worker_that_is_not_scheduled_does_not_stall_the_run(chain):
    """TVM's pool gives each worker its part of every loop and waits for it: with another process busy on the
    worker's core, each kernel waited for a scheduler time slice (ShuffleNet: 244-368 ms a run, against 16 ms
    with this pool). Ours lets the caller take a part no worker has started."""
    out = run_script(f"""
        import os, subprocess, sys, time
        import numpy as np
        a, b = sorted(os.sched_getaffinity(0))[:2]
        os.sched_setaffinity(0, {{a, b}})
        import kiln
        path = {str(chain)!r}
        x = np.random.default_rng(0).standard_normal((1, 3, 28, 28)).astype(np.float32)
        os.environ["KILN_THREAD_POOL"] = "tvm"
        tvms = kiln.load(path, num_threads=2)
        tvms.run(x)
        del os.environ["KILN_THREAD_POOL"]
        ours = kiln.load(path, num_threads=2)
        ours.run(x)
        pinned = set()  # the core TVM pinned its worker to
        for task in os.listdir("/proc/self/task"):
            status = open(f"/proc/self/task/{{task}}/status").read()
            cpus = [l.split()[1] for l in status.splitlines() if l.startswith("Cpus_allowed_list")][0]
            if cpus.isdigit():
                pinned.add(int(cpus))
        if len(pinned) != 1:
            print("skip", pinned)
            sys.exit(0)
        core = pinned.pop()
        busy = subprocess.Popen([sys.executable, "-c",
                                 f"import os; os.sched_setaffinity(0, {{{{{{core}}}}}})\\nwhile True: pass"])
        try:
            time.sleep(0.5)
            times = {{"tvm": [], "kiln": []}}
            for _ in range(5):
                for name, m in (("tvm", tvms), ("kiln", ours)):
                    t = time.perf_counter()
                    m.run(x)
                    times[name].append(time.perf_counter() - t)
        finally:
            busy.kill()
        print(np.median(times["tvm"]) * 1e3, np.median(times["kiln"]) * 1e3)
    """)
    if out.startswith("skip"):
        pytest.skip(f"TVM did not pin one worker to one core: {out}")
    tvm_ms, kiln_ms = map(float, out.split())
    assert kiln_ms * 3 < tvm_ms, f"with a busy core: TVM's pool {tvm_ms:.1f} ms, ours {kiln_ms:.1f} ms"


def test_a_forked_child_runs_on_a_pool_of_its_own(chain):
    """The parent's workers do not exist in a fork: the child must start its own, not wait on them."""
    out = run_script(f"""
        import multiprocessing as mp
        import numpy as np
        import kiln
        m = kiln.load({str(chain)!r}, num_threads=2)
        x = np.random.default_rng(0).standard_normal((1, 3, 28, 28)).astype(np.float32)
        want = m.run(x)[0]
        def child(q):
            q.put(all(np.array_equal(m.run(x)[0], want) for _ in range(5)))
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        ok = q.get(timeout=60)
        p.join(60)
        print(ok, p.exitcode, np.array_equal(m.run(x)[0], want))
    """)
    assert out.split() == ["True", "0", "True"]


def test_unloading_a_model_stops_its_workers(chain):
    out = run_script(f"""
        import gc, os
        import numpy as np
        import kiln
        x = np.random.default_rng(0).standard_normal((1, 3, 28, 28)).astype(np.float32)
        before = len(os.listdir("/proc/self/task"))
        for _ in range(15):
            m = kiln.load({str(chain)!r}, num_threads=2)
            m.run(x)
            del m
            gc.collect()
        print(before, len(os.listdir("/proc/self/task")))
    """)
    before, after = map(int, out.split())
    assert after <= before + 1, (before, after)  # 15 Models with a worker each: none left behind


def test_loops_split_into_more_chunks_answer_the_same(chain):
    """The entry tells the pool each kernel's parallel extents (their gcd); a launch splits a thread's block
    into k equal chunks where k * threads divides that, so a thread slowed mid-loop can be helped."""
    m = kiln.load(chain, num_threads=2)
    assert all(step["loop_gcd"] > 0 for step in m.meta["steps"])
    x = x_input()
    m._parallel._fn(-1, 1)  # at most one chunk a thread: TVM's static split
    want = m.run(x)[0]
    for k in (2, 3, 4, 8):
        m._parallel._fn(-1, k)
        for _ in range(5):
            assert np.array_equal(m.run(x)[0], want), k


def test_loop_gcd_is_the_gcd_of_the_printed_parallel_extents(monkeypatch, tmp_path):
    import math
    import re

    from kiln.codegen import build as build_module
    from kiln.codegen.pool import loop_gcd

    seen = []
    lower = build_module.lower_group

    def recording(fn, symbol, target, configs=None):
        group = lower(fn, symbol, target, configs)
        extents = [int(e) for e in re.findall(r"T\.parallel\((\d+)\)", group.prim_func.script())]
        seen.append((symbol, loop_gcd(group.prim_func), math.gcd(*extents) if extents else 0))
        return group

    monkeypatch.setattr(build_module, "lower_group", recording)
    from kiln.model_builders import small_cnn

    kiln.compile(small_cnn(0), tmp_path / "small_cnn.so", Options(target=TARGET))  # convs, pools, dense, softmax
    assert len(seen) >= 5
    assert [(s, got) for s, got, want in seen if got != want] == []
    assert sum(got > 0 for _, got, _ in seen) >= 3


class _Any(ctypes.Structure):
    _fields_ = [("type_index", ctypes.c_int32), ("zero_padding", ctypes.c_uint32), ("v_int64", ctypes.c_int64)]


@pytest.mark.parametrize("barrier", [False, True])
def test_kernels_that_synchronize_their_tasks_keep_tvms_pool(tmp_path, barrier):
    """A kernel with a parallel barrier needs all its tasks running at once; this pool would run them in turn."""
    import tvm_ffi

    from kiln.codegen.pool import POOL_SOURCE
    from kiln.runtime.threads import load_tvm_runtime

    load_tvm_runtime()  # the pool's TVM-FFI error functions
    source = POOL_SOURCE + "\nvoid* __TVMBackendParallelLaunch = (void*)1;\n"
    if barrier:
        source += "void* __TVMBackendParallelBarrier = (void*)1;\n"
    (tmp_path / "pool.c").write_text(source)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-I", tvm_ffi.libinfo.find_include_path(),
                    str(tmp_path / "pool.c"), "-o", str(tmp_path / "pool.so")], check=True)
    lib = ctypes.CDLL(str(tmp_path / "pool.so"))
    args, ret = (_Any * 1)(_Any(1, 0, 2)), _Any()  # kiln_pool(2); type index 1: an int
    assert lib.__tvm_ffi_kiln_pool(None, args, 1, ctypes.byref(ret)) == 0
    slot = ctypes.c_void_p.in_dll(lib, "__TVMBackendParallelLaunch").value
    if barrier:
        assert (ret.v_int64, slot) == (-2, 1)  # not installed: TVM's pool stays
    else:
        assert ret.v_int64 == 0 and slot != 1  # installed in place of "TVM's"


ERROR_HARNESS = r"""
#include <string.h>
void* __TVMBackendParallelLaunch = (void*)1;  /* "TVM's pool": replaced by kiln_pool(2) before any launch */
static int fail_task, slow_task;
static atomic_int failed;
static int lambda(int task, KilnParallelEnv* env, void* cdata) {
  if (task == slow_task) {  /* holds its thread (up to 5 s) until the failing task ran, so the other thread runs it */
    for (int i = 0; i < 5000 && !atomic_load(&failed); i++) usleep(1000);
  }
  if (task == fail_task) {
    char msg[64];
    snprintf(msg, sizeof msg, "task %d failed on %s", task, in_worker ? "a worker" : "the caller");
    TVMFFIErrorSetRaisedFromCStr("RuntimeError", msg);
    atomic_store(&failed, 1);
    return -1;
  }
  return 0;
}
/* run_parallel(fail_task, slow_task): one launch of two tasks through the installed pool */
int __tvm_ffi_run_parallel(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* ret) {
  fail_task = (int)args[0].v_int64;
  slow_task = (int)args[1].v_int64;
  atomic_store(&failed, 0);
  if (((KilnLaunch)__TVMBackendParallelLaunch)(lambda, 0, 0) != 0) return -1;  /* raised on this thread */
  ret->type_index = kTVMFFINone;
  ret->zero_padding = 0;
  ret->v_int64 = 0;
  return 0;
}
"""


def test_an_error_raised_in_a_worker_reaches_the_caller(tmp_path):
    """TVM-FFI errors are per thread: a task that fails on a worker must surface as the caller's exception
    (its message intact), and the pool must run the next launch as usual."""
    import tvm_ffi

    from kiln.codegen.pool import POOL_SOURCE
    from kiln.runtime.threads import load_tvm_runtime

    load_tvm_runtime()
    (tmp_path / "pool.c").write_text(POOL_SOURCE + "#include <stdio.h>\n" + ERROR_HARNESS)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-I", tvm_ffi.libinfo.find_include_path(),
                    str(tmp_path / "pool.c"), "-o", str(tmp_path / "pool.so")], check=True)
    lib = tvm_ffi.load_module(str(tmp_path / "pool.so"))
    assert lib["kiln_pool"](2) == 0  # installed in place of "TVM's", 2 threads
    run = lib["run_parallel"]
    with pytest.raises(RuntimeError, match="task 1 failed on a worker"):
        run(1, 0)  # the caller sleeps in task 0; the worker runs task 1 and fails
    with pytest.raises(RuntimeError, match="task 0 failed on the caller"):
        run(0, 1)  # the worker waits in task 1, so it cannot take task 0 from the caller's block
    for _ in range(20):
        run(-1, -1)  # no error left behind: later launches succeed
    with pytest.raises(RuntimeError, match="task 1 failed on a worker"):
        run(1, 0)
