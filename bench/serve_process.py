"""`kiln serve` as a child process for the serving benchmarks (loopback only): start it, wait until it answers."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def start_kiln_serve(cmd: list[str], url: str, log_path: Path, ready: Callable, timeout_s: float,
                     what: str) -> subprocess.Popen:
    """Run `cmd` (a `kiln serve` command line) with its log in `log_path`; return once `ready(client)` holds
    for a tritonclient on `url`, or kill it and raise after `timeout_s`."""
    import tritonclient.http as triton

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))  # noqa: SIM115
    client = triton.InferenceServerClient(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kiln serve exited with {proc.returncode}; see {log_path}")
        try:
            if ready(client):
                return proc
        except Exception:  # noqa: BLE001, S110  (not listening yet)
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"kiln serve did not {what} within {timeout_s:.0f} s; see {log_path}")
