"""Model management: versions go live only after a warm-up, failed loads leave the serving version alone,
rollback, file watching, traffic split, and swaps under load that drop nothing."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from .conftest import make_repo, reference
from .conftest import infer as _infer
from .conftest import sample as _x

def _specific(*versions: int) -> str:
    return json.dumps({"version_policy": {"specific": {"versions": list(versions)}}})


def test_load_new_version_then_roll_back(built, tmp_path, serve_repo):
    root = make_repo(built, tmp_path)
    url, _ = serve_repo(root)
    client = triton.InferenceServerClient(url)
    x = _x()
    assert _infer(client, x)[0] == "1"
    shutil.copytree(built / "tiny" / "2", root / "tiny" / "2")
    client.load_model("tiny")  # latest policy: version 2 replaces 1
    version, y = _infer(client, x)
    assert version == "2"
    np.testing.assert_allclose(y, reference(built, 2, x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(reference(built, 1, x), reference(built, 2, x))  # the versions really differ
    client.load_model("tiny", config=_specific(1))  # rollback
    version, y = _infer(client, x)
    assert version == "1"
    np.testing.assert_allclose(y, reference(built, 1, x), rtol=1e-5, atol=1e-6)
    states = {r["version"]: r["state"] for r in client.get_model_repository_index()}
    assert states == {"1": "READY", "2": "UNAVAILABLE"}


def test_failed_load_keeps_the_serving_version(built, tmp_path, serve_repo):
    root = make_repo(built, tmp_path)
    url, repo = serve_repo(root)
    client = triton.InferenceServerClient(url)
    bad = root / "tiny" / "2"
    shutil.copytree(built / "tiny" / "2", bad)
    (bad / "model_b2.so").write_bytes((bad / "model_b2.so").read_bytes()[:4096])  # truncated artifact
    with pytest.raises(InferenceServerException) as info:
        client.load_model("tiny")
    assert "still serving versions [1]" in info.value.message() and "model_b2.so" in info.value.message()
    version, y = _infer(client, _x())
    assert version == "1"
    np.testing.assert_allclose(y, reference(built, 1, _x()), rtol=1e-5, atol=1e-6)
    row = next(r for r in client.get_model_repository_index() if r["version"] == "2")
    assert row["state"] == "UNAVAILABLE" and "model_b2.so" in row["reason"]
    assert repo.metrics.loads.labels("tiny", "2", "failed")._value.get() == 1


def test_buckets_that_disagree_fail_warm_up(built, tmp_path, serve_repo):
    root = make_repo(built, tmp_path)
    url, _ = serve_repo(root)
    mixed = root / "tiny" / "3"
    shutil.copytree(built / "tiny" / "1", mixed)
    shutil.copy(built / "tiny" / "2" / "model_b4.so", mixed / "model_b4.so")  # other weights in one bucket
    client = triton.InferenceServerClient(url)
    with pytest.raises(InferenceServerException) as info:
        client.load_model("tiny")
    assert "model_b4.so: warm-up output 'gemm0' differs" in info.value.message()
    assert _infer(client, _x())[0] == "1"


def test_a_model_that_mixes_the_batch_fails_warm_up(tmp_path):
    # y = x - mean over the batch: each bucket is self-consistent and a zero-padded batch-1 request even gives
    # the right answer, but a batch of strangers' requests would see each other's data
    from kiln.repo_builder import add_version
    from kiln.model_builders import GraphBuilder
    from kiln.serve.protocol import LoadFailed
    from kiln.serve.repository import ModelRepository
    from onnx import TensorProto, helper

    g = GraphBuilder("mixer")
    y = g.op("Sub", ["x", g.op("ReduceSum", ["x", g.const(np.array([0], np.int64))], keepdims=1)])
    model = g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                    [(y, TensorProto.FLOAT, ["N", 8])])
    add_version(model, tmp_path, "mixer", max_batch=2, buckets=(1, 2))
    repo = ModelRepository(tmp_path)
    with pytest.raises(LoadFailed, match="model_b2.so: warm-up output 'sub0' for one request changed with the other "
                                         "requests in its batch"):
        repo.load("mixer")
    repo.close()


def test_watcher_brings_a_new_version_live(built, tmp_path, serve_repo):
    root = make_repo(built, tmp_path)
    url, _ = serve_repo(root, poll_s=0.05)
    client = triton.InferenceServerClient(url)
    shutil.copytree(built / "tiny" / "2", root / "tiny" / ".incoming")
    (root / "tiny" / ".incoming").rename(root / "tiny" / "2")  # as `kiln repo add` does: whole, at once
    deadline = time.monotonic() + 10
    while client.get_model_metadata("tiny")["versions"] != ["2"]:
        assert time.monotonic() < deadline, "the watcher did not load version 2 within 10 s"
        time.sleep(0.05)
    assert _infer(client, _x())[0] == "2"


def test_traffic_split_sends_both_versions_and_counts_each(built, tmp_path, serve_repo):
    root = make_repo(built, tmp_path, versions=(1, 2), config={
        "version_policy": {"all": {}}, "traffic_split": {"1": 1, "2": 3}})
    url, repo = serve_repo(root)
    client = triton.InferenceServerClient(url)
    x = _x()
    seen = Counter()
    for _ in range(80):
        version, y = _infer(client, x)
        seen[version] += 1
        np.testing.assert_allclose(y, reference(built, int(version), x), rtol=1e-5, atol=1e-6)
    assert 8 <= seen["1"] <= 35 and seen["1"] + seen["2"] == 80, seen  # 1:3 split, seeded draws
    for v in ("1", "2"):
        assert repo.metrics.requests.labels("tiny", v, "ok")._value.get() == seen[v]
    assert _infer(client, x, version="1")[0] == "1"  # a named version bypasses the split


def test_swaps_under_load_drop_nothing(built, tmp_path, serve_repo):
    root = make_repo(built, tmp_path, versions=(1, 2), config={"version_policy": {"specific": {"versions": [1]}}})
    url, _ = serve_repo(root)
    x = _x(rows=2)
    expected = {"1": reference(built, 1, x), "2": reference(built, 2, x)}
    stop, failures, answers = threading.Event(), [], Counter()

    def load() -> None:
        client = triton.InferenceServerClient(url)
        while not stop.is_set():
            try:
                version, y = _infer(client, x)
                np.testing.assert_allclose(y, expected[version], rtol=1e-5, atol=1e-6)
                answers[version] += 1
            except Exception as err:  # noqa: BLE001  (counted: the assertion below reports them)
                failures.append(repr(err))

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    admin = triton.InferenceServerClient(url)
    for i in range(6):
        time.sleep(0.1)
        admin.load_model("tiny", config=_specific(2 if i % 2 == 0 else 1))
    time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert answers["1"] > 0 and answers["2"] > 0, answers
