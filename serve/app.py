"""The HTTP service: KServe v2 / Open Inference Protocol routes, the repository API and /metrics, over a
ModelRepository. Every failure inside a request becomes a 4xx/5xx answer with {"error": message}; none
reaches the server loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import kiln
from kiln.errors import KilnError

from .batcher import Closed, Overloaded
from .config import ConfigError, parse_config
from .metrics import Metrics
from .protocol import (
    HEADER_LENGTH,
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    RequestTimeout,
    ServeError,
    Unauthorized,
    Unavailable,
    encode_infer_response,
    parse_infer_request,
    parse_json,
    show,
    version_label,
)
from .repository import ModelRepository

log = logging.getLogger(__name__)
audit = logging.getLogger("kiln.serve.control")  # one JSON line per repository-API call: who, what, result

DEFAULT_MAX_BODY_BYTES = 64 << 20
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0  # Triton's --exit-timeout-secs
KEEP_ALIVE_S = 5  # uvicorn closes a keep-alive connection idle this long
MODEL_CONTROL = ("none", "poll", "explicit")  # Triton's --model-control-mode, with poll as `kiln serve`'s default
TOKEN_ENV = "KILN_CONTROL_TOKEN"
NAME_MAX = 255  # bytes in one file name on Linux: a longer model name cannot be a repository directory
RETRY_AFTER_S = "1"
OUTCOMES = {400: "bad_request", 404: "not_found", 408: "timeout", 413: "too_large", 503: "unavailable"}
UNKNOWN_MODEL = "(unknown)"  # the metrics label of requests for models that do not exist: URLs cannot add series


def error_response(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    """{"error": message} as ASCII JSON: a name with a lone surrogate in it cannot break the answer."""
    return Response(json.dumps({"error": message}), status_code=status, media_type="application/json",
                    headers=headers)


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused as soon as it passes `limit` bytes (a lying Content-Length cannot exhaust memory) or
    when it has not arrived within `timeout_s` (a body shorter than its Content-Length cannot hold a worker)."""
    close = {"Connection": "close"}  # the rest of the body stays unread: the connection cannot carry another request
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit} (--max-body-mb)", close)

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes (--max-body-mb)", close)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout_s)
    except ClientDisconnect:  # nobody reads the answer; it only must not count as our error
        raise BadRequest("the client disconnected before sending the whole body") from None
    except asyncio.TimeoutError:
        raise RequestTimeout(f"request body did not arrive within {timeout_s:g} s (--body-timeout-s)",
                             close) from None


def check_model_name(model: str) -> str:
    """A name the repository can look up as a directory (the load API touches the file system with it)."""
    if not model or len(model.encode("utf-8", "surrogatepass")) > NAME_MAX or model.startswith(".") or any(
            c in model for c in "/\\\0"):
        raise BadRequest(f"model name {show(model)} must be 1..{NAME_MAX} bytes, not start with '.', and hold no "
                         f"'/', '\\' or NUL")
    return model


def _bearer(request: Request) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header, as the bytes sent (headers decode as latin-1)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode("latin-1", "replace")


def read_control_token(token_file: str | Path | None, environ: Mapping[str, str]) -> bytes | None:
    """The repository API's bearer token: from the file, else from KILN_CONTROL_TOKEN, else None (no token)."""
    if token_file is not None:
        try:
            token = Path(token_file).read_bytes().strip()
        except OSError as err:
            raise KilnError(f"--control-token-file {str(token_file)!r} cannot be read: {err}") from None
        if not token:
            raise KilnError(f"--control-token-file {str(token_file)!r} is empty")
        return token
    token = environ.get(TOKEN_ENV, "").strip()
    return token.encode() if token else None


