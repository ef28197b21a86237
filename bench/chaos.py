"""Chaos run of `kiln serve` on loopback: client load while the repository is abused, counting every answer.

Phase "poll" (the server watches the directory): a hot swap to a new version; new versions whose model_b2.so is
random bytes, a truncated ELF, a text file or a directory; a version copied file by file with pauses (it must
never serve with part of its buckets); in-place edits of a serving version's file (truncate, then cp over it).
Phase "explicit" (the repository API): a loop of load requests that each build a new version, with the server's
RSS after each; load requests for the corrupt versions and for bad configs (they must answer 4xx); then
SIGTERM, timing the exit. Every answer is checked against a reference computed here from the pristine
artifacts of the version the response names.

Bounded: loopback 127.0.0.1 only, a fixed number of events, each wait capped, each phase capped by
--phase-s, and the whole run by --deadline-s; it stops by itself.

    python bench/chaos.py                          # ~1.5 minutes: a small CNN (8 MB of weights), buckets 1/2/4
    python bench/chaos.py --model zoo:squeezenet   # a zoo model compiled as exported (--max-batch 1)
    python bench/chaos.py --reloads 300 --phase-s 120 --json chaos.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from serve_process import start_kiln_serve  # bench/, beside this script

HOST = "127.0.0.1"  # loopback only: this script never talks to another machine
SIZE = 32
KILN = [sys.executable, "-c", "from kiln.cli import main; main()"]


def chaos_cnn(seed: int):
    """Two 3x3 convs and a 16384→128→10 classifier on [N, 3, 32, 32]: 8 MB of weights per artifact, so a
    version that is never freed shows in the RSS."""
    from onnx import TensorProto, helper

    from kiln.model_builders import GraphBuilder

    g = GraphBuilder("chaos_cnn", seed)
    x = g.op("Relu", [g.op("Conv", ["data", g.weight((8, 3, 3, 3), 27, "conv.w")], kernel_shape=[3, 3],
                           pads=[1] * 4)])
    x = g.op("Relu", [g.op("Conv", [x, g.weight((16, 8, 3, 3), 72, "conv.w")], kernel_shape=[3, 3], pads=[1] * 4)])
    x = g.op("Flatten", [x], axis=1)
    feat = 16 * SIZE * SIZE
    y = g.op("Gemm", [x, g.weight((128, feat), feat, "fc.w"), g.const(np.zeros(128, np.float32), "fc.b")],
             transB=1)
    y = g.op("Gemm", [g.op("Relu", [y]), g.weight((10, 128), 128, "fc.w"), g.const(np.zeros(10, np.float32), "fc.b")],
             transB=1)
    return g.model([helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                   [(y, TensorProto.FLOAT, ["N", 10])])


def build(pristine: Path, model: str) -> None:
    """pristine/cnn/1 and 2: two versions (other weights for the built-in CNN; the same zoo model twice)."""
    from kiln.repo_builder import add_version

    if model == "cnn":
        for seed in (0, 1):
            add_version(chaos_cnn(seed), pristine, "cnn", max_batch=4, buckets=(1, 2, 4))
        return
    from kiln import zoo

    for _ in (1, 2):
        add_version(zoo.resolve(model), pristine, "cnn", max_batch=1)


class Reference:
    """The first output of each pristine version on the request's input, through its batch-1 artifact."""

    def __init__(self, pristine: Path):
        import kiln

        m = kiln.load(self.first_artifact(pristine / "cnn" / "1"))
        self.inputs = [(t.name, t.dtype, list(t.shape)) for t in m.inputs]
        self.batched = all(t.shape and t.shape[0] == 1 for t in [*m.inputs, *m.outputs])
        rng = np.random.default_rng(0)
        self.x = [rng.standard_normal(shape).astype(dtype) for _, dtype, shape in self.inputs]
        self.output = m.outputs[0].name
        self.expected = {v: kiln.load(self.first_artifact(pristine / "cnn" / str(v))).run(*self.x)[0]
                         for v in (1, 2)}

    @staticmethod
    def first_artifact(version_dir: Path) -> Path:
        return min(version_dir.glob("*.so"))

    def for_version(self, version: int) -> np.ndarray:
        return self.expected[1 if version != 2 else 2]  # every chaos version but 2 is a copy of 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def serve_help() -> str:
    return subprocess.run([*KILN, "serve", "--help"], capture_output=True, text=True, timeout=60, check=False).stdout


