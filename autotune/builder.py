"""Builds tuning candidates in a pool of worker processes: each (task, config) is lowered, compiled and exported
as a shared library (cross-linked when the target is another architecture). A build that fails or runs past its
timeout is a `BuildResult` with its error, never an exception: the tuner records it and goes on.

    builder = LocalBuilder(workers=2)
    builds = builder.build([MeasureInput(task, cfg) for cfg in batch])   # BuildResult per input, in order
    results = runner.run(inputs, builds)                                  # runner.py, rpc.py
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from kiln.autotune.tasks import Task
from kiln.schedules.space import Config

ENTRY = "main"  # the kernel's function name in every candidate library


@dataclass(frozen=True)
class MeasureInput:
    """One candidate: a task at a config. `check` asks the runner to compare its output with the NumPy
    reference (the tuner asks for it on each task's first candidate and on every new best)."""

    task: Task
    config: Config
    check: bool = False


@dataclass(frozen=True)
class BuildResult:
    path: str | None  # the exported library (function ENTRY); None when the build failed
    error: str | None  # why it failed: "build: InvalidConfig: ...", "build timeout after 60 s"
    build_s: float  # wall time of the build in its worker


class LocalBuilder:
    """Builds on this machine in `workers` processes (spawned: TVM is not fork-safe once it has started
    threads). Libraries go to `build_dir`, or to a temporary folder removed by `close()`."""

    def __init__(self, workers: int | None = None, timeout_s: float = 60.0, build_dir: str | None = None):
        self.workers = workers or max(1, len(os.sched_getaffinity(0)))
        self.timeout_s = timeout_s
        self._owns_dir = build_dir is None
        self.build_dir = build_dir or tempfile.mkdtemp(prefix="kiln-build-")
        os.makedirs(self.build_dir, exist_ok=True)
        self._pool: ProcessPoolExecutor | None = None
        self._count = 0

    def build(self, inputs: Sequence[MeasureInput]) -> list[BuildResult]:
        """One BuildResult per input, in order."""
        names = []
        for inp in inputs:
            names.append(os.path.join(self.build_dir, f"{self._count:06d}_{_slug(inp.task.key)}.so"))
            self._count += 1
        results: list[BuildResult | None] = [None] * len(inputs)
        pending = list(range(len(inputs)))
        while pending:  # more than one round only after a stuck worker forced a new pool
            pending = self._round(inputs, names, pending, results)
        return [r for r in results if r is not None]

    def _round(self, inputs, names, indices: list[int], results: list) -> list[int]:
        pool = self._get_pool()
        futures: dict[int, Future] = {
            i: pool.submit(build_one, inputs[i].task, inputs[i].config, names[i], self.timeout_s)
            for i in indices
        }
        # Each worker stops its own build at timeout_s (an alarm); this deadline is the backstop for a build
        # stuck where the alarm cannot reach it (inside native code): the waves of builds plus a grace period.
        deadline = time.monotonic() + self.timeout_s * (math.ceil(len(indices) / self.workers) + 1) + 30
        for i, fut in futures.items():
            try:
                results[i] = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                results[i] = BuildResult(None, f"build timeout after {self.timeout_s:g} s", self.timeout_s)
                self._kill_pool()
                return [j for j in indices if results[j] is None]  # the rest go to a fresh pool
            except BrokenProcessPool:
                # a worker died (a crash in LLVM, or killed): the builds it took down are retried once alone
                self._kill_pool()
                lost = [j for j in indices if results[j] is None]
                for j in lost:
                    results[j] = self._alone(inputs[j], names[j])
                return []
        return []

    def _alone(self, inp: MeasureInput, name: str) -> BuildResult:
        """A build in a pool of its own, so that a crash is this candidate's."""
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            fut = pool.submit(build_one, inp.task, inp.config, name, self.timeout_s)
            try:
                return fut.result(timeout=self.timeout_s + 60)
            except BrokenProcessPool:
                return BuildResult(None, "build crashed: the build process died", 0.0)
            except FutureTimeout:
                _kill_workers(pool)
                return BuildResult(None, f"build timeout after {self.timeout_s:g} s", self.timeout_s)

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def _kill_pool(self) -> None:
        if self._pool is not None:
            _kill_workers(self._pool)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._owns_dir:
            shutil.rmtree(self.build_dir, ignore_errors=True)

    def __enter__(self) -> LocalBuilder:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BuildTimeout(BaseException):  # not an Exception: lowering's error wrapping must not swallow it
    pass


def build_one(task: Task, config: Config, path: str, timeout_s: float = 60.0) -> BuildResult:
    """Lower, compile and export one candidate (in a worker process). Any error is the candidate's: a template
    raising InvalidConfig, a TVM error in lowering or LLVM, a missing cross compiler."""
    from kiln.codegen.cuda import compile_device_code, fpack_imports, is_cuda, packed_imports_with_binary
    from kiln.codegen.target import toolchain

    start = time.perf_counter()

    expired = []

    def expire(signum, frame):
        expired.append(True)
        raise BuildTimeout

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        import tvm

        lowered = task.lower(config, ENTRY)
        ex = tvm.compile(tvm.IRModule({ENTRY: lowered.prim_func}), target=task.target)
        _, fcompile = toolchain(task.target)
        kwargs = {} if fcompile is None else {"fcompile": fcompile}
        if is_cuda(task.target):  # device code precompiled, as in an artifact: the device needs no compiler
            device = compile_device_code(ex, task.target)
            kwargs["fpack_imports"] = fpack_imports(packed_imports_with_binary(ex, device.source, device.fatbin))
        ex.export_library(path, **kwargs)
    except BuildTimeout:
        return BuildResult(None, f"build timeout after {timeout_s:g} s", time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001  (every build error is this candidate's result, recorded)
        if expired:  # the alarm surfaced through TVM as another error
            return BuildResult(None, f"build timeout after {timeout_s:g} s", time.perf_counter() - start)
        return BuildResult(
            None, f"build: {type(err).__name__}: {_first_line(err)}", time.perf_counter() - start
        )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return BuildResult(path, None, time.perf_counter() - start)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    # concurrent.futures has no public way to stop a stuck worker before Python 3.14 (terminate_workers)
    for proc in list((pool._processes or {}).values()):
        if proc.is_alive():
            proc.kill()


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:80]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # TVM errors open with a traceback; the message is the last line
    return (lines[-1] if lines and "Traceback" in lines[0] else lines[0] if lines else "")[:500]