def create_app(repo: ModelRepository, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, model_control: str = "explicit",
               control_token: bytes | str | None = None) -> FastAPI:
    """The routes over `repo`. `model_control` decides whether the repository API may load and unload models:
    only "explicit" allows it (`kiln serve` defaults to "poll"; an embedding caller chooses); with a
    `control_token`, only requests that carry it as a bearer token may."""
    if model_control not in MODEL_CONTROL:
        raise KilnError(f"model_control must be one of {list(MODEL_CONTROL)}, got {model_control!r}")
    token = control_token.encode() if isinstance(control_token, str) else control_token
    app = FastAPI(title="kiln serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics: Metrics = repo.metrics

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError) -> Response:
        return error_response(str(err), err.status, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        return error_response(f"{request.method} {show(request.url.path)}: {err.detail}", err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> Response:
        return error_response(f"{request.method} {show(request.url.path)}: {err.errors()}", 422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> Response:
        log.exception("request failed", extra={"path": show(request.url.path, 300)})
        return error_response(f"internal error: {type(err).__name__}: {show(str(err), 300)}", 500)

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
        if version is not None:
            return repo.pick(model, version_label(version)).metadata()
        repo.pick(model, None)  # raises the right error when nothing serves
        serving = repo.models[model].serving  # one snapshot: a swap replaces the dict, never empties this one
        if not serving:
            raise Unavailable(f"model '{model}' has no serving version")
        meta = serving[max(serving)].metadata()
        meta["versions"] = [str(v) for v in sorted(serving)]
        return meta

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str | None = None) -> Response:
        try:
            repo.pick(model, version_label(version) if version is not None else None)
        except ServeError as err:
            return error_response(str(err), err.status)
        return JSONResponse({})

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(request: Request, model: str, version: str | None = None) -> Response:
        t0 = time.perf_counter()
        # metrics label only models that exist: a URL must not create series (their number would be unbounded)
        label, outcome = "", "error"
        try:
            if version is not None:
                version_label(version)
            repo.pick(model, version)  # an unknown model or version fails before its body is read
            body = await _read_body(request, max_body_bytes, body_timeout_s)
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
            known = model if model in repo.models else UNKNOWN_MODEL
            metrics.requests.labels(known, label, outcome).inc()
            if err.status < 500:
                log.info("bad request", extra={"model": show(model, 300), "version": label, "status": err.status,
                                               "error": str(err)})
            raise
        metrics.requests.labels(model, label, "ok").inc()
        metrics.latency.labels(model, label).observe(time.perf_counter() - t0)
        media = headers.pop("Content-Type")
        return Response(payload, media_type=media, headers=headers)

    @app.post("/v2/repository/index")
    async def repository_index() -> list:
        return repo.index()

    def authorize(request: Request) -> str:
        """Whether this request may change what is served: 403 unless --model-control explicit, 401 without the
        right bearer token. Returns how the caller proved it for the audit line."""
        if model_control != "explicit":
            why = ("it follows the repository directory instead" if model_control == "poll"
                   else "models change only when the server restarts")
            raise Forbidden(f"the repository API is off: this server runs with --model-control {model_control} "
                            f"({why}); start it with --model-control explicit to load and unload models over HTTP")
        if token is None:
            return "no token required"
        given = _bearer(request)
        challenge = {"WWW-Authenticate": 'Bearer realm="kiln repository API"'}
        if given is None:
            raise Unauthorized("the repository API needs 'Authorization: Bearer <token>' (the token of "
                               f"--control-token-file or {TOKEN_ENV})", challenge)
        if not hmac.compare_digest(given, token):
            raise Unauthorized("the repository API token is wrong", challenge)
        return "token"

    async def control(request: Request, action: str, model: str, work) -> dict:
        """Run one repository-API action and log it, allowed or not, as a JSON line."""
        client = f"{request.client.host}:{request.client.port}" if request.client else "unknown"
        record = {"action": action, "model": show(model, 300), "client": client, "auth": "none"}
        try:
            record["auth"] = authorize(request)
            check_model_name(model)
            result = await work()
        except ServeError as err:
            level = logging.WARNING if err.status in (401, 403) else logging.INFO
            audit.log(level, "control action refused" if err.status in (401, 403) else "control action failed",
                      extra={**record, "result": "denied" if err.status in (401, 403) else "failed",
                             "status": err.status, "error": str(err)})
            raise
        except Exception as err:
            audit.error("control action failed", extra={**record, "result": "error", "status": 500,
                                                        "error": f"{type(err).__name__}: {err}"})
            raise
        audit.info("control action", extra={**record, "result": "ok", "status": 200, **result})
        return result

    @app.post("/v2/repository/models/{model}/load")
    async def load_model(request: Request, model: str) -> dict:
        async def work() -> dict:
            override = load_override(await _read_body(request, max_body_bytes, body_timeout_s))
            versions = await run_in_threadpool(repo.load, model, override)
            return {"model": model, "serving_versions": [str(v) for v in versions]}

        return await control(request, "load", model, work)

    @app.post("/v2/repository/models/{model}/unload")
    async def unload_model(request: Request, model: str) -> dict:
        async def work() -> dict:
            await _read_body(request, max_body_bytes, body_timeout_s)  # tritonclient sends {"parameters": ..}
            await run_in_threadpool(repo.unload, model)
            return {}

        return await control(request, "unload", model, work)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def load_override(body: bytes) -> dict | None:
    """A load request's config override (tritonclient's `load_model(name, config=...)`), checked here so that a
    malformed one answers 400 naming the field; None when the request carries none."""
    if not body.strip():
        return None
    req = parse_json(body, "load request body")
    if not isinstance(req, dict):
        raise BadRequest(f"load request body must be a JSON object, got {type(req).__name__}")
    extra = sorted(k for k in req if k != "parameters")
    if extra:
        raise BadRequest(f"load request fields {show(extra)} are not supported (only 'parameters')")
    params = req.get("parameters")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise BadRequest(f"load request field 'parameters' must be an object, got {show(params)}")
    unknown = sorted(k for k in params if k != "config")
    if unknown:
        raise BadRequest(f"load request parameters {show(unknown)} are not supported (only 'config'; files "
                         f"come from the repository directory)")
    config = params.get("config")
    if config is None:
        return None
    if isinstance(config, str):
        config = parse_json(config.encode("utf-8", "surrogatepass"), "load request parameters.config")
    if not isinstance(config, dict):
        raise BadRequest(f"load request parameters.config must be a JSON object, got {show(config)}")
    try:
        parse_config(config, "load request parameters.config")
    except ConfigError as err:
        raise BadRequest(str(err)) from None
    except (AttributeError, TypeError, ValueError, OverflowError) as err:
        # parse_config assumes some field types (e.g. {"version_policy": {"latest": "x"}}); the config is at fault
        raise BadRequest(f"load request parameters.config is malformed: {type(err).__name__}: {err}") from None
    return config


class BackgroundServer:
    """uvicorn in a thread, for tests and embedding: `with BackgroundServer(app, port) as s: ...`."""

    def __init__(self, app: FastAPI, port: int, host: str = "127.0.0.1", shutdown_timeout_s: float = 5.0):
        self.url = f"{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False, log_config=None,
                                                    timeout_keep_alive=KEEP_ALIVE_S,
                                                    timeout_graceful_shutdown=shutdown_timeout_s))
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


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling: `serve` handles SIGTERM and SIGINT (uvicorn would
    re-raise the signal after its shutdown, so the process would die of it before the repository closed)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class _Shutdown:
    """SIGTERM/SIGINT for `serve`: the first signal starts a shutdown that must end within `limit_s`; a second
    signal, or the limit, ends the process at once (exit status 0), logging what it abandons."""

    def __init__(self, repo: ModelRepository, limit_s: float):
        self.repo, self.limit_s = repo, limit_s
        self.server: uvicorn.Server | None = None  # set once the models have loaded
        self.deadline: float | None = None
        self.closed = threading.Event()  # repo.close() returned
        # The watchdog timer and close_repository both reach the deadline at the same instant: the first to call
        # exit_now ends the process, the other waits for it (an RLock, so a second signal arriving in the main
        # thread while it is already exiting still gets through instead of deadlocking).
        self._exiting = threading.RLock()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)

    def handle(self, sig: int, frame) -> None:
        name = signal.Signals(sig).name
        if self.deadline is not None:
            self.exit_now(f"second {name}")
        self.deadline = time.monotonic() + self.limit_s
        log.info("shutting down", extra={"signal": name, "limit_s": self.limit_s, "in_flight": self.in_flight()})
        if self.server is not None:
            self.server.should_exit = True
        reason = f"shutdown limit of {self.limit_s:g} s (--shutdown-timeout-s) reached"
        watchdog = threading.Timer(self.limit_s, self.exit_now, args=(reason,))
        watchdog.daemon = True  # a clean exit does not wait for it
        watchdog.start()

    @property
    def stopping(self) -> bool:
        return self.deadline is not None

    def remaining_s(self) -> float:
        return self.limit_s if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def in_flight(self) -> dict:
        """What is still running: open connections, requests being answered, requests queued per version."""
        queued = {}
        for name, entry in list(self.repo.models.items()):
            for v, lv in list(entry.serving.items()):
                if depth := lv.batcher.queue_depth():
                    queued[f"{name}/{v}"] = depth
        state = self.server.server_state if self.server is not None else None
        return {"connections": len(state.connections) if state else 0, "requests": len(state.tasks) if state else 0,
                "queued": queued, "repository_closed": self.closed.is_set()}

    def exit_now(self, reason: str) -> None:
        if not self._exiting.acquire(blocking=False):
            threading.Event().wait()  # another thread is ending the process; log nothing twice
        log.warning("exiting without finishing the shutdown", extra={"reason": reason,
                                                                    "abandoned": self.in_flight()})
        logging.shutdown()  # flush the log handlers: os._exit skips it
        os._exit(0)

    def close_repository(self) -> None:
        """repo.close() in a thread, waited for until the deadline: a hung batcher cannot keep the process up."""
        def close() -> None:
            self.repo.close()
            self.closed.set()

        threading.Thread(target=close, name="repository-close", daemon=True).start()
        if not self.closed.wait(self.remaining_s()):
            self.exit_now(f"repository did not close within the shutdown limit of {self.limit_s:g} s "
                          f"(--shutdown-timeout-s)")


