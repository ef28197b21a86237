"""Request fuzzing (issue 13): hypothesis draws bodies (JSON and binary-extension), headers, shapes, datatypes,
URLs, load-request configs and raw bytes. Every answer must be 2xx or 4xx, with {"error": message} for a 4xx,
within a deadline, and the server must stay up. One server on 127.0.0.1 serves the whole module; every loop
is bounded in count (max_examples) and every request in time (DEADLINE_S)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections import Counter
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kiln.serve.app import BackgroundServer, create_app
from kiln.serve.protocol import DATATYPES, HEADER_LENGTH
from kiln.serve.repository import ModelRepository

from .conftest import SIZE, free_port, make_repo

DEADLINE_S = 3.0  # a 4xx is answered in milliseconds; a 408 after BODY_TIMEOUT_S
BODY_TIMEOUT_S = 0.3
MAX_BODY = 1 << 20
ROW = 3 * SIZE * SIZE
SENT: Counter = Counter()  # answers by status, over the module


def fuzz(examples: int) -> settings:
    """`examples` requests, derandomized (tests/conftest.py); our own DEADLINE_S replaces hypothesis' deadline."""
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def server(built, tmp_path_factory):
    repo = ModelRepository(make_repo(built, tmp_path_factory.mktemp("fuzz"), config={"max_queue_delay_ms": 0}))
    repo.load_all()
    app = create_app(repo, max_body_bytes=MAX_BODY, body_timeout_s=BODY_TIMEOUT_S, model_control="explicit")
    with BackgroundServer(app, free_port()) as s:
        yield s.url
    repo.close()


def send(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, bytes]:
    """One request on a fresh connection; fails unless it is answered 2xx/4xx (4xx: a JSON error) in time."""
    host, port = url.split(":")
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, int(port), timeout=DEADLINE_S)
    try:
        conn.request(method, path, body if method == "POST" else None, headers or {})
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    SENT[r.status] += 1
    seconds = time.monotonic() - t0
    where = f"{method} {path[:80]} {body[:120]!r} {headers}"
    assert seconds < DEADLINE_S, f"{where}: answered after {seconds:.2f} s"
    assert 200 <= r.status < 500, f"{where}: {r.status} {data[:300]!r}"
    if r.status >= 400:
        error = json.loads(data).get("error")
        assert isinstance(error, str) and error, f"{where}: {r.status} without an error message: {data[:300]!r}"
    return r.status, data


def raw(url: str, request: bytes, close_write: bool = True) -> int:
    """Bytes written straight to the socket; the status of the first answer, 0 if the server closed without one."""
    host, port = url.split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as s:
        s.sendall(request)
        if close_write:
            s.shutdown(socket.SHUT_WR)  # EOF: garbage without an end of headers cannot wait for more
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    SENT[status] += 1
    seconds = time.monotonic() - t0
    assert seconds < DEADLINE_S, f"{request[:120]!r}: answered after {seconds:.2f} s"
    return status


def alive(url: str) -> None:
    status, _ = send(url, "GET", "/v2/health/live")
    assert status == 200


# --- strategies ------------------------------------------------------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False)
           | st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
dims = st.integers(0, 5) | st.sampled_from([3, SIZE, 1 << 31, 1 << 63, 1 << 64]) | st.integers(-3, -1) | values
shapes = st.lists(dims, max_size=6) | values | st.lists(st.integers(0, 1 << 66), max_size=4)
datatypes = st.sampled_from([*DATATYPES, "BYTES", "fp32", ""]) | values
names = st.sampled_from(["data", "", "gemm0"]) | st.text(max_size=10) | values
params = st.none() | values | st.fixed_dictionaries({}, optional={"binary_data_size": values | st.integers(-2, 1 << 40),
                                                                  "binary_data": values})
outputs = st.none() | values | st.lists(st.fixed_dictionaries({"name": names}, optional={"parameters": params}),
                                        max_size=3)
FIELDS = {"name": names, "shape": shapes, "datatype": datatypes, "parameters": params,
          "data": values | st.lists(st.floats(width=32) | st.integers(-300, 300), max_size=8)}


