"""The HTTP service through tritonclient, unchanged: metadata, JSON and binary tensors, batching, bad input,
overload, metrics."""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from .conftest import CLASSES, SIZE, make_repo, reference


def _infer(client, x: np.ndarray, binary: bool = True, version: str = "", dtype: str = "FP32", name: str = "data"):
    inp = triton.InferInput(name, list(x.shape), dtype)
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput(client_output_name(), binary_data=binary)
    return client.infer("tiny", [inp], model_version=version, outputs=[out])


def client_output_name() -> str:
    return "gemm0"  # GraphBuilder names the classifier's Gemm output


def _sample(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def _post(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", path, body, headers or {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), json.loads(data) if data else {}


def test_health_metadata_and_index(built, tmp_path, serve_repo):
    url, _ = serve_repo(make_repo(built, tmp_path))
    client = triton.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("tiny", "2") and not client.is_model_ready("nope")
    meta = client.get_model_metadata("tiny")
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "data", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]}]
    assert meta["outputs"] == [{"name": client_output_name(), "datatype": "FP32", "shape": [-1, CLASSES]}]
    assert client.get_model_repository_index() == [{"name": "tiny", "version": "1", "state": "READY",
                                                     "reason": ""}]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_infer_equals_unbatched_run(built, tmp_path, serve_repo, binary, rows):
    url, _ = serve_repo(make_repo(built, tmp_path))
    client = triton.InferenceServerClient(url)
    x = _sample(rows, seed=rows)
    result = _infer(client, x, binary=binary)
    got = result.as_numpy(client_output_name())
    assert got.shape == (rows, CLASSES)
    np.testing.assert_allclose(got, reference(built, 1, x), rtol=1e-5, atol=1e-6)  # 3 rows run in bucket 4
    assert result.get_response()["model_version"] == "1"


def test_concurrent_requests_merge_into_batches(built, tmp_path, serve_repo):
    url, repo = serve_repo(make_repo(built, tmp_path, config={"max_queue_delay_ms": 50}))
    xs = [_sample(1, seed=i) for i in range(16)]
    barrier = threading.Barrier(16)

    def one(i: int) -> np.ndarray:
        client = triton.InferenceServerClient(url)
        barrier.wait()
        return _infer(client, xs[i]).as_numpy(client_output_name())

    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(one, range(16)))
    for x, got in zip(xs, outs):
        np.testing.assert_allclose(got, reference(built, 1, x), rtol=1e-5, atol=1e-6)  # each gets its own rows
    batches = repo.metrics.batch_rows.labels("tiny", "1")._sum.get(), repo.metrics.batch_rows.labels(
        "tiny", "1")._buckets
    rows_total = batches[0]
    runs = sum(b.get() for b in batches[1])
    assert rows_total == 16
    assert runs < 16, f"16 concurrent requests ran as {runs} batches: nothing merged"


def test_bad_requests_answer_4xx_naming_the_field(built, tmp_path, serve_repo):
    url, _ = serve_repo(make_repo(built, tmp_path), max_body_bytes=1 << 20)
    client = triton.InferenceServerClient(url)
    x = _sample(1)
    cases = [
        (lambda: _infer(client, x, name="image"), "unexpected ['image']"),
        (lambda: _infer(client, x.astype(np.float64), dtype="FP64"), "input 'data' expects FP32"),
        (lambda: _infer(client, x[:, :, :8]), "got shape [1, 3, 8, 16]"),
        (lambda: _infer(client, _sample(5)), "batch size (dim 0 of the inputs) must be 1..4"),
        (lambda: _infer(client, x, version="7"), "version 7 is not serving"),
        (lambda: client.infer("nope", [triton.InferInput("data", [1], "FP32")]), "unknown model 'nope'"),
    ]
    for call, expected in cases:
        with pytest.raises(InferenceServerException) as info:
            call()
        assert expected in info.value.message(), info.value.message()
        assert info.value.status() in ("400", "404")
    status, _, body = _post(url, "/v2/models/tiny/infer", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]
    status, _, body = _post(url, "/v2/models/tiny/infer", json.dumps(
        {"inputs": [{"name": "data", "shape": [1, 3, SIZE, SIZE], "datatype": "FP32", "data": [1.0, 2.0]}]}).encode())
    assert status == 400 and "input 'data'.data has 2 values" in body["error"]
    status, _, body = _post(url, "/v2/models/tiny/infer", json.dumps({"input": []}).encode())
    assert status == 400 and "'inputs'" in body["error"]
    status, _, body = _post(url, "/v2/models/tiny/infer", b"x" * (2 << 20))
    assert status == 413 and "limit is 1048576" in body["error"]
    # the server is still whole
    np.testing.assert_allclose(_infer(client, x).as_numpy(client_output_name()), reference(built, 1, x),
                               rtol=1e-5, atol=1e-6)


def test_full_queue_answers_503_with_retry_after(built, tmp_path, serve_repo):
    url, repo = serve_repo(make_repo(built, tmp_path, config={"max_queue_size": 2, "dynamic_batching": False}))
    version = repo.models["tiny"].serving[1]
    gate, started = threading.Event(), threading.Event()
    run = version._run_bucket

    def held(bucket, inputs):  # the worker blocks on its first batch, so the queue fills behind it
        started.set()
        gate.wait(10)
        return run(bucket, inputs)

    version.batcher._run_bucket = held
    body = json.dumps({"inputs": [{"name": "data", "shape": [1, 3, SIZE, SIZE], "datatype": "FP32",
                                   "data": _sample(1).ravel().tolist()}]}).encode()
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(_post, url, "/v2/models/tiny/infer", body)
        assert started.wait(10)
        queued = [pool.submit(_post, url, "/v2/models/tiny/infer", body) for _ in range(2)]
        while version.batcher.queue_depth() < 2:
            threading.Event().wait(0.01)
        status, headers, answer = _post(url, "/v2/models/tiny/infer", body)
        assert status == 503 and headers["retry-after"] == "1" and "queue is full" in answer["error"]
        gate.set()
        assert [f.result()[0] for f in [first, *queued]] == [200, 200, 200]
    text = triton_metrics(url)
    assert 'kiln_requests_total{model="tiny",outcome="overloaded",version="1"} 1.0' in text
    assert 'kiln_requests_total{model="tiny",outcome="ok",version="1"} 3.0' in text


def triton_metrics(url: str) -> str:
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def test_metrics_are_labelled_by_model_and_version(built, tmp_path, serve_repo):
    url, _ = serve_repo(make_repo(built, tmp_path))
    client = triton.InferenceServerClient(url)
    for rows in (1, 3):
        _infer(client, _sample(rows))
    text = triton_metrics(url)
    assert 'kiln_requests_total{model="tiny",outcome="ok",version="1"} 2.0' in text
    assert 'kiln_batch_size_sum{model="tiny",version="1"} 4.0' in text
    assert 'kiln_batch_padding_rows_total{model="tiny",version="1"} 1.0' in text  # 3 rows padded to 4
    assert 'kiln_request_latency_seconds_count{model="tiny",version="1"} 2.0' in text
    assert 'kiln_queue_depth{model="tiny",version="1"}' in text
