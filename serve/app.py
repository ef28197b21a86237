"""The HTTP service: KServe v2 / Open Inference Protocol routes, the repository API and /metrics, over a
ModelRepository. Every failure inside a request becomes a 4xx/5xx answer with {"error": message}; none
reaches the server loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import kiln

from .batcher import Closed, Overloaded
from .metrics import Metrics
from .protocol import (
    HEADER_LENGTH,
    BadRequest,
    PayloadTooLarge,
    ServeError,
    Unavailable,
    encode_infer_response,
    parse_infer_request,
)
from .repository import ModelRepository

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 << 20
RETRY_AFTER_S = "1"
OUTCOMES = {400: "bad_request", 404: "not_found", 413: "too_large", 503: "unavailable"}


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit` bytes (a lying Content-Length cannot exhaust memory)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit} (--max-body-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(repo: ModelRepository, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="kiln serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics: Metrics = repo.metrics

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": f"{request.method} {request.url.path}: {err.detail}"},
                            status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed", extra={"path": request.url.path})
        return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}"}, status_code=500)

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "kiln", "version": kiln.__version__,
                "extensions": ["binary_tensor_data", "model_repository"]}

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if repo.ready():
            return JSONResponse({})
        return JSONResponse({"error": "not every model has a serving version"}, status_code=503)

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: str | None = None) -> dict:
        lv = repo.pick(model, version) if version is not None else _newest(model)
        meta = lv.metadata()
        if version is None:
            meta["versions"] = [str(v) for v in sorted(repo.models[model].serving)]
        return meta

    def _newest(model: str):
        repo.pick(model, None)  # raises the right error when nothing serves
        serving = repo.models[model].serving
        return serving[max(serving)]

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str | None = None) -> Response:
        try:
            repo.pick(model, version)
        except ServeError as err:
            return JSONResponse({"error": str(err)}, status_code=503 if err.status == 503 else err.status)
        return JSONResponse({})

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(request: Request, model: str, version: str | None = None) -> Response:
        t0 = time.perf_counter()
        label, outcome = version or "", "error"
        try:
            repo.pick(model, version)  # an unknown model or version fails before its body is read
            body = await _read_body(request, max_body_bytes)
            req = parse_infer_request(body, request.headers.get(HEADER_LENGTH))
            for _attempt in range(3):  # a swap retires the picked version between pick and submit: pick again
                lv = repo.pick(model, version)
                label = lv.label
                arrays, rows = lv.check(req)
                try:
                    future = lv.batcher.submit(arrays, rows)
                    break
                except Closed:
                    continue
                except Overloaded:
                    outcome = "overloaded"
                    raise Unavailable(f"model '{model}' version {label}: queue is full "
                                      f"({lv.batcher.max_queue_size} requests); retry later",
                                      {"Retry-After": RETRY_AFTER_S}) from None
            else:
                raise Unavailable(f"model '{model}' is being swapped; retry", {"Retry-After": RETRY_AFTER_S})
            queued = time.perf_counter()
            try:
                outputs = await asyncio.wrap_future(future)
            except Exception as err:  # noqa: BLE001  (the batch failed: this request answers 500, the server goes on)
                raise ServeError(f"model '{model}' version {label}: inference failed: {err}") from None
            metrics.queue_wait.labels(model, label).observe(time.perf_counter() - queued)
            names = req.outputs or [t.name for t in lv.outputs]
            by_name = {t.name: o for t, o in zip(lv.outputs, outputs)}
            payload, headers = encode_infer_response(model, label, req, [(n, by_name[n]) for n in names])
        except ServeError as err:
            if outcome != "overloaded":
                outcome = OUTCOMES.get(err.status, "error")
            metrics.requests.labels(model, label, outcome).inc()
            if err.status < 500:
                log.info("bad request", extra={"model": model, "version": label, "status": err.status,
                                               "error": str(err)})
            raise
        metrics.requests.labels(model, label, "ok").inc()
        metrics.latency.labels(model, label).observe(time.perf_counter() - t0)
        media = headers.pop("Content-Type")
        return Response(payload, media_type=media, headers=headers)

    @app.post("/v2/repository/index")
    async def repository_index() -> list:
        return repo.index()

    @app.post("/v2/repository/models/{model}/load")
    async def load_model(request: Request, model: str) -> dict:
        body = await _read_body(request, max_body_bytes)
        override = None
        if body.strip():
            try:
                req = json.loads(body)
            except ValueError as err:
                raise BadRequest(f"load request body is not valid JSON: {err}") from None
            params = (req or {}).get("parameters") or {}
            if not isinstance(params, dict):
                raise BadRequest("load request field 'parameters' must be an object")
            unknown = sorted(k for k in params if k != "config")
            if unknown:
                raise BadRequest(f"load request parameters {unknown} are not supported (only 'config'; files "
                                 f"come from the repository directory)")
            if params.get("config") is not None:
                config = params["config"]
                try:
                    override = json.loads(config) if isinstance(config, str) else config
                except ValueError as err:
                    raise BadRequest(f"load request parameters.config is not valid JSON: {err}") from None
        versions = await run_in_threadpool(repo.load, model, override)
        return {"model": model, "serving_versions": [str(v) for v in versions]}

    @app.post("/v2/repository/models/{model}/unload")
    async def unload_model(model: str) -> dict:
        await run_in_threadpool(repo.unload, model)
        return {}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


class BackgroundServer:
    """uvicorn in a thread, for tests and embedding: `with BackgroundServer(app, port) as s: ...`."""

    def __init__(self, app: FastAPI, port: int, host: str = "127.0.0.1"):
        self.url = f"{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False, log_config=None))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve(repo_path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, poll_s: float = 2.0,
          num_threads: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Load every model in the repository, watch it for changes, and serve until interrupted."""
    repo = ModelRepository(repo_path, num_threads=num_threads)
    repo.load_all()
    if poll_s > 0:
        repo.watch(poll_s)
    log.info("serving", extra={"repository": str(repo_path), "host": host, "port": port,
                               "models": {n: sorted(e.serving) for n, e in repo.models.items()}})
    try:
        uvicorn.run(create_app(repo, max_body_bytes=max_body_bytes), host=host, port=port, access_log=False,
                    log_config=None)
    finally:
        repo.close()