@st.composite
def infer_bodies(draw) -> bytes:
    """A valid request with 0..3 fields replaced or dropped, extra top-level fields, or plain junk."""
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "junk_json", "junk_bytes"]))
    if kind == "junk_json":
        return json.dumps(draw(values)).encode()
    if kind == "junk_bytes":
        return draw(st.binary(max_size=64))
    rows = draw(st.integers(1, 5))
    t = {"name": "data", "shape": [rows, 3, SIZE, SIZE], "datatype": "FP32", "data": [0.25] * (rows * ROW)}
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True)):
        if draw(st.booleans()):
            t.pop(key, None)
        else:
            t[key] = draw(FIELDS[key])
    req = {"inputs": draw(st.sampled_from([[t], [t, t], [t, {"name": "x"}]]) | values)
           if draw(st.integers(0, 9)) == 0 else [t]}
    for key, strategy in (("outputs", outputs), ("parameters", params), ("id", values)):
        if draw(st.integers(0, 3)) == 0:
            req[key] = draw(strategy)
    return json.dumps(req).encode()


@st.composite
def binary_bodies(draw) -> tuple[bytes, str]:
    """Binary-extension requests: a JSON header, raw tensor bytes, and Inference-Header-Content-Length."""
    rows = draw(st.integers(0, 5))
    datatype = draw(st.sampled_from(["FP32", "FP32", "FP64", "INT8", "BOOL", "UINT64"]))
    shape = [rows, 3, SIZE, SIZE] if draw(st.integers(0, 3)) else draw(shapes)
    nbytes = rows * ROW * {"FP32": 4, "FP64": 8, "INT8": 1, "BOOL": 1, "UINT64": 8}[datatype]
    size = nbytes if draw(st.integers(0, 3)) else draw(st.integers(-2, 1 << 40) | values)
    header = {"inputs": [{"name": "data", "shape": shape, "datatype": datatype,
                          "parameters": {"binary_data_size": size}}]}
    if draw(st.booleans()):
        header["outputs"] = [{"name": "gemm0", "parameters": {"binary_data": draw(st.booleans() | values)}}]
    head = json.dumps(header).encode()
    blob = bytes(min(nbytes, MAX_BODY // 2))
    blob = blob[:draw(st.integers(0, len(blob)))] if draw(st.integers(0, 4)) == 0 else blob
    blob += draw(st.binary(max_size=8)) if draw(st.integers(0, 4)) == 0 else b""
    length = str(len(head)) if draw(st.integers(0, 3)) else draw(
        st.integers(-5, 1 << 70).map(str) | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=8))
    return head + blob, length


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
header_names = st.sampled_from(["Content-Type", "Content-Encoding", HEADER_LENGTH, "Accept", "Accept-Encoding",
                                "Expect", "Authorization", "X-Request-Id"]) | st.from_regex(
    r"X-[A-Za-z0-9-]{1,12}", fullmatch=True)
url_text = st.text(max_size=12) | st.sampled_from(["tiny", "1", "0", "..", ".", "%", "²", "-1", "1" * 5000])


def _valid(rows: int = 1) -> bytes:
    return json.dumps({"inputs": [{"name": "data", "shape": [rows, 3, SIZE, SIZE], "datatype": "FP32",
                                   "data": [0.5] * (rows * ROW)}]}).encode()


# --- tests -------------------------------------------------------------------------------------------------------
@fuzz(400)
@given(body=infer_bodies())
def test_fuzzed_json_bodies(server, body):
    send(server, "POST", "/v2/models/tiny/infer", body, {"Content-Type": "application/json"})


@fuzz(200)
@given(request=binary_bodies())
def test_fuzzed_binary_bodies(server, request):
    body, length = request
    send(server, "POST", "/v2/models/tiny/infer", body, {"Content-Type": "application/octet-stream",
                                                         HEADER_LENGTH: length})


@fuzz(100)
@given(headers=st.dictionaries(header_names, header_text, max_size=4))
def test_fuzzed_headers(server, headers):
    send(server, "POST", "/v2/models/tiny/infer", _valid(), headers)


@fuzz(200)
@given(model=url_text, version=url_text | st.integers(0, 1 << 80).map(str), route=st.integers(0, 4))
def test_fuzzed_urls(server, model, version, route):
    m, v = quote(model, safe=""), quote(version, safe="")
    method, path = [("GET", f"/v2/models/{m}"), ("GET", f"/v2/models/{m}/versions/{v}"),
                    ("GET", f"/v2/models/{m}/versions/{v}/ready"), ("POST", f"/v2/models/{m}/infer"),
                    ("POST", f"/v2/models/{m}/versions/{v}/infer")][route]
    send(server, method, path, _valid(), {"Content-Type": "application/json"})


configs = values | st.fixed_dictionaries({}, optional={
    "max_batch_size": values | st.integers(-1, 1 << 20), "dynamic_batching": values,
    "max_queue_delay_ms": values | st.floats(), "max_queue_size": values | st.integers(-1, 1 << 40),
    "batch_buckets": values | st.lists(st.integers(-1, 8), max_size=3),
    "version_policy": values | st.fixed_dictionaries({}, optional={"latest": values, "all": values,
                                                                   "specific": values}),
    "traffic_split": values | st.dictionaries(url_text, values | st.floats(), max_size=2),
    "unknown": values})


@fuzz(100)
@given(model=url_text | st.just("tiny"), action=st.sampled_from(["load", "load", "load", "unload"]),
       body=st.none() | values | st.fixed_dictionaries({"parameters": st.fixed_dictionaries(
           {"config": configs | configs.map(json.dumps) | st.text(max_size=20)}, optional={"files": values})}))
def test_fuzzed_repository_requests(server, model, action, body):
    payload = b"" if body is None else json.dumps(body).encode()
    status, _ = send(server, "POST", f"/v2/repository/models/{quote(model, safe='')}/{action}", payload,
                     {"Content-Type": "application/json"})
    if status == 200 or model == "tiny":  # put the model back as the repository has it, for the other tests
        assert send(server, "POST", "/v2/repository/models/tiny/load")[0] == 200


@fuzz(100)
@given(data=st.binary(max_size=200) | st.builds(lambda line, rest: line + b"\r\n" + rest,
                                                st.sampled_from([b"POST /v2/models/tiny/infer HTTP/1.1",
                                                                 b"GET /v2/health/live HTTP/1.1", b"GET / HTTP/9.9"]),
                                                st.binary(max_size=200)))
def test_fuzzed_raw_bytes(server, data):
    assert raw(server, data) in (0, *range(200, 500))  # not HTTP: a 400, or the server closes the connection


HEAD = "POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
LIES = [  # (request, expected status): Content-Length and chunked bodies that lie, malformed framing
    ((HEAD + "Content-Length: 1000\r\n\r\n").encode() + b'{"inputs": [', 408),
    ((HEAD + "Transfer-Encoding: chunked\r\n\r\nFFFFFFFF\r\n").encode() + b"abc", 408),
    ((HEAD + f"Content-Length: 400\r\n{HEADER_LENGTH}: 20\r\n\r\n").encode() + b"x" * 30, 408),
    ((HEAD + f"Content-Length: {MAX_BODY * 4}\r\n\r\n").encode(), 413),
    ((HEAD + "Content-Length: abc\r\n\r\n").encode(), 400),
    ((HEAD + "Content-Length: -5\r\n\r\n").encode(), 400),
    ((HEAD + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode(), 400),
    ((HEAD + "Content-Length: 2\r\n\r\n").encode() + b"{}garbage after the body", 400),
    ((HEAD + "X-Long: " + "a" * 70_000 + "\r\n\r\n").encode(), 400),
    (b"GARBAGE\r\n\r\n", 400),
]


@pytest.mark.parametrize("request_bytes, expected", LIES, ids=[f"lie{i}" for i in range(len(LIES))])
def test_lying_framing(server, request_bytes, expected):
    assert raw(server, request_bytes, close_write=False) == expected
    alive(server)


def test_server_is_whole_after_fuzzing(server):
    """Runs last (file order): the server answers, a valid request is served, metrics hold no fuzzed names."""
    alive(server)
    status, data = send(server, "POST", "/v2/models/tiny/infer", _valid(2), {"Content-Type": "application/json"})
    assert status == 200 and json.loads(data)["outputs"][0]["shape"] == [2, 10]
    _, metrics = send(server, "GET", "/metrics")
    labels = {line.split('model="')[1].split('"')[0] for line in metrics.decode().splitlines()
              if 'model="' in line}
    assert labels <= {"tiny", "(unknown)"}, sorted(labels)[:10]
    print(f"fuzzed requests by status: {dict(sorted(SENT.items()))}, {SENT.total()} in all")  # pytest -s
