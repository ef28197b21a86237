"""Dynamic batching for one served version: a bounded queue and one worker thread that merges queued requests
(up to max_batch_size rows, or until the oldest has waited max_queue_delay_ms), pads the merged batch up to the
smallest compiled bucket, runs it, and hands each request its own rows back. If the worker itself ever dies
(our bug), every queued and later request fails at once with the reason instead of waiting forever.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np

from kiln.runtime import aligned_empty

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full; the caller should answer 503 with Retry-After."""


class Closed(Exception):
    """The version stopped taking requests (it is being swapped out); pick the serving version again."""


class WorkerDied(RuntimeError):
    """The batch worker thread stopped on an unexpected error; requests to this version fail, none hang."""


@dataclass
class _Request:
    inputs: list[np.ndarray]
    rows: int
    future: Future
    enqueued: float = field(default_factory=time.perf_counter)


RunBucket = Callable[[int, list[np.ndarray]], list[np.ndarray]]  # (bucket, padded inputs) → outputs


class Batcher:
    """`batched=False` serves a model without a batch dim: each request runs alone on its inputs as given and
    gets the outputs whole (one bucket, max_batch_size 1, nothing merged or padded)."""

    def __init__(self, run_bucket: RunBucket, buckets: Sequence[int], *, max_batch_size: int,
                 max_queue_delay_ms: float, max_queue_size: int, dynamic: bool = True, name: str = "",
                 on_batch: Callable[[int, int, float], None] | None = None,
                 on_depth: Callable[[int], None] | None = None,
                 on_start: Callable[[], None] | None = None, batched: bool = True):
        if not (math.isfinite(max_queue_delay_ms) and 0 <= max_queue_delay_ms / 1e3 < threading.TIMEOUT_MAX):
            raise ValueError(f"max_queue_delay_ms must be finite and ≥ 0, got {max_queue_delay_ms}")
        self.buckets = sorted(buckets)
        self.batched = batched
        self.max_batch_size = min(max_batch_size, self.buckets[-1]) if batched else 1
        self.delay_s = max_queue_delay_ms / 1e3
        self.max_queue_size = max_queue_size
        self.dynamic = dynamic and batched
        self.name = name
        self.died: BaseException | None = None  # set once, when the worker stops on an error of its own
        self._run_bucket: RunBucket | None = run_bucket
        self._on_batch = on_batch or (lambda rows, bucket, seconds: None)
        self._on_depth = on_depth or (lambda depth: None)
        self._on_start = on_start
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._taken: list[_Request] = []  # the batch the worker holds: failed with the queue if the worker dies
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def bucket_for(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def submit(self, inputs: list[np.ndarray], rows: int) -> Future:
        """Queue one request of `rows` rows (already checked against the model); its Future gets its outputs."""
        if not 1 <= rows <= self.max_batch_size:
            raise ValueError(f"rows must be in 1..{self.max_batch_size}, got {rows}")
        req = _Request(inputs, rows, Future())
        with self._cond:
            if self.died is not None:  # fail now rather than queue where no worker will ever look
                req.future.set_exception(self._died_error())
                return req.future
            if self._closed:
                raise Closed()
            if len(self._queue) >= self.max_queue_size:
                raise Overloaded()
            self._queue.append(req)
            depth = len(self._queue)
            on_depth = self._on_depth  # read under the lock: the worker drops it as it exits
            self._cond.notify()
        if on_depth is not None:
            on_depth(depth)
        return req.future

    def queue_depth(self) -> int:
        return len(self._queue)

    def close(self, timeout_s: float | None = None) -> None:
        """Take no new requests; the worker finishes every queued one, then exits."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _take(self) -> list[_Request] | None:
        """The next batch; its requests are in self._taken until they are answered."""
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return None  # closed and drained
                first = self._queue.popleft()
                if first.future.set_running_or_notify_cancel():  # False: its caller gave up (cancelled)
                    break
            batch, rows = [first], first.rows
            self._taken = batch
            if self.dynamic:
                deadline = first.enqueued + self.delay_s
                while rows < self.max_batch_size:
                    if self._queue:
                        if rows + self._queue[0].rows > self.max_batch_size:
                            break  # it leads the next batch
                        nxt = self._queue.popleft()
                        if nxt.future.set_running_or_notify_cancel():
                            batch.append(nxt)
                            rows += nxt.rows
                        continue
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0 or self._closed:
                        break
                    self._cond.wait(remaining)
            depth = len(self._queue)
        self._on_depth(depth)
        return batch

    def _work(self) -> None:
        try:
            if self._on_start is not None:
                self._on_start()
            while (batch := self._take()) is not None:
                self._run(batch)
                self._taken = []
        except BaseException as err:  # our bug: fail every waiting request now and later, then stop
            log.exception("batch worker %s died; its requests fail from now on", self.name)
            with self._cond:
                self.died = err.with_traceback(None)  # logged; its frames would hold this batcher in a cycle
                pending, self._queue = [*self._taken, *self._queue], deque()
                self._taken = []
            for r in pending:
                _settle(r.future, error=self._died_error())
        finally:
            # The callbacks are the version's bound methods: dropping them breaks the version ↔ batcher cycle,
            # so a retired version is freed by reference counting (no wait for the cyclic GC).
            self._run_bucket = None
            self._on_batch = self._on_depth = self._on_start = None

    def _died_error(self) -> WorkerDied:
        return WorkerDied(f"batch worker {self.name} stopped ({type(self.died).__name__}: {self.died}); "
                          f"this version cannot serve")

    def _run(self, batch: list[_Request]) -> None:
        if not self.batched:
            return self._run_whole(batch[0])
        rows = sum(r.rows for r in batch)
        bucket = self.bucket_for(rows)
        try:
            merged = []
            for i, first in enumerate(batch[0].inputs):
                # aligned, so the kernels read the batch where it is rather than from a staged copy
                buf = aligned_empty((bucket, *first.shape[1:]), first.dtype)
                at = 0
                for r in batch:
                    buf[at:at + r.rows] = r.inputs[i]
                    at += r.rows
                buf[at:] = 0  # padding rows
                merged.append(buf)
            t0 = time.perf_counter()
            outputs = self._run_bucket(bucket, merged)
            self._on_batch(rows, bucket, time.perf_counter() - t0)
        except Exception as err:  # requests were checked before queueing: this is our bug or the runtime's
            log.exception("batch of %d rows failed", rows)
            _fail(batch, err)
            return
        at = 0
        for r in batch:
            _settle(r.future, [o[at:at + r.rows] for o in outputs])
            at += r.rows

    def _run_whole(self, r: _Request) -> None:
        try:
            t0 = time.perf_counter()
            outputs = self._run_bucket(self.buckets[0], r.inputs)
            self._on_batch(1, self.buckets[0], time.perf_counter() - t0)
        except Exception as err:  # as in _run: this request fails, the worker goes on
            log.exception("request of a model without a batch dim failed")
            _fail([r], err)
            return
        _settle(r.future, outputs)


def _fail(batch: list[_Request], err: Exception) -> None:
    """Fail every request with `err`, stripped of its traceback: the traceback's frames hold the batch, the
    batch holds the futures and the futures the error, a cycle that would keep the whole version (models
    included) alive until the cyclic GC runs. The traceback is already in the log."""
    err = err.with_traceback(None)
    err.__context__ = err.__cause__ = None
    for r in batch:
        _settle(r.future, error=err)


def _settle(future: Future, result: list[np.ndarray] | None = None, error: BaseException | None = None) -> None:
    """Answer a future unless it is answered already (a request cancelled while still queued)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass  # cancelled by its caller (a client that went away): nobody waits for this answer
