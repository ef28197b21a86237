"""Times built candidates on this machine in an isolated child process, so that no candidate can take the job
down: a crash (segfault), a hang past the timeout or a wrong result costs that one candidate, recorded in its
`MeasureResult.error`, and the rest of the batch runs in a fresh child.

    runner = LocalRunner(cold=True, repeat=5, timeout_s=10)
    results = runner.run(inputs, builder.build(inputs))      # one MeasureResult per input, in order
    # error strings: "crash: signal 11", "timeout after 10 s", "wrong result: max abs err 0.31 ...", or the build's

Timing is what a model run sees: `cold=True` flushes the caches before every timed call (a model's kernel finds
its weights evicted by the kernels before it), with the target's core count as TVM's thread count. A runner is
anything with `run(inputs, builds) -> list[MeasureResult]`: rpc.py measures the same way on a remote device, a
batch at a time, which also fits a GPU machine reached in batches.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from kiln.autotune.builder import ENTRY, BuildResult, MeasureInput
from kiln.autotune.device_worker import TOLERANCES, compare  # noqa: F401  (one definition, TVM-free)
from kiln.autotune.measure import COLD_FLUSH_BYTES
from kiln.ir import Call, Constant
from kiln.ir.ops.elementwise import DEQUANTIZE
from kiln.schedules.target_info import target_info
from kiln.schedules.workload import Group

@dataclass(frozen=True)
class MeasureResult:
    costs_s: list[float] = field(default_factory=list)  # one per repeat; empty when error
    error: str | None = None
    build_s: float = 0.0
    run_s: float = 0.0  # wall time this candidate took in the runner (load, check, timing)

    @property
    def cost_s(self) -> float:
        """The median cost; infinite for a failed candidate, so it never wins."""
        return float(np.median(self.costs_s)) if self.error is None and self.costs_s else float("inf")


class Runner(Protocol):
    def run(self, inputs: Sequence[MeasureInput], builds: Sequence[BuildResult]) -> list[MeasureResult]: ...


@dataclass(frozen=True)
class TimingOptions:
    """How each candidate is timed (time_evaluator's options). `cold` times one call per repeat, each after a
    cache flush, as a model run sees it; warm timing runs `number` calls per repeat, at least min_repeat_ms."""

    number: int = 1
    repeat: int = 5
    min_repeat_ms: int = 0
    cold: bool = True
    flush_bytes: int = COLD_FLUSH_BYTES

    def evaluator(self, module, dev):
        if self.cold:  # one call per repeat: a second call would find the caches warm again
            return module.time_evaluator(
                ENTRY, dev, number=1, repeat=self.repeat, cache_flush_bytes=self.flush_bytes
            )
        return module.time_evaluator(
            ENTRY, dev, number=self.number, repeat=self.repeat, min_repeat_ms=self.min_repeat_ms
        )


class LocalRunner:
    """Measures on this machine. Each batch runs in a child process started for it (again after a crash or a
    timeout); `timeout_s` bounds one candidate's load, check and timing; preparing its inputs and reference
    (NumPy, not the candidate) has `prepare_timeout_s`. `threads` defaults to the target's cores."""

    def __init__(
        self,
        *,
        number: int = 1,
        repeat: int = 5,
        min_repeat_ms: int = 0,
        cold: bool = True,
        timeout_s: float = 10.0,
        prepare_timeout_s: float = 300.0,
        threads: int | None = None,
        seed: int = 0,
        stderr=None,
        context: str | os.PathLike | None = None,
    ):
        self.timing = TimingOptions(number, repeat, min_repeat_ms, cold)
        # a model compiled with the default configs: candidates of its tasks are timed inside its kernel
        # sequence (autotune/context.py), others alone
        self.context = None if context is None else os.fspath(context)
        self.stderr = stderr  # the child's stderr: inherited, or a file (TVM's crash backtraces land there)
        self.timeout_s = timeout_s
        self.prepare_timeout_s = prepare_timeout_s
        self.threads = threads
        self.seed = seed

    def run(self, inputs: Sequence[MeasureInput], builds: Sequence[BuildResult]) -> list[MeasureResult]:
        if len(inputs) != len(builds):
            raise ValueError(f"{len(inputs)} inputs but {len(builds)} builds")
        results: list[MeasureResult] = []
        child: _Child | None = None
        try:
            for inp, built in zip(inputs, builds):
                if built.error is not None or built.path is None:
                    results.append(MeasureResult([], built.error or "build: no library", built.build_s, 0.0))
                    continue
                threads = self.threads or target_info(inp.task.target).cores
                if child is None or child.threads != threads:
                    if child is not None:
                        child.close()
                    child = _Child(threads, self.stderr)
                start = time.perf_counter()
                costs, error = child.measure(
                    inp, built.path, self.timing, self.seed, self.timeout_s, self.prepare_timeout_s, self.context
                )
                results.append(MeasureResult(costs, error, built.build_s, time.perf_counter() - start))
                if not child.alive:
                    child = None  # the next candidate gets a fresh child
        finally:
            if child is not None:
                child.close()
        return results


class _Child:
    """A measuring child process spoken to over a pipe: length-prefixed pickles, one job at a time."""

    START_TIMEOUT_S = 120.0

    def __init__(self, threads: int, stderr=None):
        self.threads = threads
        env = dict(os.environ, TVM_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from kiln.autotune.runner import worker_main; worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
        self.tasks: set[str] = set()  # keys of the tasks the child already holds
        self.alive = True
        self.startup_error = None
        try:
            _read(self.proc.stdout, time.monotonic() + self.START_TIMEOUT_S)  # "ready": kiln and tvm imported
        except _Timeout:
            self.startup_error = f"runner child did not start within {self.START_TIMEOUT_S:g} s"
            self.close()
        except EOFError:
            self.startup_error = self._death()
            self.close()

    def measure(
        self,
        inp: MeasureInput,
        path: str,
        timing: TimingOptions,
        seed: int,
        timeout_s: float,
        prepare_timeout_s: float,
        context: str | None = None,
    ) -> tuple[list[float], str | None]:
        if not self.alive:
            return [], self.startup_error or "runner child is not running"
        key = inp.task.key
        job = {
            "key": key,
            "task": None if key in self.tasks else inp.task,
            "config": dict(inp.config),
            "path": path,
            "check": inp.check,
            "seed": seed,
            "timing": timing,
            "context": context,
        }
        try:
            _write(self.proc.stdin, job)
            self.tasks.add(key)
            prepared = _read(self.proc.stdout, time.monotonic() + prepare_timeout_s)
            if prepared[0] == "error":  # the task's inputs or reference failed: not the candidate's fault
                return [], prepared[1]
            reply = _read(self.proc.stdout, time.monotonic() + timeout_s)
        except _Timeout:
            self.close()
            return [], f"timeout after {timeout_s:g} s"
        except (EOFError, BrokenPipeError):
            error = self._death()
            self.close()
            return [], error
        _, costs, error = reply
        return costs, error

    def _death(self) -> str:
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return "crash: the runner child stopped answering"
        return f"crash: signal {-rc}" if rc < 0 else f"crash: runner child exited with status {rc}"

    def close(self) -> None:
        self.alive = False
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class _Timeout(Exception):
    pass


def _write(f, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def _read(f, deadline: float) -> Any:
    header = _read_exact(f, 8, deadline)
    return pickle.loads(_read_exact(f, struct.unpack("<Q", header)[0], deadline))


def _read_exact(f, n: int, deadline: float) -> bytes:
    fd, chunks, got = f.fileno(), [], 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], None if left == float("inf") else left)[0]:
            raise _Timeout
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# ----- the child -----------------------------------------------------------------------------------------------


def worker_main() -> None:
    """The child's loop: read a job, prepare inputs (and the reference when checking), say so, then load, run,
    check and time the candidate, and answer. A crash or a hang here is the parent's to see."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever TVM or a kernel prints goes to stderr, never into the replies
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    import tvm  # noqa: F401  (imported before "ready", so a candidate's timeout never pays for it)

    tasks: dict = {}
    prepared: dict = {}
    contexts: dict = {}  # model path -> ModelContext, loaded at the first job that names it
    _write(out, ("ready",))
    stdin = sys.stdin.buffer
    while True:
        try:
            job = _read(stdin, float("inf"))
        except EOFError:
            return
        if job["task"] is not None:
            tasks[job["key"]] = job["task"]
        task, cfg = tasks[job["key"]], job["config"]
        try:
            arrays, reference = prepare_inputs(task, cfg, job["seed"], job["check"], prepared)
        except Exception as err:  # noqa: BLE001  (reported to the parent as this candidate's error)
            _write(out, ("error", f"reference: {type(err).__name__}: {err}"))
            continue
        context = job.get("context")
        if context is not None and context not in contexts:
            try:
                from kiln.autotune.context import ModelContext

                contexts[context] = ModelContext(context, int(os.environ.get("TVM_NUM_THREADS", "0")) or None)
            except Exception as err:  # noqa: BLE001  (not the candidate's fault: the parent sees it as an error)
                _write(out, ("error", f"context model {context}: {type(err).__name__}: {err}"))
                continue
        _write(out, ("prepared",))
        _write(out, ("result", *measure_library(job["path"], task, cfg, arrays, reference, job["timing"],
                                                context=contexts.get(context))))


def prepare_inputs(task, cfg: dict, seed: int, check: bool, cache: dict):
    """Inputs for the kernel of `cfg` (and its reference output when checking), cached per task and graph
    knobs: configs that differ only in schedule knobs share them."""
    fixed = task.template.graph_knobs(Group(task.group))
    ident = (task.key, tuple(sorted((k, repr(cfg[k])) for k in fixed if k in cfg)), seed)
    if ident not in cache:
        cache[ident] = [task.inputs(cfg, seed), None]
    entry = cache[ident]
    if check and entry[1] is None:
        entry[1] = task.reference(cfg, entry[0])
    return entry[0], entry[1] if check else None


def measure_library(
    path: str,
    task,
    config: dict,
    arrays: list[np.ndarray],
    reference: np.ndarray | None,
    timing: TimingOptions,
    dev=None,
    module=None,
    context=None,
) -> tuple[list[float], str | None]:
    """(costs, error) of one library: run once and compare with `reference` when given, then time: inside
    the model's kernel sequence when a `context` (autotune/context.py) holds the task, else alone. Runs where
    the library is: here, or on a remote device through its `module` and `dev` (rpc.py)."""
    import tvm

    dev = dev if dev is not None else tvm.device(device_kind(task.target))
    if dev.dlpack_device_type() != 1:  # not a CPU: cache_flush_bytes flushes CPU caches only; time warm
        timing = TimingOptions(timing.number, timing.repeat, timing.min_repeat_ms, cold=False)
    try:
        module = module if module is not None else tvm.runtime.load_module(path)
    except Exception as err:  # noqa: BLE001
        return [], f"load: {type(err).__name__}: {_short(err)}"
    out_type = task.group_for(config).ret_type  # TupleType outputs are not tuning tasks
    shape, dtype = tuple(int(d) for d in out_type.shape), str(out_type.dtype)
    try:
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]
        out = tvm.runtime.tensor(_poison(shape, dtype), dev)  # a kernel that leaves outputs unwritten fails
        module[ENTRY](*args, out)  # also a warm-up: the first call in a child starts TVM's thread pool
        if reference is not None:
            error = compare(out.numpy(), reference, step=output_step(task.group_for(config)))
            if error is not None:
                return [], error
        if context is not None and task.key in context:
            costs = context.time(task.key, module[ENTRY], [*args, out], timing.repeat)
        else:
            costs = list(timing.evaluator(module, dev)(*args, out).results)
    except Exception as err:  # noqa: BLE001  (a runtime error in the candidate: its result)
        return [], f"run: {type(err).__name__}: {_short(err)}"
    return [float(c) for c in costs], None


def output_step(group) -> float | None:
    """The quantization step of a group whose output is a dequantize by one constant scale, else None."""
    body = group.body
    if isinstance(body, Call) and body.op is DEQUANTIZE and isinstance(body.args[1], Constant):
        return float(np.abs(body.args[1].value).max())
    return None


def device_kind(target) -> str:
    """The TVM device a target's kernels run on: "cpu" for LLVM targets, else the kind ("cuda")."""
    kind = target.kind.name
    return {"llvm": "cpu", "c": "cpu"}.get(kind, kind)


def run_batch_file(batch_path: str, results_path: str, **options) -> None:
    """Measure a pickled batch, `{"inputs": [...], "builds": [...], "options": {...}}` (library paths relative
    to the batch file's folder), with a LocalRunner, and pickle the list of MeasureResults to `results_path`:
    how a machine reached only in batches (a GPU host) measures what was built elsewhere."""
    with open(batch_path, "rb") as f:
        batch = pickle.load(f)
    folder = os.path.dirname(os.path.abspath(batch_path))
    builds = [
        BuildResult(os.path.join(folder, b.path) if b.path else None, b.error, b.build_s)
        for b in batch["builds"]
    ]
    results = LocalRunner(**{**batch.get("options", {}), **options}).run(batch["inputs"], builds)
    with open(results_path, "wb") as f:
        pickle.dump(results, f)


def _poison(shape, dtype: str) -> np.ndarray:
    kind = np.dtype(dtype).kind if dtype != "bfloat16" else "f"
    return np.full(shape, np.nan if kind == "f" else 0x5A, dtype=dtype)


def _short(err: BaseException) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:300]


if __name__ == "__main__":  # python -m kiln.autotune.runner BATCH.pkl RESULTS.pkl
    from kiln.autotune.runner import (
        run_batch_file as run,
    )  # the classes as the package names them, not __main__

    run(sys.argv[1], sys.argv[2])
