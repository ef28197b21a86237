"""Who may change what is served (issue 13 item 10): --model-control none|poll|explicit, the bearer token, and
one JSON audit line per repository-API call."""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import tritonclient.http as triton
from kiln.serve.app import read_control_token
from kiln.serve.logs import JsonLineFormatter
from tritonclient.utils import InferenceServerException

from kiln.errors import KilnError

from .conftest import free_port, make_repo

TOKEN = "s3cret-token"


def _post(url: str, path: str, token: str | None = None, body: bytes = b"") -> tuple[int, dict, dict]:
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn.request("POST", path, body, headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(data) if data else {}


def _audit_lines(caplog) -> list[dict]:
    """The audit records as the JSON lines `kiln serve` writes."""
    fmt = JsonLineFormatter()
    return [json.loads(fmt.format(r)) for r in caplog.records if r.name == "kiln.serve.control"]


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_repository_api_is_off_unless_explicit(built, tmp_path, serve_repo, mode, caplog):
    url, repo = serve_repo(make_repo(built, tmp_path), model_control=mode)
    caplog.set_level(logging.INFO, logger="kiln.serve.control")
    for action in ("load", "unload"):
        status, _, body = _post(url, f"/v2/repository/models/tiny/{action}")
        assert status == 403, body
        assert f"--model-control {mode}" in body["error"] and "--model-control explicit" in body["error"]
    assert repo.ready("tiny")  # the unload did nothing
    client = triton.InferenceServerClient(url)
    assert client.get_model_repository_index()[0]["state"] == "READY"  # the index stays open
    lines = _audit_lines(caplog)
    assert [(x["action"], x["result"], x["status"]) for x in lines] == [("load", "denied", 403),
                                                                         ("unload", "denied", 403)]
    assert lines[0]["client"].startswith("127.0.0.1:") and lines[0]["level"] == "warning"


def test_explicit_mode_with_a_token(built, tmp_path, serve_repo, caplog):
    url, repo = serve_repo(make_repo(built, tmp_path), model_control="explicit", control_token=TOKEN)
    caplog.set_level(logging.INFO, logger="kiln.serve.control")
    status, headers, body = _post(url, "/v2/repository/models/tiny/unload")
    assert status == 401 and "Authorization: Bearer" in body["error"] and headers["www-authenticate"].startswith(
        "Bearer")
    status, _, body = _post(url, "/v2/repository/models/tiny/unload", token=TOKEN + "x")
    assert status == 401 and "token is wrong" in body["error"]
    status, _, body = _post(url, "/v2/repository/models/tiny/unload", token=TOKEN[:-1])  # a prefix is wrong too
    assert status == 401
    assert repo.ready("tiny")
    client = triton.InferenceServerClient(url)
    with pytest.raises(InferenceServerException) as info:
        client.unload_model("tiny")  # tritonclient without headers
    assert info.value.status() == "401"
    client.unload_model("tiny", headers={"Authorization": f"Bearer {TOKEN}"})
    assert not repo.ready("tiny")
    client.load_model("tiny", headers={"Authorization": f"bearer {TOKEN}"})  # the scheme is case-insensitive
    assert repo.ready("tiny")
    lines = _audit_lines(caplog)
    assert [(x["action"], x["result"], x["status"], x["auth"]) for x in lines] == [
        ("unload", "denied", 401, "none"), ("unload", "denied", 401, "none"), ("unload", "denied", 401, "none"),
        ("unload", "denied", 401, "none"), ("unload", "ok", 200, "token"), ("load", "ok", 200, "token")]
    assert lines[-1]["serving_versions"] == ["1"] and lines[-1]["model"] == "tiny"
    assert all(TOKEN not in json.dumps(x) for x in lines)  # the token never reaches the log


def test_explicit_mode_without_a_token_logs_failures_too(built, tmp_path, serve_repo, caplog):
    url, _ = serve_repo(make_repo(built, tmp_path), model_control="explicit")
    caplog.set_level(logging.INFO, logger="kiln.serve.control")
    status, _, _ = _post(url, "/v2/repository/models/nope/load")
    assert status == 404
    status, _, _ = _post(url, "/v2/repository/models/tiny/load")
    assert status == 200
    lines = _audit_lines(caplog)
    assert [(x["action"], x["model"], x["result"], x["status"], x["auth"]) for x in lines] == [
        ("load", "'nope'", "failed", 404, "no token required"), ("load", "tiny", "ok", 200, "no token required")]
    assert "not in the repository" in lines[0]["error"]


def test_control_token_comes_from_a_file_or_the_environment(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert read_control_token(path, {"KILN_CONTROL_TOKEN": "other"}) == TOKEN.encode()  # the file wins
    assert read_control_token(None, {"KILN_CONTROL_TOKEN": " env-token "}) == b"env-token"
    assert read_control_token(None, {"KILN_CONTROL_TOKEN": ""}) is None
    assert read_control_token(None, {}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(KilnError, match="is empty"):
        read_control_token(tmp_path / "empty", {})
    with pytest.raises(KilnError, match="cannot be read"):
        read_control_token(tmp_path / "missing", {})


def _wait_live(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    host, port = url.split(":")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=2)
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"kiln serve did not become ready on {url} within {timeout_s} s")


def test_kiln_serve_flags(built, tmp_path):
    """The CLI: poll is the default (the API answers 403); explicit with KILN_CONTROL_TOKEN wants the token."""
    repo_dir = make_repo(built, tmp_path)
    for args, env, expect in [([], {}, [(None, 403)]),
                              (["--model-control", "explicit"], {"KILN_CONTROL_TOKEN": TOKEN},
                               [(None, 401), ("wrong", 401), (TOKEN, 200)])]:
        port = free_port()
        url = f"127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(repo_dir), "--port", str(port),
                                 "--shutdown-timeout-s", "5", *args], env={**os.environ, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_live(url, proc)
            for token, status in expect:
                assert _post(url, "/v2/repository/models/tiny/load", token=token)[0] == status, (args, token)
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err[-3000:]
        assert TOKEN not in err


def _versions(url: str) -> list[str]:
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/v2/models/tiny")
    versions = json.loads(conn.getresponse().read())["versions"]
    conn.close()
    return versions


@pytest.mark.parametrize("mode", ["poll", "none"])
def test_only_poll_mode_watches_the_directory(built, tmp_path, mode):
    repo_dir = make_repo(built, tmp_path)
    port = free_port()
    url = f"127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(repo_dir), "--port", str(port),
                             "--model-control", mode, "--poll-s", "0.2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_live(url, proc)
        assert _versions(url) == ["1"]
        shutil.copytree(built / "tiny" / "2", repo_dir / "tiny" / "2")
        deadline = time.monotonic() + (15 if mode == "poll" else 3)  # files settle for 1 s before a load
        while time.monotonic() < deadline and _versions(url) == ["1"]:
            time.sleep(0.2)
        assert _versions(url) == (["2"] if mode == "poll" else ["1"])
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