def auth_headers() -> dict[str, str]:
    token = os.environ.get("KILN_CONTROL_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def start_server(repo: Path, mode: str, log_path: Path, help_text: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [*KILN, "serve", str(repo), "--host", HOST, "--port", str(port), "--log-level", "warning"]
    if "--model-control" in help_text:
        cmd += ["--model-control", mode]
    cmd += ["--poll-s", "0.3" if mode == "poll" else "0"]
    url = f"{HOST}:{port}"
    proc = start_kiln_serve(cmd, url, log_path, lambda c: c.is_model_ready("cnn"), 60, "serve 'cnn'")
    return proc, url


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Clients:
    """`n` threads sending one request after another until stopped or `max_requests` have gone out."""

    def __init__(self, url: str, ref: Reference, n: int, max_requests: int, timeout_s: float):
        self.url, self.ref, self.timeout_s = url, ref, timeout_s
        self.counts: Counter = Counter()
        self.versions: Counter = Counter()
        self.examples: dict[str, str] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.budget = threading.Semaphore(max_requests)
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _count(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.counts[outcome] += 1
            if detail and outcome not in self.examples:
                self.examples[outcome] = detail[:300]

    def _loop(self) -> None:
        import tritonclient.http as triton
        from kiln.serve.protocol import TO_DATATYPE
        from tritonclient.utils import InferenceServerException

        client = triton.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                              network_timeout=self.timeout_s)
        inputs = []
        for (name, _dtype, shape), x in zip(self.ref.inputs, self.ref.x):
            inp = triton.InferInput(name, shape, TO_DATATYPE[x.dtype.name])
            inp.set_data_from_numpy(x, binary_data=True)
            inputs.append(inp)
        outputs = [triton.InferRequestedOutput(self.ref.output, binary_data=True)]
        while not self.stop.is_set() and self.budget.acquire(blocking=False):
            t0 = time.monotonic()
            try:
                result = client.infer("cnn", inputs, outputs=outputs)
            except InferenceServerException as err:
                status = str(err.status() or "")
                kind = "4xx" if status.startswith("4") else "5xx" if status.startswith("5") else \
                    "hung" if time.monotonic() - t0 >= self.timeout_s * 0.9 else "other"
                self._count(kind, str(err))
                if kind in ("hung", "other"):  # a connection the server dropped: start a fresh one
                    client = triton.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                                          network_timeout=self.timeout_s)
                continue
            except Exception as err:  # noqa: BLE001  (a timeout or a dropped connection: counted, the loop goes on)
                hung = time.monotonic() - t0 >= self.timeout_s * 0.9 or "timed out" in str(err).lower()
                self._count("hung" if hung else "connection", f"{type(err).__name__}: {err}")
                time.sleep(0.05)
                client = triton.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                                      network_timeout=self.timeout_s)
                continue
            version = result.get_response()["model_version"]
            y = result.as_numpy(self.ref.output)
            with self.lock:
                self.versions[version] += 1
            if np.allclose(y, self.ref.for_version(int(version)), rtol=1e-4, atol=1e-5):
                self._count("ok")
            else:
                self._count("wrong", f"version {version}")

    def finish(self) -> dict:
        self.stop.set()
        for t in self.threads:
            t.join(self.timeout_s + 5)
        return {"requests": dict(self.counts), "by_version": dict(self.versions), "examples": self.examples}


