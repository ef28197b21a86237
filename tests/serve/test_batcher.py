"""The batcher alone: merging, padding to buckets, splitting, the queue bound, draining on close, and a worker
that dies or is handed cancelled requests."""

from __future__ import annotations

import gc
import logging
import threading
import weakref

import numpy as np
import pytest
from kiln.serve.batcher import Batcher, Closed, Overloaded, WorkerDied


def _recorder(calls: list):
    def run(bucket: int, inputs: list[np.ndarray]) -> list[np.ndarray]:
        calls.append((bucket, inputs[0].copy()))
        return [inputs[0] * 2]

    return run


def test_requests_merge_pad_to_bucket_and_split_back():
    calls: list = []
    gate = threading.Event()
    b = Batcher(_recorder(calls), [1, 4, 8], max_batch_size=8, max_queue_delay_ms=50, max_queue_size=10,
                on_start=lambda: gate.wait(5))  # hold the worker until every request is queued
    parts = [np.full((n, 2), i + 1, np.float32) for i, n in enumerate([2, 1, 2])]
    futures = [b.submit([p], len(p)) for p in parts]
    gate.set()
    outs = [f.result(5)[0] for f in futures]
    b.close()
    assert len(calls) == 1 and calls[0][0] == 8  # 5 rows → bucket 8
    merged = calls[0][1]
    np.testing.assert_array_equal(merged[:5], np.concatenate(parts))
    np.testing.assert_array_equal(merged[5:], 0)  # padding is zeros
    for p, o in zip(parts, outs):
        np.testing.assert_array_equal(o, p * 2)


def test_a_request_that_does_not_fit_leads_the_next_batch():
    calls: list = []
    gate = threading.Event()
    b = Batcher(_recorder(calls), [4], max_batch_size=4, max_queue_delay_ms=0, max_queue_size=10,
                on_start=lambda: gate.wait(5))
    futures = [b.submit([np.ones((n, 1), np.float32)], n) for n in (3, 2, 2)]
    gate.set()
    [f.result(5) for f in futures]
    b.close()
    assert [int((c[1] != 0).any(axis=1).sum()) for c in calls] == [3, 4]


def test_without_dynamic_batching_each_request_runs_alone():
    calls: list = []
    gate = threading.Event()
    b = Batcher(_recorder(calls), [1, 2], max_batch_size=2, max_queue_delay_ms=1000, max_queue_size=10,
                dynamic=False, on_start=lambda: gate.wait(5))
    futures = [b.submit([np.ones((1, 1), np.float32)], 1) for _ in range(3)]
    gate.set()
    [f.result(5) for f in futures]
    b.close()
    assert [c[0] for c in calls] == [1, 1, 1]


def test_full_queue_refuses_and_close_drains():
    gate = threading.Event()
    b = Batcher(_recorder([]), [1], max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2,
                on_start=lambda: gate.wait(5))
    futures = [b.submit([np.ones((1, 1), np.float32)], 1) for _ in range(2)]
    with pytest.raises(Overloaded):
        b.submit([np.ones((1, 1), np.float32)], 1)
    gate.set()
    b.close()  # returns after the queued requests ran
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(Closed):
        b.submit([np.ones((1, 1), np.float32)], 1)


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    def run(bucket, inputs):
        if inputs[0][0, 0] < 0:
            raise RuntimeError("kernel fault")
        return [inputs[0]]

    b = Batcher(run, [1], max_batch_size=1, max_queue_delay_ms=0, max_queue_size=4)
    bad = b.submit([np.full((1, 1), -1, np.float32)], 1)
    with pytest.raises(RuntimeError, match="kernel fault"):
        bad.result(5)
    assert b.submit([np.ones((1, 1), np.float32)], 1).result(5)[0][0, 0] == 1
    b.close()


@pytest.mark.parametrize("delay_ms", [float("nan"), float("inf"), 1e300, -1])
def test_a_delay_the_timer_cannot_wait_is_refused(delay_ms):
    with pytest.raises(ValueError, match="max_queue_delay_ms"):  # it used to kill the worker at the first request
        Batcher(_recorder([]), [1], max_batch_size=1, max_queue_delay_ms=delay_ms, max_queue_size=2)


def test_a_dead_worker_fails_queued_and_later_requests_instead_of_hanging():
    gate = threading.Event()
    depths: list[int] = []

    def on_depth(depth: int) -> None:  # a callback that breaks once the worker runs: our bug, simulated
        depths.append(depth)
        if gate.is_set():
            raise RuntimeError("observer broke")

    b = Batcher(_recorder([]), [1], max_batch_size=1, max_queue_delay_ms=0, max_queue_size=4,
                on_depth=on_depth, on_start=lambda: gate.wait(5))
    futures = [b.submit([np.ones((1, 1), np.float32)], 1) for _ in range(3)]
    gate.set()
    for f in futures:  # the one being taken and the two still queued
        with pytest.raises(WorkerDied, match="observer broke"):
            f.result(5)
    later = b.submit([np.ones((1, 1), np.float32)], 1)
    with pytest.raises(WorkerDied, match="RuntimeError: observer broke"):
        later.result(5)
    b.close(5)
    assert not b._thread.is_alive()


def test_a_cancelled_request_is_skipped_and_the_worker_goes_on():
    calls: list = []
    gate = threading.Event()
    b = Batcher(_recorder(calls), [1], max_batch_size=1, max_queue_delay_ms=0, max_queue_size=4,
                on_start=lambda: gate.wait(5))
    gone = b.submit([np.full((1, 1), 7, np.float32)], 1)
    assert gone.cancel()  # what asyncio does to the wrapped future when the client goes away
    kept = b.submit([np.ones((1, 1), np.float32)], 1)
    gate.set()
    assert kept.result(5)[0][0, 0] == 2
    assert [c[1][0, 0] for c in calls] == [1]  # the cancelled one never ran
    b.close()


def test_a_closed_batcher_lets_go_of_its_callbacks():
    """The run callback is a served version's bound method; kept after close, it makes a version ↔ batcher
    cycle that only the cyclic GC frees (issue 13: 24 reloads kept 1.7 GB)."""
    class Owner:
        def run(self, bucket, inputs):
            if inputs[0][0, 0] < 0:
                raise RuntimeError("kernel fault")  # its traceback must not keep the owner alive either
            return [inputs[0]]

    quiet = logging.getLogger("kiln.serve.batcher")
    quiet.disabled = True  # pytest keeps every log record, and a record's exc_info holds the traceback
    gc.disable()
    try:
        owner = Owner()
        ref = weakref.ref(owner)
        b = Batcher(owner.run, [1], max_batch_size=1, max_queue_delay_ms=0, max_queue_size=4)
        b.submit([np.ones((1, 1), np.float32)], 1).result(5)
        failed = b.submit([np.full((1, 1), -1, np.float32)], 1)
        with pytest.raises(RuntimeError):
            failed.result(5)
        b.close()
        del owner, failed
        assert ref() is None
    finally:
        gc.enable()
        quiet.disabled = False


def test_unbatched_requests_run_alone_and_get_whole_outputs():
    calls: list = []
    b = Batcher(_recorder(calls), [1], max_batch_size=8, max_queue_delay_ms=5, max_queue_size=4, batched=False)
    x = np.arange(6, dtype=np.float32).reshape(3, 2)  # no batch dim: 3 is not a row count
    out = b.submit([x], 1).result(5)[0]
    b.close()
    assert b.max_batch_size == 1 and out.shape == (3, 2)
    np.testing.assert_array_equal(out, x * 2)
    np.testing.assert_array_equal(calls[0][1], x)  # not padded, not merged
