"""The HTTP service through tritonclient, unchanged: metadata, JSON and binary tensors, batching, bad input,
overload, metrics."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as triton
from kiln.serve.protocol import HEADER_LENGTH
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
    # only the headers: the server answers 413 from the declared length and closes, so a client still sending the
    # 2 MB body could meet a broken pipe instead of the answer (it did, once in a full run)
    host, port = url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (2 << 20))
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536) or b"\r\n\r\n"
        head, payload = answer.split(b"\r\n\r\n", 1)
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(payload) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            payload += chunk
    assert head.startswith(b"HTTP/1.1 413") and b"limit is 1048576" in payload, answer[:300]
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


def _raw(url: str, request: bytes, timeout_s: float = 10) -> tuple[int, bytes, float]:
    """One request written as raw bytes (a lying Content-Length, a partial chunked body): status, response, seconds."""
    host, port = url.split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < _response_length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data, time.monotonic() - t0


def _response_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(value)
    return len(data) + 1  # unknown: read until the server closes


def _request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None
             ) -> tuple[int, dict]:
    """status and JSON answer ({"raw": text} if the answer is not JSON; status 0 if the connection broke)."""
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        data = r.read()
    except (ConnectionError, http.client.HTTPException) as err:
        return 0, {"raw": repr(err)}
    finally:
        conn.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, {"raw": data[:200].decode("latin-1")}


def _tensor(**fields) -> bytes:
    t = {"name": "data", "shape": [1, 3, SIZE, SIZE], "datatype": "FP32", "data": [0.0] * (3 * SIZE * SIZE)}
    t.update(fields)
    return json.dumps({"inputs": [{k: v for k, v in t.items() if v is not ...}]}).encode()


MALFORMED = [  # issue 13 item 6: each of these answered 500 (or crashed the handler) before
    (_tensor(shape=[1 << 64], data=[]), "is too large"),  # OverflowError in np.prod
    (_tensor(shape=[1 << 32, 1 << 32], data=[]), "is too large"),  # the int64 product wraps to 0, then reshape
    (_tensor(shape=[0, 1 << 62, 1 << 62], data=[]), "is too large"),  # zero elements, but numpy refuses the shape
    (_tensor(shape=[1] * 40, data=[1.0]), "40 dims"),
    (_tensor(datatype=["FP32"]), "datatype ['FP32'] is not supported"),  # TypeError: unhashable list
    (_tensor(datatype={"a": 1}), "datatype {'a': 1} is not supported"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # RecursionError in json.loads
    (_tensor(data="0.5"), "data must be a list of numbers"),
    (_tensor(data=[[0.0]] * 768, shape=[768, 1]), "input 'data' expects FP32[-1, 3, 16, 16]"),
    (_tensor(parameters=[]), "input 'data'.parameters must be an object"),
    (_tensor(parameters={"binary_data_size": "8"}), "binary_data_size must be a byte count"),
    (_tensor(name="\ud800"), "model 'tiny' takes inputs ['data']"),  # a lone surrogate in the error message
    (json.dumps({"inputs": [json.loads(_tensor())["inputs"][0]], "outputs": "gemm0"}).encode(), "'outputs' must be a list"),
    (json.dumps({"inputs": [json.loads(_tensor())["inputs"][0]], "outputs": [{"name": "gemm0"}] * 2}).encode(),
     "requested twice"),
    (json.dumps({"inputs": [json.loads(_tensor())["inputs"][0]], "outputs": [{"name": "gemm0", "parameters": 3}]}
                ).encode(), "outputs[0].parameters must be an object"),
    (json.dumps({"inputs": [json.loads(_tensor())["inputs"][0]], "parameters": {"binary_data_output": "yes"}}
                ).encode(), "binary_data_output must be true or false"),
    (json.dumps({"inputs": [json.loads(_tensor())["inputs"][0]], "id": {"x": 1}}).encode(), "'id' must be a string"),
]


def test_malformed_requests_answer_400_naming_the_field(built, tmp_path, serve_repo):
    url, _ = serve_repo(make_repo(built, tmp_path))
    wrong = []  # every case is tried, so a failure lists all that answer wrongly

    def expect(path: str, body: bytes | None, expected: str, headers: dict | None = None) -> None:
        status, answer = _request(url, "POST" if body is not None else "GET", path, body, headers)
        if status != 400 or expected not in answer.get("error", ""):
            wrong.append((path[:40], (body or b"")[:80], (headers or {}).get(HEADER_LENGTH, "")[:20], status,
                          str(answer)[:200]))

    for body, expected in MALFORMED:
        expect("/v2/models/tiny/infer", body, expected)
    for header in ("abc", "-1", "1_0", "99999999", "9" * 5000):
        expect("/v2/models/tiny/infer", _tensor(), HEADER_LENGTH, {HEADER_LENGTH: header})
    for path in ("/v2/models/tiny/versions/" + "1" * 5000 + "/infer", "/v2/models/tiny/versions/%C2%B2/infer"):
        expect(path, _tensor(), "version in the URL must be a positive integer")  # int() raised ValueError
    for path in ("/v2/models/tiny/versions/" + "1" * 5000, "/v2/models/tiny/versions/" + "1" * 5000 + "/ready"):
        expect(path, None, "version in the URL must be a positive integer")
    assert not wrong, "\n".join(map(str, wrong))
    client = triton.InferenceServerClient(url)
    x = _sample(1)
    np.testing.assert_allclose(_infer(client, x).as_numpy(client_output_name()), reference(built, 1, x),
                               rtol=1e-5, atol=1e-6)
    text = triton_metrics(url)
    assert "\\ud800" not in text and "1" * 100 not in text  # URLs and names create no metric series


def test_malformed_load_requests_answer_400(built, tmp_path, serve_repo):
    url, _ = serve_repo(make_repo(built, tmp_path), model_control="explicit")
    cases = [
        ("x" * 5000, b"", "model name"),  # OSError 36: File name too long
        ("tiny", b"[1, 2]", "load request body must be a JSON object"),  # AttributeError: list has no .get
        ("tiny", b'{"latest": "x"}', "load request fields ['latest'] are not supported"),
        ("tiny", b"[" * 100_000, "nested too deeply"),
        ("tiny", json.dumps({"parameters": {"config": {"version_policy": {"latest": "x"}}}}).encode(),
         "version_policy"),  # AttributeError inside parse_config
        ("tiny", json.dumps({"parameters": {"config": "[1]"}}).encode(), "parameters.config must be a JSON object"),
        ("tiny", json.dumps({"parameters": {"config": 7}}).encode(), "parameters.config must be a JSON object"),
        ("tiny", json.dumps({"parameters": {"config": '{"max_batch_size": 1e400}'}}).encode(), "max_batch_size"),
        ("tiny", json.dumps({"parameters": []}).encode(), "'parameters' must be an object"),
    ]
    wrong = []
    for model, body, expected in cases:
        status, answer = _request(url, "POST", f"/v2/repository/models/{model}/load", body)
        if status != 400 or expected not in answer.get("error", ""):
            wrong.append((model[:20], body[:60], status, str(answer)[:200]))
    assert not wrong, "\n".join(map(str, wrong))
    status, _, answer = _post(url, f"/v2/repository/models/{'x' * 5000}/unload", b"")
    assert status == 400 and "model name" in answer["error"]
    assert triton.InferenceServerClient(url).is_model_ready("tiny")


def test_a_body_that_stops_short_answers_408(built, tmp_path, serve_repo):
    url, _ = serve_repo(make_repo(built, tmp_path), body_timeout_s=0.5)
    for path in ("/v2/models/tiny/infer", "/v2/repository/models/tiny/load"):
        head = f"POST {path} HTTP/1.1\r\nHost: {url}\r\nContent-Type: application/json\r\n"
        short = (head + "Content-Length: 1000\r\n\r\n").encode() + b'{"inputs": ['  # 12 of 1,000 bytes, then silence
        chunked = (head + "Transfer-Encoding: chunked\r\n\r\nFFFFFFFF\r\n").encode() + b"abc"  # 4 GiB declared
        for request in (short, chunked):
            status, data, seconds = _raw(url, request)  # before: no answer until the client gave up
            assert status == 408 and b"--body-timeout-s" in data, data[:300]
            assert 0.4 < seconds < 3, seconds
            assert b"connection: close" in data.lower()
    assert triton.InferenceServerClient(url).is_server_live()
