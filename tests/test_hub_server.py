"""Push/download round trips through the real ``huggingface_hub`` client against ``tests/hub_server.py``.

Why subprocesses: ``huggingface_hub`` freezes ``HF_ENDPOINT`` into ``constants.ENDPOINT`` at import, and this test
process runs with ``HF_HUB_OFFLINE=1`` (conftest). A child process started with ``HubServer.client_env`` sees exactly
what a user's shell would give it (endpoint, token, online mode), so these tests exercise the same wiring a real
``push_to_hub`` relies on, with no monkeypatching. The client script refuses to run unless its endpoint is the local
server, so nothing can ever be pushed elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hub_server import HubServer, run_hub_server

REPO_ID = "test-user/tiny-llama"
HERE = Path(__file__).resolve().parent

# Runs in a child process. argv[1] is a JSON spec; the last stdout line is a JSON result (also on failure).
_CLIENT = r"""
import json, os, sys
spec = json.loads(sys.argv[1])
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

if constants.ENDPOINT != spec["endpoint"] or not constants.ENDPOINT.startswith("http://127.0.0.1:"):
    sys.exit(f"refusing to run: HF_ENDPOINT resolved to {constants.ENDPOINT!r}, expected {spec['endpoint']!r}")
result = {"ok": True}
try:
    if spec["action"] == "push":
        api = HfApi(token=spec["token"])
        url = api.create_repo(spec["repo_id"], exist_ok=True)
        info = api.upload_folder(repo_id=spec["repo_id"], folder_path=spec["folder"], commit_message="push tiny model")
        result.update(repo_url=str(url), commit=info.oid, commit_url=info.commit_url)
    elif spec["action"] == "download":
        api = HfApi()  # token comes from HF_TOKEN, as for a user
        info = api.model_info(spec["repo_id"], files_metadata=True)
        result.update(
            sha=info.sha,
            siblings={s.rfilename: {"size": s.size, "lfs_sha256": s.lfs.sha256 if s.lfs else None}
                      for s in info.siblings},
            files=api.list_repo_files(spec["repo_id"]),
            whoami=api.whoami()["name"],
            snapshot=snapshot_download(spec["repo_id"], local_dir=spec["dest"]),
            cached_config=hf_hub_download(spec["repo_id"], "config.json"),
        )
except Exception as exc:
    response = getattr(exc, "response", None)
    result = {"ok": False, "type": type(exc).__name__, "status": getattr(response, "status_code", None),
              "message": str(exc)}
print(json.dumps(result))
sys.exit(0 if result["ok"] else 1)
"""


def _run_client(server: HubServer, tmp_path: Path, *, disable_xet: bool = True, **spec: Any) -> dict[str, Any]:
    """Run ``_CLIENT`` in a fresh interpreter pointed at ``server`` only through its environment."""
    env = server.client_env(tmp_path / "hf_home", disable_xet=disable_xet)
    spec = {"endpoint": server.endpoint, "token": server.token, "repo_id": REPO_ID, **spec}
    proc = subprocess.run([sys.executable, "-c", _CLIENT, json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=180)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"client printed nothing (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1])
    assert proc.returncode == (0 if result["ok"] else 1), proc.stderr[-4000:]
    return result


def _digest_tree(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (to prove a failed push left it untouched)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _files_without_cache(folder: Path) -> dict[str, bytes]:
    """Files of a ``snapshot_download(local_dir=...)`` minus the client's own ``.cache/huggingface`` bookkeeping."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] != ".cache"}


def _assert_token_not_stored(server: HubServer) -> None:
    for path in server.root.rglob("*"):
        if path.is_file():
            assert server.token.encode() not in path.read_bytes(), f"token leaked into {path}"


def _assert_clean(server: HubServer) -> None:
    """The client used only routes the server implements, and the server never hit an internal error."""
    assert server.unhandled == [], server.unhandled
    assert server.errors == [], server.errors


