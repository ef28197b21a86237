"""Timing a candidate where the model runs it: inside the model's own kernel sequence, in place of the kernels
of its task, with the kernels before it run as a model run runs them.

Why: a kernel timed alone does not see what it sees in a model. Tuned on ResNet-50 with every cache flushed
before each call, 19 of 21 tasks kept configs 1.01–1.25× faster alone, and the whole model got slower, not
faster. In a model, a kernel's input was just written by the kernel before it (in the caches of the cores that
wrote each part, in the producer's parallel split), its weights come from wherever the rest of the run left them
(on a host with a large L3, often there; on a small one, memory), and its output buffer is shared with later
kernels. None of that is a cache flush. So the runner loads the model compiled with the default configs once,
and for each candidate runs the model's kernels in order up to the last kernel of the candidate's task, calling
the candidate at each of its task's positions on the model's own buffers, and timing those calls only.

    with ModelContext("model-default.so", threads=2) as ctx:
        costs = ctx.time(task_key, candidate_fn, own_args, repeat=5)   # seconds per kernel, one per repeat

An argument the model's kernel does not share (a candidate of another conv algorithm takes Winograd-transformed
weights of another shape) is the candidate's own array. Tasks that are not in the model, and runners on remote
devices, time the kernel alone (runner.py).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence


class ModelContext:
    def __init__(self, path: str, threads: int | None = None):
        from kiln.runtime.model import load

        self.path = path
        # TVM's pool, not the artifact's: a candidate is a TVM library that launches its parallel loops on TVM's
        # pool, and with the model's kernels on the artifact's pool, whose workers spin for 1 ms after each
        # kernel, every candidate waited for a core: each timing had about 1 ms added (ResNet-50 on 2 cores,
        # 2026-12-01: a 0.04 ms pool read 1.04 ms, the model's 58 kernels summed to 64 ms in a 16 ms run)
        self.model = load(path, num_threads=threads, max_concurrency=1, thread_pool="tvm")
        self._sequence = self.model.kernel_sequence()
        self.steps = self._sequence.__enter__()
        self.positions: dict[str, list[int]] = defaultdict(list)
        for i, (_, _, step) in enumerate(self.steps):
            if step.get("workload"):
                self.positions[step["workload"]].append(i)

    def __contains__(self, key: str) -> bool:
        return key in self.positions

    def time(self, key: str, fn, own_args: Sequence, repeat: int, warmup: int = 1) -> list[float]:
        """Seconds per call of `fn` at the task's positions, averaged over them, one value per repeat; each
        repeat runs the model's kernels from the first up to the task's last."""
        at = {i: self._arguments(self.steps[i][1], own_args) for i in self.positions[key]}
        sequence = self.steps[: max(at) + 1]
        clock = time.perf_counter
        costs = []
        for r in range(warmup + repeat):
            spent = 0.0
            for i, (kernel, args, _) in enumerate(sequence):
                mine = at.get(i)
                if mine is None:
                    kernel(*args)
                else:
                    start = clock()
                    fn(*mine)
                    spent += clock() - start
            if r >= warmup:
                costs.append(spent / len(at))
        return costs

    @staticmethod
    def _arguments(model_args: Sequence, own_args: Sequence) -> list:
        """The model's buffer where it has the candidate's shape and dtype, else the candidate's own array."""
        if len(model_args) != len(own_args):
            return list(own_args)
        return [m if _same(m, o) else o for m, o in zip(model_args, own_args)]

    def close(self) -> None:
        self._sequence.__exit__(None, None, None)

    def __enter__(self) -> ModelContext:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _same(a, b) -> bool:
    return tuple(a.shape) == tuple(b.shape) and str(a.dtype) == str(b.dtype)