def spoil(path: Path, kind: str) -> None:
    """Replace an artifact file with garbage of the given kind."""
    good = path.read_bytes()
    if kind == "random_bytes":  # its ELF program-header offset field is ≥ 2^63
        data = bytearray(np.random.default_rng(5).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes())
        data[39] |= 0x80
        path.write_bytes(bytes(data))
    elif kind == "truncated_elf":
        path.write_bytes(good[:len(good) // 3])
    elif kind == "text_file":
        path.write_text("not a shared library\n" * 100)
    elif kind == "directory":
        path.unlink()
        (path / "inner").mkdir(parents=True)


def add_whole(src: Path, model_dir: Path, version: int, spoil_kind: str | None = None) -> None:
    """A new version as `kiln repo add` makes one: built under a hidden name, then renamed."""
    hidden = model_dir / f".incoming-{version}"
    shutil.copytree(src, hidden)
    if spoil_kind:
        spoil(hidden / "model_b2.so" if (hidden / "model_b2.so").exists() else min(hidden.glob("*.so")),
              spoil_kind)
    hidden.rename(model_dir / str(version))


def _refused(state: tuple[str, str] | None) -> bool:
    """Tried and refused, with a reason that names the file (not merely "not loaded")."""
    return state is not None and state[0] == "UNAVAILABLE" and ".so" in state[1]


def index_states(client) -> dict[str, tuple[str, str]]:
    return {r.get("version", "-"): (r["state"], r.get("reason", "")) for r in client.get_model_repository_index()
            if r["name"] == "cnn"}


def wait_for(cond, timeout_s: float, step_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return True
        except Exception:  # noqa: BLE001, S110  (the server may answer an error mid-swap: look again)
            pass
        time.sleep(step_s)
    return False


def phase_poll(work: Path, pristine: Path, ref: Reference, args, help_text: str) -> dict:
    import tritonclient.http as triton

    repo = work / "poll"
    (repo / "cnn").mkdir(parents=True)
    shutil.copytree(pristine / "cnn" / "1", repo / "cnn" / "1")
    shutil.copy(pristine / "cnn" / "config.json", repo / "cnn" / "config.json")
    proc, url = start_server(repo, "poll", work / "poll.log", help_text)
    admin = triton.InferenceServerClient(url)
    clients = Clients(url, ref, args.clients, args.max_requests, args.timeout_s)
    events: list[dict] = []
    t_phase = time.monotonic()
    full_buckets = sorted(admin.get_model_metadata("cnn")["parameters"]["batch_buckets"])
    partial_seen: list[str] = []
    stop_watch = threading.Event()

    def watch_metadata() -> None:  # a version must never serve with only part of its buckets
        c = triton.InferenceServerClient(url)
        while not stop_watch.is_set():
            try:
                meta = c.get_model_metadata("cnn")
                buckets = sorted(meta["parameters"]["batch_buckets"])
                if buckets != full_buckets:
                    partial_seen.append(f"versions {meta['versions']} buckets {buckets}")
            except Exception:  # noqa: BLE001, S110  (mid-swap answers are the clients' business)
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_metadata, daemon=True)
    watcher.start()
    model_dir = repo / "cnn"

    def event(name: str, ok: bool, **detail) -> None:
        events.append({"event": name, "ok": ok, "at_s": round(time.monotonic() - t_phase, 1), **detail})

    # 1. hot swap to a new version
    add_whole(pristine / "cnn" / "2", model_dir, 2)
    event("hot swap to version 2", wait_for(lambda: admin.get_model_metadata("cnn")["versions"] == ["2"], 20))
    # 2. corrupt versions: each must end UNAVAILABLE with a reason; version 2 keeps serving
    kinds = ["random_bytes", "truncated_elf", "text_file", "directory"]
    for i, kind in enumerate(kinds):
        add_whole(pristine / "cnn" / "1", model_dir, 3 + i, kind)
    settled = wait_for(lambda: all(_refused(index_states(admin).get(str(3 + i))) for i in range(len(kinds))), 20)
    states = index_states(admin)
    event("corrupt versions 3-6 refused", settled and admin.get_model_metadata("cnn")["versions"] == ["2"],
          states={v: states.get(v) for v in map(str, range(3, 3 + len(kinds)))})
    # 3. a version copied file by file, with pauses
    half = model_dir / "7"
    half.mkdir()
    changing_seen = False
    for f in sorted((pristine / "cnn" / "1").iterdir()):
        shutil.copy2(f, half / f.name)  # copy2 keeps the old mtimes: only change times show the copy
        time.sleep(args.copy_pause_s)
        changing_seen |= index_states(admin).get("7", ("", ""))[0] == "LOADING"
    live = wait_for(lambda: admin.get_model_metadata("cnn")["versions"] == ["7"], 20)
    event("half-copied version 7 waited, then went live whole", live and not partial_seen,
          reported_loading=changing_seen, partial_served=partial_seen[:3])
    # 4. in-place edits of the serving version's files
    target = sorted(half.glob("*.so"))[min(1, len(list(half.glob("*.so"))) - 1)]
    with open(target, "r+b") as f:
        f.truncate(4096)
    time.sleep(2.5)
    event("truncate a serving file in place", proc.poll() is None and admin.get_model_metadata("cnn")["versions"]
          == ["7"], state=index_states(admin).get("7"))
    shutil.copyfile(pristine / "cnn" / "2" / target.name, target)  # cp over: same inode, other weights
    time.sleep(2.5)
    event("cp another version's file over it", proc.poll() is None, state=index_states(admin).get("7"))
    shutil.copyfile(pristine / "cnn" / "1" / target.name, target)  # restored: the reload must succeed
    event("restore the file", wait_for(lambda: index_states(admin).get("7", ("", ""))[1] == "", 15),
          state=index_states(admin).get("7"))
    remaining = args.phase_s - (time.monotonic() - t_phase)
    if remaining > 0:
        time.sleep(min(remaining, 3))
    stop_watch.set()
    watcher.join(5)
    result = clients.finish()
    exit_s, code = stop_server(proc)
    return {"events": events, **result, "sigterm_exit_s": exit_s, "exit_code": code,
            "server_alive_until_sigterm": code is not None}


def phase_explicit(work: Path, pristine: Path, ref: Reference, args, help_text: str) -> dict:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    repo = work / "explicit"
    model_dir = repo / "cnn"
    model_dir.mkdir(parents=True)
    for v in (1, 2):
        shutil.copytree(pristine / "cnn" / str(v), model_dir / str(v))
    add_whole(pristine / "cnn" / "1", model_dir, 3, "random_bytes")
    add_whole(pristine / "cnn" / "1", model_dir, 4, "truncated_elf")
    cfg = json.loads((pristine / "cnn" / "config.json").read_text())
    cfg["version_policy"] = {"specific": {"versions": [1]}}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    time.sleep(1.2)  # past the repository's settle time, so startup does not wait for the fresh copies
    proc, url = start_server(repo, "explicit", work / "explicit.log", help_text)
    admin = triton.InferenceServerClient(url, network_timeout=120)
    headers = auth_headers()
    clients = Clients(url, ref, args.clients, args.max_requests, args.timeout_s)
    t_phase = time.monotonic()
    loads: Counter = Counter()
    load_errors: dict[str, str] = {}

    def load(config: dict) -> str:
        try:
            admin.load_model("cnn", config=json.dumps(config), headers=headers)
            outcome = "ok"
        except InferenceServerException as err:
            status = str(err.status() or "")
            outcome = "4xx" if status.startswith("4") else "5xx" if status.startswith("5") else "other"
            load_errors.setdefault(outcome, str(err)[:300])
        loads[outcome] += 1
        return outcome

    rss = {0: round(rss_mb(proc.pid), 1)}
    load_s = []
    done = 0
    for i in range(1, args.reloads + 1):
        if time.monotonic() - t_phase > args.phase_s:
            break
        t0 = time.monotonic()
        load({"version_policy": {"specific": {"versions": [1 + i % 2]}}, "max_queue_delay_ms": 2 + i % 3})
        load_s.append(time.monotonic() - t0)
        done = i
        if i in (1, 5, 10, 20, 50) or i == args.reloads or i % 25 == 0:
            rss[i] = round(rss_mb(proc.pid), 1)
    rss[done] = round(rss_mb(proc.pid), 1)
    bad_loads = {}
    for name, config in [("random-bytes version", {"version_policy": {"specific": {"versions": [3]}}}),
                         ("truncated version", {"version_policy": {"specific": {"versions": [4]}}}),
                         ("delay 1e300", {"max_queue_delay_ms": 1e300}),
                         ("traffic_split Infinity", {"version_policy": {"all": {}}, "traffic_split": {"1": 1e309}}),
                         ("batch_buckets [true]", {"batch_buckets": [True]})]:
        bad_loads[name] = load(config)
    serving_after = admin.get_model_metadata("cnn")["versions"]
    result = clients.finish()
    exit_s, code = stop_server(proc)
    return {"reloads": done, "loads": dict(loads), "load_errors": load_errors, "bad_loads": bad_loads,
            "serving_after_bad_loads": serving_after, "rss_mb_after_reloads": rss,
            "load_s_median": round(float(np.median(load_s)), 3) if load_s else None, **result,
            "sigterm_exit_s": exit_s, "exit_code": code}


def stop_server(proc: subprocess.Popen, timeout_s: float = 30) -> tuple[float | None, int | None]:
    """SIGTERM, then the seconds until the process exited and its status (None if it had to be killed)."""
    if proc.poll() is not None:
        return 0.0, proc.returncode
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None, None
    return round(time.monotonic() - t0, 2), code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn", help="cnn (built in code), or zoo:<name> compiled with --max-batch 1")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--reloads", type=int, default=100, help="load requests in the reload loop (capped by --phase-s)")
    ap.add_argument("--phase-s", type=float, default=45, help="cap on each phase")
    ap.add_argument("--deadline-s", type=float, default=240, help="cap on the whole run; it exits after")
    ap.add_argument("--max-requests", type=int, default=200_000, help="cap on requests per phase")
    ap.add_argument("--timeout-s", type=float, default=10, help="a request unanswered this long counts as hung")
    ap.add_argument("--copy-pause-s", type=float, default=0.4, help="pause between files of the half-copied version")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    deadline = threading.Timer(args.deadline_s, lambda: os._exit(3))  # stops by itself whatever hangs
    deadline.daemon = True
    deadline.start()
    help_text = serve_help()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kiln-chaos-") as tmp:
        work = Path(tmp)
        build(work / "pristine", args.model)
        build_s = time.monotonic() - t0
        ref = Reference(work / "pristine")
        report = {"model": args.model, "build_s": round(build_s, 1),
                  "model_control_flag": "--model-control" in help_text,
                  "poll": phase_poll(work, work / "pristine", ref, args, help_text),
                  "explicit": phase_explicit(work, work / "pristine", ref, args, help_text)}
        report["total_s"] = round(time.monotonic() - t0, 1)
        for phase in ("poll", "explicit"):
            log = (work / f"{phase}.log").read_text().splitlines()
            report[phase]["server_log_lines"] = len(log)
            report[phase]["server_tracebacks"] = sum("Traceback" in line for line in log)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
