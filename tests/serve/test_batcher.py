"""The batcher alone: merging, padding to buckets, splitting, the queue bound, draining on close."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from kiln.serve.batcher import Batcher, Closed, Overloaded


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