def _logits(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    input_ids = torch.arange(3, 3 + 12).remainder(model.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hdpissa_trl.testing_utils import save_tiny_model

    return Path(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", arch="llama"))


@pytest.mark.slow
def test_push_then_download_roundtrip_is_exact(tiny_model_dir: Path, tmp_path: Path) -> None:
    """LFS mode (safetensors + tokenizer.json go through the LFS batch API): bytes and logits survive exactly."""
    before = _digest_tree(tiny_model_dir)
    local = {name: (tiny_model_dir / name).read_bytes() for name in before}
    with run_hub_server(tmp_path / "hub", lfs_threshold=4096) as server:
        pushed = _run_client(server, tmp_path, action="push", folder=str(tiny_model_dir))
        assert pushed["ok"], pushed
        assert pushed["commit"] == server.head(REPO_ID)
        assert pushed["repo_url"] == f"{server.endpoint}/{REPO_ID}"
        assert any(r.startswith("PUT /__lfs__/upload/") for r in server.requests), "no file took the LFS path"

        # What the server stored, byte for byte (plus the .gitattributes of the repo's initial commit).
        stored = {path: blob.read_bytes() for path, blob in server.repo_files(REPO_ID).items()}
        assert set(stored) == set(local) | {".gitattributes"}
        for name, data in local.items():
            assert stored[name] == data, f"{name} differs on the server"

        dest = tmp_path / "download"
        got = _run_client(server, tmp_path, action="download", dest=str(dest))
        assert got["ok"], got
        assert got["sha"] == pushed["commit"]
        assert got["whoami"] == server.user
        assert sorted(got["files"]) == sorted(stored)
        safetensors = got["siblings"]["model.safetensors"]
        assert safetensors["size"] == len(local["model.safetensors"])
        assert safetensors["lfs_sha256"] == hashlib.sha256(local["model.safetensors"]).hexdigest()
        assert got["siblings"]["config.json"]["lfs_sha256"] is None
        assert Path(got["snapshot"]).resolve() == dest.resolve()
        assert _files_without_cache(dest) == stored
        assert Path(got["cached_config"]).read_bytes() == local["config.json"]  # cache-dir path (ETag, X-Repo-Commit)

        _assert_clean(server)
        _assert_token_not_stored(server)
    assert _digest_tree(tiny_model_dir) == before

    import torch

    assert torch.equal(_logits(dest), _logits(tiny_model_dir))


@pytest.mark.slow
def test_default_inline_mode_works_with_client_defaults(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Default server (every file "regular", inline base64) with the client's default Xet setting left alone.

    Also checks the preupload ``oid`` answers are right: re-pushing an unchanged folder must not create a commit.
    """
    with run_hub_server(tmp_path / "hub") as server:
        first = _run_client(server, tmp_path, disable_xet=False, action="push", folder=str(tiny_model_dir))
        assert first["ok"], first
        stored = server.repo_files(REPO_ID)
        for name in _digest_tree(tiny_model_dir):
            assert stored[name].read_bytes() == (tiny_model_dir / name).read_bytes()
        assert not any("/__lfs__/" in r or "xet" in r for r in server.requests), server.requests

        again = _run_client(server, tmp_path, disable_xet=False, action="push", folder=str(tiny_model_dir))
        assert again["ok"], again
        assert again["commit"] == first["commit"] == server.head(REPO_ID)
        assert sum(r.endswith("/commit/main") for r in server.requests) == 1
        _assert_clean(server)
        _assert_token_not_stored(server)


@pytest.mark.slow
def test_push_with_wrong_token_fails_401(tiny_model_dir: Path, tmp_path: Path) -> None:
    before = _digest_tree(tiny_model_dir)
    with run_hub_server(tmp_path / "hub") as server:
        result = _run_client(server, tmp_path, action="push", folder=str(tiny_model_dir), token="hf_wrong_token")
        assert not result["ok"]
        assert result["status"] == 401, result
        assert "Invalid credentials in Authorization header" in result["message"]
        assert not server.repo_exists(REPO_ID)
        assert not any(p.is_file() for p in (server.root / "blobs").rglob("*")), "a rejected push stored data"
        _assert_clean(server)
    assert _digest_tree(tiny_model_dir) == before


@pytest.mark.slow
def test_push_fails_on_commit_500_then_recovers(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Legacy (non-Xet) client path: ``create_commit`` does not retry the commit POST, so a 500 fails at once.

    (With ``hf_xet`` enabled, ``upload_folder`` retries commit 5xx with backoff for ~23 s before failing.)
    """
    before = _digest_tree(tiny_model_dir)
    with run_hub_server(tmp_path / "hub", lfs_threshold=4096) as server:
        server.fail_commits = True
        failed = _run_client(server, tmp_path, action="push", folder=str(tiny_model_dir))
        assert not failed["ok"]
        assert failed["status"] == 500, failed
        assert "fail_commits" in failed["message"]
        # create_repo went through, the commit did not: only the initial .gitattributes is there.
        assert list(server.repo_files(REPO_ID)) == [".gitattributes"]
        assert _digest_tree(tiny_model_dir) == before

        server.fail_commits = False
        ok = _run_client(server, tmp_path, action="push", folder=str(tiny_model_dir))
        assert ok["ok"], ok
        assert set(server.repo_files(REPO_ID)) == set(before) | {".gitattributes"}
        _assert_clean(server)
    assert _digest_tree(tiny_model_dir) == before


@pytest.mark.slow
def test_push_fails_when_server_is_down(tiny_model_dir: Path, tmp_path: Path) -> None:
    before = _digest_tree(tiny_model_dir)
    with run_hub_server(tmp_path / "hub") as server:
        server.stop()
        result = _run_client(server, tmp_path, action="push", folder=str(tiny_model_dir))
        assert not result["ok"]
        assert result["type"] == "ConnectError", result
    assert _digest_tree(tiny_model_dir) == before


def _http(server: HubServer, method: str, path: str, token: str | None = None, body: bytes | None = None,
          content_type: str = "application/json") -> tuple[int, dict[str, str], bytes]:
    """Raw request (no ``huggingface_hub``): checks the protocol details the client depends on."""
    request = urllib.request.Request(server.endpoint + path, data=body, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _ndjson_commit(path: str, data: bytes) -> bytes:
    lines = [{"key": "header", "value": {"summary": "raw commit", "description": ""}},
             {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}}]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def test_auth_and_fault_switches_over_raw_http(tmp_path: Path) -> None:
    with run_hub_server(tmp_path / "hub", token="hf_secret_abc") as server:
        assert _http(server, "GET", "/api/whoami-v2")[0] == 401
        assert _http(server, "GET", "/api/whoami-v2", token="hf_nope")[0] == 401
        status, _, body = _http(server, "GET", "/api/whoami-v2", token=server.token)
        assert status == 200 and json.loads(body)["name"] == server.user

        create = json.dumps({"name": "raw", "organization": None, "type": "model"}).encode()
        assert _http(server, "POST", "/api/repos/create", body=create)[0] == 401
        status, _, body = _http(server, "POST", "/api/repos/create", token=server.token, body=create)
        assert status == 200 and json.loads(body)["url"] == f"{server.endpoint}/test-user/raw"
        status, _, body = _http(server, "POST", "/api/repos/create", token=server.token, body=create)
        assert status == 409 and "url" in json.loads(body)  # create_repo(exist_ok=True) needs it

        # Public reads work anonymously; a wrong token is rejected even there (as on the Hub); require_auth gates reads.
        assert _http(server, "GET", "/api/models/test-user/raw")[0] == 200
        status, headers, _ = _http(server, "GET", "/api/models/test-user/raw", token="hf_nope")
        assert status == 401 and headers["X-Error-Message"] == "Invalid credentials in Authorization header"
        server.require_auth = True
        assert _http(server, "GET", "/api/models/test-user/raw")[0] == 401
        assert _http(server, "GET", "/test-user/raw/resolve/main/.gitattributes")[0] == 401
        assert _http(server, "GET", "/api/models/test-user/raw", token=server.token)[0] == 200
        server.require_auth = False

        # Hub error codes the client maps to typed exceptions.
        status, headers, _ = _http(server, "GET", "/api/models/test-user/missing")
        assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"
        status, headers, _ = _http(server, "GET", "/api/models/test-user/raw/revision/nope")
        assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
        status, headers, _ = _http(server, "HEAD", "/test-user/raw/resolve/main/nope.txt")
        assert status == 404 and headers["X-Error-Code"] == "EntryNotFound" and headers["X-Repo-Commit"]

        # fail_commits as a count: the next n commits answer 500 and change nothing, then commits work again.
        head = server.head("test-user/raw")
        payload = _ndjson_commit("a/b.txt", b"hello")
        server.fail_commits = 1
        assert _http(server, "POST", "/api/models/test-user/raw/commit/main", server.token, payload,
                     "application/x-ndjson")[0] == 500
        assert server.head("test-user/raw") == head
        status, _, body = _http(server, "POST", "/api/models/test-user/raw/commit/main", server.token, payload,
                                "application/x-ndjson")
        assert status == 200 and json.loads(body)["commitOid"] == server.head("test-user/raw") != head
        assert server.fail_commits == 0

        # Download headers hf_hub_download needs, and Range (used to resume a download).
        status, headers, body = _http(server, "GET", "/test-user/raw/resolve/main/a/b.txt")
        assert status == 200 and body == b"hello"
        assert headers["Content-Length"] == "5" and headers["ETag"] and headers["X-Repo-Commit"] == server.head(
            "test-user/raw")
        request = urllib.request.Request(f"{server.endpoint}/test-user/raw/resolve/main/a/b.txt",
                                         headers={"Range": "bytes=1-"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 206 and response.read() == b"ello"

        assert _http(server, "POST", "/api/models/test-user/raw/commit/main", "hf_nope", payload,
                     "application/x-ndjson")[0] == 401
        _assert_clean(server)
        _assert_token_not_stored(server)


def test_cli_serves_until_terminated(tmp_path: Path) -> None:
    """``python tests/hub_server.py --port 0 --root DIR`` prints its endpoint first, serves, and exits on SIGTERM."""
    proc = subprocess.Popen([sys.executable, str(HERE / "hub_server.py"), "--port", "0", "--root", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HUB_SERVER_TOKEN": "hf_cli_token"})
    try:
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:"), (endpoint, proc.stderr.read() if proc.poll() else "")
        request = urllib.request.Request(endpoint + "/api/whoami-v2", headers={"Authorization": "Bearer hf_cli_token"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["name"] == "test-user"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    assert (tmp_path / "blobs").is_dir()