def serve(repo_path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, poll_s: float = 2.0,
          num_threads: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, model_control: str = "poll",
          control_token: bytes | None = None, shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
    """Load every model in the repository and serve until SIGTERM or SIGINT (the `kiln serve` command).

    With model_control "poll" the repository directory is watched every `poll_s` seconds; "explicit" turns the
    repository API on instead; "none" does neither. The first signal stops accepting connections, lets answers
    in flight finish and closes the repository, all within `shutdown_timeout_s`; past that limit, or at a second
    signal, the process ends at once with status 0 and logs what it abandoned.
    """
    if model_control not in MODEL_CONTROL:
        raise KilnError(f"--model-control must be one of {list(MODEL_CONTROL)}, got {model_control!r}")
    if shutdown_timeout_s <= 0 or body_timeout_s <= 0:
        raise KilnError("--shutdown-timeout-s and --body-timeout-s must be positive")
    repo = ModelRepository(repo_path, num_threads=num_threads)
    shutdown = _Shutdown(repo, shutdown_timeout_s)
    shutdown.install()  # before loading: a signal during a long load is a bounded shutdown too
    try:
        repo.load_all()
        if model_control == "poll" and poll_s > 0:
            repo.watch(poll_s)
        elif model_control == "poll":
            log.warning("--model-control poll with --poll-s 0 watches nothing: the models change only on restart")
        if control_token is not None and model_control != "explicit":
            log.warning("a control token is set, but the repository API is off",
                        extra={"model_control": model_control})
        app = create_app(repo, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s,
                         model_control=model_control, control_token=control_token)
        # uvicorn drains connections for most of the limit, then cancels what is left; the rest closes the models
        shutdown.server = _Server(uvicorn.Config(app, host=host, port=port, access_log=False, log_config=None,
                                                 timeout_keep_alive=KEEP_ALIVE_S,
                                                 timeout_graceful_shutdown=0.75 * shutdown_timeout_s))
        log.info("serving", extra={"repository": str(repo_path), "host": host, "port": port,
                                   "model_control": model_control, "control_token": control_token is not None,
                                   "shutdown_timeout_s": shutdown_timeout_s, "body_timeout_s": body_timeout_s,
                                   "models": {n: sorted(e.serving) for n, e in repo.models.items()}})
        if not shutdown.stopping:
            shutdown.server.run()
    finally:
        shutdown.close_repository()
    log.info("stopped", extra={"shutdown_s": round(shutdown_timeout_s - shutdown.remaining_s(), 3)})
