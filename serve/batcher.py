"""Dynamic batching for one served version: a bounded queue and one worker thread that merges queued requests
(up to max_batch_size rows, or until the oldest has waited max_queue_delay_ms), pads the merged batch up to the
smallest compiled bucket, runs it, and hands each request its own rows back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full; the caller should answer 503 with Retry-After."""


class Closed(Exception):
    """The version stopped taking requests (it is being swapped out); pick the serving version again."""


@dataclass
class _Request:
    inputs: list[np.ndarray]
    rows: int
    future: Future
    enqueued: float = field(default_factory=time.perf_counter)


RunBucket = Callable[[int, list[np.ndarray]], list[np.ndarray]]  # (bucket, padded inputs) → outputs


class Batcher:
    def __init__(self, run_bucket: RunBucket, buckets: Sequence[int], *, max_batch_size: int,
                 max_queue_delay_ms: float, max_queue_size: int, dynamic: bool = True, name: str = "",
                 on_batch: Callable[[int, int, float], None] | None = None,
                 on_depth: Callable[[int], None] | None = None,
                 on_start: Callable[[], None] | None = None):
        self.buckets = sorted(buckets)
        self.max_batch_size = min(max_batch_size, self.buckets[-1])
        self.delay_s = max_queue_delay_ms / 1e3
        self.max_queue_size = max_queue_size
        self.dynamic = dynamic
        self._run_bucket = run_bucket
        self._on_batch = on_batch or (lambda rows, bucket, seconds: None)
        self._on_depth = on_depth or (lambda depth: None)
        self._on_start = on_start
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
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
            if self._closed:
                raise Closed()
            if len(self._queue) >= self.max_queue_size:
                raise Overloaded()
            self._queue.append(req)
            depth = len(self._queue)
            self._cond.notify()
        self._on_depth(depth)
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
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None  # closed and drained
            first = self._queue.popleft()
            batch, rows = [first], first.rows
            if self.dynamic:
                deadline = first.enqueued + self.delay_s
                while rows < self.max_batch_size:
                    if self._queue:
                        if rows + self._queue[0].rows > self.max_batch_size:
                            break  # it leads the next batch
                        nxt = self._queue.popleft()
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
        if self._on_start is not None:
            self._on_start()
        while (batch := self._take()) is not None:
            self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        rows = sum(r.rows for r in batch)
        bucket = self.bucket_for(rows)
        try:
            merged = []
            for i, first in enumerate(batch[0].inputs):
                buf = np.zeros((bucket, *first.shape[1:]), first.dtype)  # padding rows stay zero
                at = 0
                for r in batch:
                    buf[at:at + r.rows] = r.inputs[i]
                    at += r.rows
                merged.append(buf)
            t0 = time.perf_counter()
            outputs = self._run_bucket(bucket, merged)
            self._on_batch(rows, bucket, time.perf_counter() - t0)
        except Exception as err:  # requests were checked before queueing: this is our bug or the runtime's
            log.exception("batch of %d rows failed", rows)
            for r in batch:
                r.future.set_exception(err)
            return
        at = 0
        for r in batch:
            r.future.set_result([o[at:at + r.rows] for o in outputs])
            at += r.rows
