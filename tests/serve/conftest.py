"""A tiny CNN compiled into a serving repository once per session, and servers started on free loopback ports."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import onnx
import pytest
from kiln.runtime.model import load
from kiln.serve.app import BackgroundServer, create_app
from kiln.serve.repository import ModelRepository
from onnx import TensorProto, helper

from kiln.model_builders import GraphBuilder
from kiln.repo_builder import add_version

SIZE, CLASSES = 16, 10
BUCKETS = (1, 2, 4)


def tiny_cnn(seed: int) -> onnx.ModelProto:
    """Two convs and a classifier on [N, 3, 16, 16]; the batch dim is symbolic, so it compiles per bucket."""
    g = GraphBuilder("tiny_cnn", seed)
    x = g.op("Relu", [g.op("Conv", ["data", g.weight((8, 3, 3, 3), 27, "conv.w")], kernel_shape=[3, 3],
                           pads=[1] * 4)])
    x = g.op("Relu", [g.op("Conv", [x, g.weight((8, 8, 3, 3), 72, "conv.w")], kernel_shape=[3, 3], pads=[1] * 4)])
    y = g.classifier(x, 8, CLASSES)
    return g.model([helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                   [(y, TensorProto.FLOAT, ["N", CLASSES])])


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """REPO/tiny/{1,2}: two versions with different weights (seeds 0 and 1), buckets 1, 2, 4."""
    root = tmp_path_factory.mktemp("built")
    for seed in (0, 1):
        add_version(tiny_cnn(seed), root, "tiny", max_batch=4, buckets=BUCKETS)
    return root


def reference(built: Path, version: int, x: np.ndarray) -> np.ndarray:
    """Row by row through the batch-1 artifact: what a batched answer must equal."""
    m = load(built / "tiny" / str(version) / "model_b1.so")
    return np.concatenate([m.run(x[i:i + 1])[0] for i in range(x.shape[0])])


def make_repo(built: Path, dest: Path, versions=(1,), config: dict | None = None) -> Path:
    (dest / "tiny").mkdir(parents=True)
    for v in versions:
        shutil.copytree(built / "tiny" / str(v), dest / "tiny" / str(v))
    cfg = {"max_batch_size": 4, "max_queue_delay_ms": 5}
    cfg.update(config or {})
    (dest / "tiny" / "config.json").write_text(json.dumps(cfg))
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve_repo():
    """serve_repo(path, **app_options) → (url, ModelRepository); servers stop at the end of the test."""
    running = []

    def start(path: Path, poll_s: float = 0, **options):
        repo = ModelRepository(path)
        repo.load_all()
        if poll_s:
            repo.watch(poll_s)
        server = BackgroundServer(create_app(repo, **options), free_port()).__enter__()
        running.append((server, repo))
        return server.url, repo

    yield start
    for server, repo in running:
        server.__exit__(None, None, None)
        repo.close()


OUT = "gemm0"  # the tiny CNN's output


def sample(seed: int = 0, rows: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, SIZE, SIZE)).astype(np.float32)


def infer(client, x: np.ndarray, model: str = "tiny", version: str = "") -> tuple[str, np.ndarray]:
    """One request through tritonclient: the version that answered, and the output."""
    import tritonclient.http as triton

    inp = triton.InferInput("data", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], model_version=version)
    return result.get_response()["model_version"], result.as_numpy(OUT)
