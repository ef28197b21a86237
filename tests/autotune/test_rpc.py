"""RPC runner against a tracker and a server on 127.0.0.1 (subprocesses, free ports): candidates upload, check
and time on the server; a candidate that crashes the server's session costs one candidate, the server serves on."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kiln.autotune import rpc_server
from kiln.autotune.builder import BuildResult, LocalBuilder, MeasureInput
from kiln.autotune.rpc import RPCRunner
from kiln.autotune.tasks import Task
from kiln.codegen.target import resolve_target
from kiln.ir.ops.softmax import SOFTMAX
from kiln.schedules.dispatch import task_of

from tests.groups import op_group

KEY = "kiln-test-x86"


def start(argv: list[str], **kwargs) -> subprocess.Popen:
    """A process in a group of its own: TVM's tracker and server leave workers behind that stop() also ends."""
    return subprocess.Popen(argv, start_new_session=True, **kwargs)


def stop(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(port: int, key: str, timeout_s: float) -> None:
    from tvm import rpc

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"].get(key, {}).get("free", 0):
                return
        except (RuntimeError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no {key} server registered at the tracker on port {port} within {timeout_s} s")


def start_tracker(port: int):
    """A TVM RPC tracker on 127.0.0.1:port, in its own process group."""
    return start([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                  "--port-end", str(port + 1), "--silent"])


@pytest.fixture(scope="module")
def tracker_and_server():
    """(tracker port, server process): a tracker and one kiln rpc_server on 127.0.0.1."""
    tracker_port, server_port = free_port(), free_port()
    tracker = start_tracker(tracker_port)
    server = None
    try:
        wait_port(tracker_port)
        server = start(
            [
                sys.executable,
                rpc_server.__file__,
                "--tracker",
                f"127.0.0.1:{tracker_port}",
                "--key",
                KEY,
                "--port",
                str(server_port),
                "--threads",
                "1",
            ]
        )
        wait_for_server(tracker_port, KEY, 60)
        yield tracker_port, server
    finally:
        for p in (server, tracker):
            if p is not None:
                stop(p)


def wait_port(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


@pytest.fixture(scope="module")
def softmax() -> Task:
    target = resolve_target("x86-avx2")
    fn = op_group(SOFTMAX, [((8, 64), "float32")], SOFTMAX.make_attrs(axis=1))
    template, wl = task_of(fn, target)
    return Task(template, wl, fn, target)


def test_candidates_time_on_the_server_and_a_crash_costs_one(softmax, tracker_and_server, tmp_path):
    tracker_port, server = tracker_and_server
    configs = [{"lanes": 16, "store_exp": True}, {"lanes": 4, "store_exp": False}]
    inputs = [MeasureInput(softmax, cfg, check=True) for cfg in configs]
    with LocalBuilder(workers=1, build_dir=str(tmp_path)) as builder:
        builds = builder.build(inputs)
    crash_c = tmp_path / "crash.c"
    crash_c.write_text(
        "int __tvm_ffi_main(void* s, const void* a, int n, void* r) { *(volatile int*)0 = 1; return 0; }"
    )
    subprocess.run(["gcc", "-shared", "-fPIC", str(crash_c), "-o", str(tmp_path / "crash.so")], check=True)
    crash = BuildResult(str(tmp_path / "crash.so"), None, 0.0)
    batch = [(inputs[0], builds[0]), (inputs[0], crash), (inputs[1], builds[1])]
    runner = RPCRunner(f"127.0.0.1:{tracker_port}", KEY, repeat=3, timeout_s=20, wait_s=30)
    results = runner.run([i for i, _ in batch], [b for _, b in batch])
    assert results[0].error is None and len(results[0].costs_s) == 3 and min(results[0].costs_s) > 0, results[
        0
    ]
    assert results[1].error.startswith("crash: remote session died"), results[1]
    assert results[2].error is None and len(results[2].costs_s) == 3, results[2]
    assert server.poll() is None


def test_a_wrong_result_on_the_server_is_caught_here(softmax, tracker_and_server, tmp_path):
    tracker_port, _ = tracker_and_server
    zero_c = tmp_path / "noop.c"  # returns without writing the output: the poisoned output fails the check
    zero_c.write_text("int __tvm_ffi_main(void* s, const void* a, int n, void* r) { return 0; }")
    subprocess.run(["gcc", "-shared", "-fPIC", str(zero_c), "-o", str(tmp_path / "noop.so")], check=True)
    runner = RPCRunner(f"127.0.0.1:{tracker_port}", KEY, repeat=1, timeout_s=20, wait_s=30)
    (r,) = runner.run(
        [MeasureInput(softmax, softmax.default(), check=True)],
        [BuildResult(str(tmp_path / "noop.so"), None, 0.0)],
    )
    assert r.error.startswith("wrong result: max abs err inf"), r
    imports = [ln for ln in Path(rpc_server.__file__).read_text().splitlines() if "import " in ln]
    assert imports and not any("kiln" in ln for ln in imports), (
        imports
    )  # the server file runs on a bare board


def test_a_hang_on_the_server_times_out_and_the_next_candidate_runs(softmax, tracker_and_server, tmp_path):
    tracker_port, _ = tracker_and_server
    hang_c = tmp_path / "hang.c"
    hang_c.write_text(
        "int __tvm_ffi_main(void* s, const void* a, int n, void* r) { for (volatile int i = 0; ; ) i++; }"
    )
    subprocess.run(["gcc", "-shared", "-fPIC", str(hang_c), "-o", str(tmp_path / "hang.so")], check=True)
    good = MeasureInput(softmax, softmax.default())
    with LocalBuilder(workers=1, build_dir=str(tmp_path)) as builder:
        (built,) = builder.build([good])
        runner = RPCRunner(f"127.0.0.1:{tracker_port}", KEY, repeat=1, timeout_s=4, wait_s=30)
        hung, ok = runner.run([good, good], [BuildResult(str(tmp_path / "hang.so"), None, 0.0), built])
    assert hung.error == "timeout after 4 s", hung
    assert ok.error is None and len(ok.costs_s) == 1, ok


@pytest.mark.slow
def test_aarch64_server_under_qemu_measures_cross_compiled_candidates(tmp_path):
    """bench/rpc_aarch64.sh: an arm64 Python + TVM (DIR from KILN_AARCH64_DIR) serving under qemu-user."""
    folder = Path(os.environ.get("KILN_AARCH64_DIR", Path.home() / ".cache/kiln/aarch64"))
    if not (folder / "py-a64").exists():
        pytest.skip(f"no aarch64 Python + TVM at {folder}: bench/rpc_aarch64.sh makes one")
    target = resolve_target("aarch64")
    fn = op_group(SOFTMAX, [((8, 64), "float32")], SOFTMAX.make_attrs(axis=1))
    template, wl = task_of(fn, target)
    task = Task(template, wl, fn, target)
    configs = [{"lanes": 4, "store_exp": True}, {"lanes": 1, "store_exp": False}]  # NEON: 4 lanes of fp32
    assert all(cfg in task.space() for cfg in configs)
    inputs = [MeasureInput(task, cfg, check=True) for cfg in configs]
    crash_c = tmp_path / "crash.c"
    crash_c.write_text(
        "int __tvm_ffi_main(void* s, const void* a, int n, void* r) { *(volatile int*)0 = 1; return 0; }"
    )
    subprocess.run(
        ["aarch64-linux-gnu-gcc", "-shared", "-fPIC", str(crash_c), "-o", str(tmp_path / "crash.so")],
        check=True,
    )
    tracker_port, server_port = free_port(), free_port()
    tracker = start_tracker(tracker_port)
    server = None
    try:
        wait_port(tracker_port)
        env = dict(
            os.environ, TVM_USE_RUNTIME_LIB="1", PYTHONPATH=str(folder / "site")
        )  # the runtime suffices
        server = start(
            [
                str(folder / "py-a64"),
                rpc_server.__file__,
                "--tracker",
                f"127.0.0.1:{tracker_port}",
                "--key",
                "a64",
                "--port",
                str(server_port),
            ],
            env=env,
        )
        with LocalBuilder(workers=1, build_dir=str(tmp_path)) as builder:
            builds = builder.build(inputs)
        assert [b.error for b in builds] == [None, None]
        assert all(Path(b.path).read_bytes()[18] == 0xB7 for b in builds)  # ELF e_machine 183: AArch64
        wait_for_server(tracker_port, "a64", 300)  # importing TVM under emulation takes a while
        runner = RPCRunner(f"127.0.0.1:{tracker_port}", "a64", repeat=2, timeout_s=120, wait_s=300)
        batch = [
            (inputs[0], builds[0]),
            (inputs[0], BuildResult(str(tmp_path / "crash.so"), None, 0.0)),
            (inputs[1], builds[1]),
        ]
        results = runner.run([i for i, _ in batch], [b for _, b in batch])
        assert results[0].error is None and len(results[0].costs_s) == 2, results[0]
        assert results[1].error.startswith("crash: remote session died"), results[1]
        assert results[2].error is None and len(results[2].costs_s) == 2, results[2]
        assert server.poll() is None
    finally:
        for p in (server, tracker):
            if p is not None:
                stop(p)
