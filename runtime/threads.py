"""Which thread runs a model's kernels, and with how many of TVM's workers.

TVM keeps one worker pool per thread that launches a parallel kernel (TVM_NUM_THREADS workers each), never
frees it while the process lives, and each worker yield-spins 300,000 times after every task before it sleeps.
So a program that calls `run` from ever new threads (a thread per request) would pile up pools that spin on
cores it needs: 50 such threads left 150 workers behind and a run on the main thread 40× slower. Two rules
keep that bounded:

- the first `MAX_POOL_OWNERS` threads that run kernels run them inline (no hand-off: the common case of one
  long-lived caller pays nothing); any later thread hands its runs to a few long-lived lane threads;
- a thread that runs while another run is in flight (any Model) uses one worker, since two callers each
  driving a pool of every core would put twice as many spinning workers as cores on the machine; it grows its
  pool back after a streak of runs alone (each resize starts new worker threads, a few hundred µs).

Artifacts built since the pool of codegen/pool.py run their parallel loops on it instead (`OwnPool`): one pool
per Model, usable from any thread, so neither rule's bookkeeping of TVM's pools applies; a run while another is in
flight still runs on its caller alone.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from kiln.errors import ArtifactError, InputError

log = logging.getLogger(__name__)
T = TypeVar("T")

SOLO_RUNS_TO_REGROW = 64
_THREAD = threading.local()  # size: pool size as last set; full: its size alone; solo: runs alone since shrunk
_LOCK = threading.Lock()
_running = 0  # runs in flight in this process
_pool_owners = 0  # threads that have run kernels inline (their pools live until the process exits)
_lanes: _Lanes | None = None
_runtime_loaded = False


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_tvm_runtime() -> None:
    """libtvm_runtime provides the thread pool parallel kernels need; load it without importing the compiler."""
    global _runtime_loaded
    if _runtime_loaded:
        return
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi, which libtvm_runtime links against)

    spec = importlib.util.find_spec("tvm")
    if spec is None or spec.origin is None:
        raise ArtifactError("TVM's runtime library is not installed (pip install apache-tvm)")
    lib = os.path.join(os.path.dirname(spec.origin), "lib", "libtvm_runtime.so")
    # TVM sizes its worker pool once, from TVM_NUM_THREADS, when the first parallel kernel runs, and defaults to
    # half the logical CPUs (one thread on a 2-core machine); `runtime.config_threadpool` can only shrink it
    # later. Default to every core this process may use, as ONNX Runtime does.
    os.environ.setdefault("TVM_NUM_THREADS", str(usable_cpus()))
    # TVM's default, the caller running task 0 itself (TVM_EXCLUDE_WORKER0 unset), is kept: a one-worker pool
    # (a run that overlaps another) then runs inline with no hand-off. Measured in one process, two threads
    # whose pools differ only in this, alternating blocks (2026-11-30, Xeon, 2 cores): a 32x32 three-conv CNN
    # 0.069 -> 0.055 ms, MobileNetV2 4.67 -> 4.28 ms, SqueezeNet, ResNet-50, BERT layer, Inception-v1 within 2%;
    # that CNN on one Model from 1 / 2 callers: 9.6-13k -> 18.7-19k / 32-39k runs/s. (An earlier session had
    # measured MobileNetV2 3.71 -> 3.50 ms the other way, on another host, across processes.)
    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    _runtime_loaded = True


MAX_POOL_OWNERS = max(8, 2 * usable_cpus())


def pool_limit() -> int:
    return int(os.environ.get("TVM_NUM_THREADS") or usable_cpus())


def _config_pool(n: int) -> None:
    global _pool_owners
    import tvm_ffi

    tvm_ffi.get_global_func("runtime.config_threadpool")(1, int(n))  # 1: no core pinning
    _THREAD.size = n
    if not getattr(_THREAD, "owner", False):  # this thread has a pool now, whatever the cap says
        with _LOCK:
            _pool_owners += 1
        _THREAD.owner = True


def set_num_threads(n: int) -> None:
    """Size the calling thread's TVM worker pool; runs from this thread use n workers whenever no other run is
    in flight. (TVM keeps one pool per thread: this does not change other threads' pools.)"""
    if n < 1:
        raise InputError(f"num_threads must be ≥ 1, got {n}")
    load_tvm_runtime()
    limit = pool_limit()
    if n > limit:
        log.warning("num_threads=%d but TVM's pool holds %d threads (TVM_NUM_THREADS); using %d", n, limit, limit)
        n = limit
    _config_pool(n)
    _THREAD.full = n


def _size_pool(concurrent: bool, requested: int | None) -> None:
    size = getattr(_THREAD, "size", None)
    if concurrent:
        _THREAD.solo = 0
        if size != 1:
            _config_pool(1)
        return
    if size is None and requested is None:
        return  # TVM's default pool: every usable core (see load_tvm_runtime)
    full = min(requested or getattr(_THREAD, "full", None) or pool_limit(), pool_limit())
    if size == full:
        return
    if requested is not None and requested != getattr(_THREAD, "full", None):
        _config_pool(full)  # a Model loaded with num_threads=N runs with N, whichever thread calls it
        return
    _THREAD.solo = getattr(_THREAD, "solo", 0) + 1
    if _THREAD.solo >= SOLO_RUNS_TO_REGROW:
        _config_pool(full)


def _enter() -> bool:
    """Counts a run as in flight; returns whether another already was. Two plain calls rather than a context
    manager: this runs before every model run, right after the previous run's kernels have pushed the interpreter
    out of the caches, where a generator-based `with` cost about 12 µs (ShuffleNet, Zen 5)."""
    global _running
    with _LOCK:
        concurrent = _running > 0
        _running += 1
    return concurrent


def _leave() -> None:
    global _running
    with _LOCK:
        _running -= 1


def _sized(fn: Callable[[], T], requested: int | None) -> T:
    concurrent = _enter()
    try:
        if concurrent or requested is not None or getattr(_THREAD, "size", None) is not None:
            _size_pool(concurrent, requested)
        return fn()
    finally:
        _leave()


class _Lanes:
    """Long-lived threads that run kernels for callers that may not own a pool; one per usable core."""

    def __init__(self, n: int):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"kiln-lane-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        _THREAD.owner = True
        while True:
            fn, requested, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(_sized(fn, requested))
            except BaseException as err:  # noqa: BLE001  (handed back to the caller, who raises it)
                future.set_exception(err)
            del fn, future  # the job's closure holds its Model: keep nothing alive while waiting for the next

    def run(self, fn: Callable[[], T], requested: int | None) -> T:
        future: Future = Future()
        self._jobs.put((fn, requested, future))
        return future.result()


class OwnPool:
    """A Model's parallel-loop pool, compiled into its artifact (codegen/pool.py) and installed at load in place
    of TVM's. `threads`: the caller and its workers."""

    def __init__(self, fn, threads: int):
        self._fn = fn
        self.threads = threads
        self._caps = threading.local()  # the cap last set from each thread (the pool keeps it per thread)
        self.installed = fn(threads) != -2  # -2: a kernel synchronizes its tasks, so TVM's pool runs it

    def cap(self, n: int) -> None:
        """Launches from the calling thread use at most n threads (0: the pool's all)."""
        if getattr(self._caps, "n", 0) != n:
            self._fn(-1, -1, -1, n)
            self._caps.n = n


def _run_pooled(fn: Callable[[], T], pool: OwnPool) -> T:
    concurrent = _enter()
    try:
        pool.cap(1 if concurrent else getattr(_THREAD, "full", 0))  # set_num_threads caps this thread's runs
        return fn()
    finally:
        _leave()


def run_kernels(fn: Callable[[], T], requested: int | None = None, pool: OwnPool | None = None) -> T:
    """Run `fn` (which calls compiled kernels): with the Model's own `pool`, on this thread; otherwise on this
    thread if it may own a TVM pool, else on a lane."""
    global _pool_owners, _lanes
    if pool is not None:
        return _run_pooled(fn, pool)
    if getattr(_THREAD, "owner", False):
        return _sized(fn, requested)
    with _LOCK:
        if _pool_owners < MAX_POOL_OWNERS:
            _pool_owners += 1
            _THREAD.owner = True
        elif _lanes is None:
            _lanes = _Lanes(usable_cpus())
    if getattr(_THREAD, "owner", False):
        return _sized(fn, requested)
    return _lanes.run(fn, requested)
