"""Measures built candidates on a remote device through TVM RPC: a tracker hands out servers by device key
(an ARM board, a GPU host), and each candidate is uploaded, checked and timed there, its costs brought back.

    builds = LocalBuilder().build(inputs)            # here, cross-compiled when the target is aarch64
    results = RPCRunner("10.0.0.2:9190", "rpi5", timeout_s=20).run(inputs, builds)

Each candidate runs in a session of its own with a session timeout, so a hang ends with "timeout after N s",
and a crash ("crash: remote session died ...") ends that session only, provided the device runs
autotune/rpc_server.py (TVM's own server stops serving after a session dies of a signal). Between candidates the
runner waits up to `wait_s` for a free server of the key. Timing and the reference check are the local runner's
(runner.py): the output comes back here and is compared with the NumPy reference computed here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

from kiln.autotune.builder import BuildResult, MeasureInput
from kiln.autotune.runner import MeasureResult, TimingOptions, device_kind, measure_library, prepare_inputs

log = logging.getLogger(__name__)

# What the client sees when the server's session process dies under it
SESSION_DIED = ("kShutdown", "Connection reset", "Broken pipe", "socket closed", "connection closed", "EOF")


class RPCRunner:
    """`run(inputs, builds) -> results` on a device behind a TVM RPC tracker. `timeout_s` bounds one
    candidate's session: upload, inputs, check and timing. Cold timing flushes the device's CPU caches (CPU
    targets only)."""

    def __init__(
        self,
        tracker: str | tuple[str, int],
        key: str,
        *,
        number: int = 1,
        repeat: int = 5,
        min_repeat_ms: int = 0,
        cold: bool = True,
        timeout_s: float = 30.0,
        wait_s: float = 120.0,
        seed: int = 0,
    ):
        if isinstance(tracker, str):
            host, port = tracker.rsplit(":", 1)
            tracker = (host, int(port))
        self.tracker = tracker
        self.key = key
        self.timing = TimingOptions(number, repeat, min_repeat_ms, cold)
        self.timeout_s = timeout_s
        self.wait_s = wait_s
        self.seed = seed
        self._prepared: dict = {}  # (task key, graph knobs, seed, check) -> (inputs, reference), made here

    def run(self, inputs: Sequence[MeasureInput], builds: Sequence[BuildResult]) -> list[MeasureResult]:
        if len(inputs) != len(builds):
            raise ValueError(f"{len(inputs)} inputs but {len(builds)} builds")
        results = []
        for inp, built in zip(inputs, builds):
            if built.error is not None or built.path is None:
                results.append(MeasureResult([], built.error or "build: no library", built.build_s, 0.0))
                continue
            start = time.perf_counter()
            costs, error = self._measure(inp, built.path)
            results.append(MeasureResult(costs, error, built.build_s, time.perf_counter() - start))
        return results

    def _measure(self, inp: MeasureInput, path: str) -> tuple[list[float], str | None]:
        arrays, reference = prepare_inputs(inp.task, dict(inp.config), self.seed, inp.check, self._prepared)
        try:
            session = self._session()
        except (RuntimeError, TimeoutError, OSError) as err:
            return [], f"rpc: no {self.key} server: {err}"
        try:
            name = f"kiln_{os.getpid()}_{os.path.basename(path)}"
            session.upload(path, target=name)
            module = session.load_module(name)
            dev = session.device(device_kind(inp.task.target))
            costs, error = measure_library(
                path, inp.task, dict(inp.config), arrays, reference, self.timing, dev, module
            )
        except Exception as err:  # noqa: BLE001  (the session died or timed out under this candidate)
            costs, error = [], f"run: {type(err).__name__}: {_last_line(err)}"
        return costs, self._classify(error)

    def _classify(self, error: str | None) -> str | None:
        if error is None:
            return None
        if "RPCSessionTimeoutError" in error:
            return f"timeout after {self.timeout_s:g} s"
        if any(marker in error for marker in SESSION_DIED):
            return f"crash: remote session died ({error})"
        return error

    def _session(self):
        """A session with a free server of the key, waiting up to wait_s for one (a server restarting after a
        crash re-registers within seconds; one under emulation within a minute)."""
        from tvm import rpc

        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                tracker = rpc.connect_tracker(*self.tracker)
                if tracker.summary()["queue_info"].get(self.key, {}).get("free", 0) > 0:
                    return tracker.request(self.key, session_timeout=self.timeout_s, max_retry=1)
            except (RuntimeError, OSError) as err:
                log.debug("tracker %s:%d: %s", *self.tracker, err)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"none free at tracker {self.tracker[0]}:{self.tracker[1]} after {self.wait_s:g} s"
                )
            time.sleep(0.5)


def _last_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:300]
