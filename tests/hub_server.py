"""A small local stand-in for the Hugging Face Hub HTTP API, for push/download round-trip tests.

Why this exists: the real Hub is unreachable from CI (and pushing to it from tests would be wrong anyway), but a push
path that was only ever exercised against mocks can still break on the wire (auth headers, the preupload/commit
protocol, LFS transfers, the headers ``hf_hub_download`` needs). This server speaks the subset of the Hub API that the
installed ``huggingface_hub`` client actually calls for ``create_repo`` / ``upload_folder`` / ``create_commit`` /
``model_info`` / ``list_repo_files`` / ``whoami`` / ``hf_hub_download`` / ``snapshot_download``, so a test can run the
*real* client against it and check the bytes that land on disk.

Design notes (verified against ``huggingface_hub`` 2.4 sources: ``_commit_api.py``, ``hf_api.py``, ``lfs.py``,
``file_download.py``, ``_snapshot_download.py``, ``_upload_pipeline.py``):

* ``preupload`` answers ``"regular"`` for every file by default (``lfs_threshold=None``): the client then sends the
  content inline, base64-encoded, in the NDJSON commit. This works whatever the client's Xet setting is.
* With ``lfs_threshold=N``, files of ``N`` bytes or more get ``"lfs"``. The client then uploads them *before* the commit,
  and this server implements the legacy git-LFS batch API with the ``basic`` transfer (a ``PUT`` to a single-use upload
  URL on this same server, then a ``verify`` call). The client only takes that path when ``hf_xet`` is unavailable or
  disabled, so LFS mode REQUIRES ``HF_HUB_DISABLE_XET=1`` in the client's environment (``client_env`` sets it). This
  server does not speak Xet: the Xet token endpoints answer 501 with a message saying so.
* ``huggingface_hub`` reads ``HF_ENDPOINT`` once, at import time, into ``huggingface_hub.constants.ENDPOINT``. Setting
  ``os.environ["HF_ENDPOINT"]`` after the import has no effect on ``hf_hub_download``/``snapshot_download``/``HfApi()``.
  The robust ways to point a client here are: run it in a subprocess whose environment comes from
  :meth:`HubServer.client_env` (most honest: exactly what a user's shell would do), or pass ``endpoint=server.endpoint``
  to every ``HfApi``/``hf_hub_download``/``snapshot_download`` call. Monkeypatching ``constants.ENDPOINT`` is fragile
  (``HUGGINGFACE_CO_URL_TEMPLATE`` and the Hub-host set are derived from it at import) and is not recommended.
* New repos get an initial commit holding a ``.gitattributes`` file, like on the real Hub, so a downloaded snapshot holds
  that file on top of what was pushed.
* State is persisted under ``root`` (content-addressed blobs + one JSON file per repo), so a server restarted on the
  same root (on a new port) serves the same repos. The token is never written to disk, and request headers are never
  logged.

Run standalone: ``python tests/hub_server.py --port 0 --root DIR`` prints the endpoint URL on its first stdout line and
serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["DEFAULT_TOKEN", "DEFAULT_USER", "HubServer", "HubHTTPError", "run_hub_server"]

DEFAULT_TOKEN = "hf_test_token"
DEFAULT_USER = "test-user"
HOST = "127.0.0.1"

# URL prefixes of the non-model repo types (models have none), as in ``huggingface_hub.constants``.
_TYPE_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"  # exact Hub wording; the client keys on it
_LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
# A short version of the file the Hub puts in every new repo's initial commit.
_INITIAL_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.bin", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.onnx", "*.pt", "*.pth", "*.safetensors",
                    "*.tar.gz", "*.zip", "*tfevents*")
)


class HubHTTPError(Exception):
    """An error answered to the client as ``status`` + JSON ``{"error": message}`` (+ Hub ``X-Error-*`` headers).

    The Hub's error headers matter: ``hf_raise_for_status`` maps ``X-Error-Code`` to ``RepositoryNotFoundError`` /
    ``RevisionNotFoundError`` / ``EntryNotFoundError``, which the download code relies on.
    """

    def __init__(self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None,
                 payload: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.payload = dict(payload or {})


def _now() -> str:
    """Hub date format (``parse_datetime`` in the client accepts exactly this shape)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(data: bytes) -> str:
    """git's blob id (sha1 of ``blob <size>\\0<data>``): the client compares it to detect unchanged regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file + ``os.replace`` so a crash or a concurrent reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Store:
    """On-disk repos: immutable content-addressed blobs plus one JSON document (refs + commits) per repo.

    Commits are full snapshots (``files`` maps every path to its blob), which keeps revision lookups trivial; the
    repos a test creates are tiny, so the duplication does not matter.
    """

    def __init__(self, root: str | os.PathLike[str], user: str) -> None:
        self.root = Path(root)
        self.user = user
        self.lock = threading.RLock()
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)

    # ---- blobs
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha):
            _atomic_write(self.blob_path(sha), data)
        return sha

    def put_blob_from_stream(self, chunks: Iterator[bytes], expected_sha: str, expected_size: int) -> None:
        """Stream an LFS upload to disk while hashing it, and only keep it if hash and size match the announced ones."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix="lfs-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            if digest.hexdigest() != expected_sha or size != expected_size:
                raise HubHTTPError(
                    400, f"uploaded content does not match the announced LFS object (sha256 {digest.hexdigest()}, "
                         f"{size} bytes; expected {expected_sha}, {expected_size} bytes)"
                )
            dest = self.blob_path(expected_sha)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    # ---- repos
    @staticmethod
    def check_name(namespace: str, name: str) -> None:
        if not (_NAME_RE.match(namespace) and _NAME_RE.match(name)) or ".." in namespace + name:
            raise HubHTTPError(400, f"invalid repo id '{namespace}/{name}'")

    def repo_file(self, repo_type: str, namespace: str, name: str) -> Path:
        self.check_name(namespace, name)
        return self.root / "repos" / f"{repo_type}s" / namespace / f"{name}.json"

    def load(self, repo_type: str, namespace: str, name: str) -> dict[str, Any]:
        path = self.repo_file(repo_type, namespace, name)
        if not path.is_file():
            raise HubHTTPError(404, f"Repository Not Found: {namespace}/{name} ({repo_type})", code="RepoNotFound")
        return json.loads(path.read_text())

    def save(self, repo_type: str, namespace: str, name: str, repo: dict[str, Any]) -> None:
        _atomic_write(self.repo_file(repo_type, namespace, name), json.dumps(repo, indent=1, sort_keys=True).encode())

    def exists(self, repo_type: str, namespace: str, name: str) -> bool:
        return self.repo_file(repo_type, namespace, name).is_file()

    def file_entry(self, data: bytes, lfs: bool) -> dict[str, Any]:
        sha = self.put_blob(data)
        return self.lfs_entry(sha, len(data)) if lfs else {"sha256": sha, "size": len(data), "oid": _git_blob_oid(data)}

    @staticmethod
    def lfs_entry(sha256: str, size: int) -> dict[str, Any]:
        pointer = _LFS_POINTER.format(oid=sha256, size=size).encode()
        return {"sha256": sha256, "size": size, "oid": _git_blob_oid(pointer), "lfs": True,
                "pointer_size": len(pointer)}

    @staticmethod
    def new_commit(parent: str | None, files: dict[str, Any], title: str, message: str, author: str) -> dict[str, Any]:
        date = _now()
        seed = json.dumps([parent, files, title, message, date, time.time_ns(), secrets.token_hex(4)], sort_keys=True)
        return {"id": hashlib.sha1(seed.encode()).hexdigest(), "parents": [parent] if parent else [], "title": title,
                "message": message, "date": date, "author": author, "files": files}

    def create(self, repo_type: str, namespace: str, name: str, private: bool) -> dict[str, Any]:
        files = {".gitattributes": self.file_entry(_INITIAL_GITATTRIBUTES.encode(), lfs=False)}
        commit = self.new_commit(None, files, "initial commit", "", self.user)
        repo = {"type": repo_type, "id": f"{namespace}/{name}", "private": private, "created_at": commit["date"],
                "_id": secrets.token_hex(12), "refs": {"main": commit["id"]}, "commits": {commit["id"]: commit}}
        self.save(repo_type, namespace, name, repo)
        return repo

    @staticmethod
    def resolve(repo: dict[str, Any], revision: str) -> str:
        """Branch name, ``refs/heads/<branch>`` or full commit id -> commit id (404 ``RevisionNotFound`` otherwise)."""
        branch = revision[len("refs/heads/"):] if revision.startswith("refs/heads/") else revision
        if branch in repo["refs"]:
            return repo["refs"][branch]
        if _COMMIT_RE.match(revision) and revision in repo["commits"]:
            return revision
        raise HubHTTPError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")


class _Handler(BaseHTTPRequestHandler):
    """Routes Hub API requests to :class:`HubServer` methods; one instance per request (stdlib model)."""

    server_version = "hdpissa-test-hub/1.0"
    protocol_version = "HTTP/1.0"  # one request per connection: no keep-alive bookkeeping, client pools cope fine
    hub: HubServer  # set on the subclass built by HubServer.start

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: the stdlib logger would spam test output. ``HubServer.requests`` keeps method + path only."""

    # ---- request plumbing
    def _iter_body(self) -> Iterator[bytes]:
        """Yield the request body, whether sent with ``Content-Length`` or ``Transfer-Encoding: chunked``."""
        if self._body_started:
            raise RuntimeError("request body already consumed")
        self._body_started = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        raise HubHTTPError(400, "truncated chunked body")
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline(65537)  # CRLF after each chunk
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    raise HubHTTPError(400, "truncated body")
                remaining -= len(chunk)
                yield chunk

    def _body(self) -> bytes:
        if self._body_cache is None:
            self._body_cache = b"".join(self._iter_body())
        return self._body_cache

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body() or b"{}")
        except ValueError as exc:
            raise HubHTTPError(400, f"invalid JSON body: {exc}") from exc

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: Mapping[str, str] | None = None, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None,
                  content_type: str = "application/json") -> None:
        self._send(status, json.dumps(payload).encode(), content_type=content_type, headers=headers)

    def _handle(self) -> None:
        self._body_cache: bytes | None = None
        self._body_started = False
        hub = self.hub
        split = urlsplit(self.path)
        hub._record(self.command, split.path)
        try:
            hub._dispatch(self, split.path, parse_qs(split.query))
        except HubHTTPError as err:
            self._drain()
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self.send_json(err.status, {"error": err.message, **err.payload}, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a server bug: answer 500 and remember it so tests can fail loudly
            hub.errors.append(f"{self.command} {split.path}: {type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                self._drain()
                self.send_json(500, {"error": f"hub_server bug: {type(exc).__name__}: {exc}"})

    def _drain(self) -> None:
        """Read any unread body before answering, or the client may see a reset instead of our error response."""
        if not self._body_started:
            with contextlib.suppress(Exception):
                self._body()

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle


class HubServer:
    """A Hub stand-in bound to ``127.0.0.1`` on a free port. See the module docstring for the protocol choices.

    Attributes tests use:
        endpoint: ``http://127.0.0.1:PORT`` (what ``HF_ENDPOINT`` must be set to).
        token / user: the single accepted token and the user name ``whoami`` returns for it.
        fail_commits: fault switch. ``True``: every commit request answers 500 (nothing is committed). An ``int`` n > 0:
            the next n commit requests answer 500, then commits work again (for retry tests). ``False``/``0``: off.
        require_auth: fault switch. ``True``: read endpoints also need the token (private-repo behavior). Write
            endpoints always need it; a present-but-wrong token is rejected everywhere, like on the Hub.
        lfs_threshold: ``None`` (inline ``regular`` uploads only) or a size from which ``preupload`` answers ``lfs``.
        requests: ``"METHOD /path"`` of every request served (no query strings, no headers).
        unhandled: requests no route matched (answered 404); non-empty means the client used an API this server lacks.
        errors: server-side exceptions (answered 500); non-empty means a bug in this server.
    """

    def __init__(self, root: str | os.PathLike[str], token: str = DEFAULT_TOKEN, *, user: str = DEFAULT_USER,
                 lfs_threshold: int | None = None, port: int = 0) -> None:
        if not token:
            raise ValueError("a non-empty token is required")
        self.token = token
        self.user = user
        self.lfs_threshold = lfs_threshold
        self.fail_commits: bool | int = False
        self.require_auth = False
        self.requests: list[str] = []
        self.unhandled: list[str] = []
        self.errors: list[str] = []
        self.store = _Store(root, user)
        self._port = port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._tickets: dict[str, tuple[str, int]] = {}  # single-use LFS upload URL ticket -> (sha256, size)
        self._lock = threading.Lock()
        self.endpoint = ""

    @property
    def root(self) -> Path:
        return self.store.root

    # ---- lifecycle
    def start(self) -> HubServer:
        handler = type("BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer((HOST, self._port), handler)
        self._httpd.daemon_threads = True
        self.endpoint = f"http://{HOST}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket: afterwards connections are refused ("server down"). Idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- helpers for tests
    def client_env(self, hf_home: str | os.PathLike[str], *, base: Mapping[str, str] | None = None,
                   with_token: bool = True, disable_xet: bool = True) -> dict[str, str]:
        """Environment for a client subprocess that must talk to this server and nothing else.

        Starts from ``base`` (default ``os.environ``), drops inherited Hub settings (tokens, endpoint, offline flags),
        and sets ``HF_ENDPOINT``, ``HF_HUB_OFFLINE=0``, an isolated ``HF_HOME`` (no stored token or cache leaks in or
        out), no telemetry/progress bars, ``HF_TOKEN`` (if ``with_token``) and ``HF_HUB_DISABLE_XET=1`` (if
        ``disable_xet``; required when ``lfs_threshold`` is set, harmless otherwise).
        """
        env = dict(os.environ if base is None else base)
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                    "HF_DATASETS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN_PATH", "HF_XET_CACHE", "HF_HUB_DISABLE_XET"):
            env.pop(key, None)
        env.update(HF_ENDPOINT=self.endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(hf_home),
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
        if with_token:
            env["HF_TOKEN"] = self.token
        if disable_xet:
            env["HF_HUB_DISABLE_XET"] = "1"
        return env

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit id that ``revision`` points to."""
        with self.store.lock:
            return self.store.resolve(self._load(repo_type, repo_id), revision)

    def repo_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, Path]:
        """``{path_in_repo: path of the stored blob}`` at ``revision``: read these to compare bytes."""
        with self.store.lock:
            repo = self._load(repo_type, repo_id)
            files = repo["commits"][self.store.resolve(repo, revision)]["files"]
        return {path: self.store.blob_path(entry["sha256"]) for path, entry in sorted(files.items())}

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        namespace, name = self._split(repo_id)
        return self.store.exists(repo_type, namespace, name)

    # ---- internals
    @staticmethod
    def _split(repo_id: str) -> tuple[str, str]:
        parts = repo_id.split("/")
        if len(parts) != 2:
            raise HubHTTPError(400, f"repo id must be 'namespace/name', got '{repo_id}'")
        return parts[0], parts[1]

    def _load(self, repo_type: str, repo_id: str) -> dict[str, Any]:
        return self.store.load(repo_type, *self._split(repo_id))

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append(f"{method} {path}")

    def _check_auth(self, handler: _Handler, write: bool) -> None:
        """401 on a wrong token anywhere, on a missing one for writes (and for reads when ``require_auth``)."""
        header = handler.headers.get("Authorization")
        if header is None:
            if write or self.require_auth:
                raise HubHTTPError(401, "You must be authenticated to access this resource (no Authorization header).")
            return
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), self.token.encode()):
            raise HubHTTPError(401, _INVALID_CREDENTIALS)

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.endpoint}/{_TYPE_PREFIXES[repo_type]}{repo_id}"

    def _take_commit_failure(self) -> bool:
        with self._lock:
            mode = self.fail_commits
            if isinstance(mode, bool):
                return mode
            if isinstance(mode, int) and mode > 0:
                self.fail_commits = mode - 1
                return True
            return False

    def _dispatch(self, h: _Handler, path: str, query: dict[str, list[str]]) -> None:
        raw = [seg for seg in path.split("/") if seg != ""]
        seg = [unquote(s) for s in raw]
        method = h.command

        if method == "PUT" and len(seg) == 3 and seg[:2] == ["__lfs__", "upload"]:
            return self._lfs_put(h, seg[2])
        if seg[:1] == ["api"]:
            if seg == ["api", "whoami-v2"] and method == "GET":
                self._check_auth(h, write=True)
                return h.send_json(200, {"type": "user", "id": hashlib.sha1(self.user.encode()).hexdigest()[:24],
                                         "name": self.user, "fullname": self.user, "email": None, "orgs": [],
                                         "auth": {"type": "access_token",
                                                  "accessToken": {"displayName": "test", "role": "write"}}})
            if seg == ["api", "repos", "create"] and method == "POST":
                return self._create_repo(h)
            if seg == ["api", "repos", "delete"] and method == "DELETE":
                return self._delete_repo(h)
            if seg == ["api", "validate-yaml"] and method == "POST":
                h._drain()
                return h.send_json(200, {"errors": [], "warnings": []})
            if len(seg) >= 4 and seg[1] in _API_TYPES:
                repo_type, repo_id, rest = _API_TYPES[seg[1]], f"{seg[2]}/{seg[3]}", seg[4:]
                return self._repo_api(h, method, repo_type, repo_id, rest, raw[4:], query)
        # git-LFS batch/verify: /{prefix}{ns}/{name}.git/info/lfs/objects/{batch|verify}
        lfs_at = next((i for i, s in enumerate(seg) if s.endswith(".git")), None)
        if method == "POST" and lfs_at is not None and seg[lfs_at + 1:lfs_at + 4] == ["info", "lfs", "objects"]:
            repo_type, repo_id = self._parse_repo_path(seg[:lfs_at] + [seg[lfs_at][: -len(".git")]])
            action = seg[lfs_at + 4:]
            if action == ["batch"]:
                return self._lfs_batch(h, repo_type, repo_id)
            if action == ["verify"]:
                return self._lfs_verify(h)
        # downloads: /{prefix}{ns}/{name}/resolve/{revision}/{path...}
        if method in ("GET", "HEAD") and "resolve" in seg:
            at = seg.index("resolve")
            if at >= 2 and len(seg) > at + 2:
                repo_type, repo_id = self._parse_repo_path(seg[:at])
                return self._resolve(h, repo_type, repo_id, seg[at + 1], "/".join(seg[at + 2:]))
        self.unhandled.append(f"{method} {path}")
        raise HubHTTPError(404, f"hub_server: no route for {method} {path}")

    @staticmethod
    def _parse_repo_path(parts: list[str]) -> tuple[str, str]:
        if len(parts) == 3 and parts[0] in _API_TYPES:
            return _API_TYPES[parts[0]], f"{parts[1]}/{parts[2]}"
        if len(parts) == 2:
            return "model", f"{parts[0]}/{parts[1]}"
        raise HubHTTPError(404, f"unsupported repo path '{'/'.join(parts)}'")

    def _repo_api(self, h: _Handler, method: str, repo_type: str, repo_id: str, rest: list[str], raw_rest: list[str],
                  query: dict[str, list[str]]) -> None:
        """``/api/{type}s/{ns}/{name}[/...]``: info, tree, paths-info, refs, commits, preupload, commit, branch."""
        store = self.store
        head = rest[0] if rest else None
        if method == "GET" and (head is None or (head == "revision" and len(rest) >= 2)):
            self._check_auth(h, write=False)
            revision = "/".join(rest[1:]) if head else "main"
            return h.send_json(200, self._info(repo_type, repo_id, revision, blobs=_truthy(_q(query, "blobs"))))
        if method == "GET" and head == "tree" and len(rest) >= 2:
            self._check_auth(h, write=False)
            # the client quotes the revision and the path with safe="" => one raw segment each
            revision = unquote(raw_rest[1])
            sub = unquote("/".join(raw_rest[2:])).strip("/")
            return h.send_json(200, self._tree(repo_type, repo_id, revision, sub, _truthy(_q(query, "recursive"))))
        if method == "POST" and head == "paths-info" and len(rest) == 2:
            self._check_auth(h, write=False)
            form = parse_qs(h._body().decode())
            return h.send_json(200, self._paths_info(repo_type, repo_id, rest[1], form.get("paths", [])))
        if method == "GET" and head == "refs":
            self._check_auth(h, write=False)
            with store.lock:
                repo = self._load(repo_type, repo_id)
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in sorted(repo["refs"].items())]
            return h.send_json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []})
        if method == "GET" and head == "commits" and len(rest) >= 2:
            self._check_auth(h, write=False)
            return h.send_json(200, self._commits(repo_type, repo_id, "/".join(rest[1:])))
        if method == "POST" and head == "preupload" and len(rest) >= 2:
            self._check_auth(h, write=True)
            return h.send_json(200, self._preupload(h, repo_type, repo_id, "/".join(rest[1:]), query))
        if method == "POST" and head == "commit" and len(rest) >= 2:
            self._check_auth(h, write=True)
            return h.send_json(200, self._commit(h, repo_type, repo_id, "/".join(rest[1:]), query))
        if method == "POST" and head == "branch" and len(rest) >= 2:
            self._check_auth(h, write=True)
            return h.send_json(200, self._create_branch(h, repo_type, repo_id, "/".join(rest[1:])))
        if head in ("xet-write-token", "xet-read-token"):
            h._drain()
            raise HubHTTPError(501, "hub_server does not speak Xet: set HF_HUB_DISABLE_XET=1 in the client environment "
                                    "(HubServer.client_env does), or keep lfs_threshold=None")
        self.unhandled.append(f"{method} /api/{repo_type}s/{repo_id}/{'/'.join(rest)}")
        raise HubHTTPError(404, f"hub_server: no route for {method} /api/{repo_type}s/{repo_id}/{'/'.join(rest)}")

    # ---- endpoint implementations
    def _create_repo(self, h: _Handler) -> None:
        self._check_auth(h, write=True)
        payload = h._json_body()
        repo_type = payload.get("type") or "model"
        if repo_type not in _TYPE_PREFIXES:
            raise HubHTTPError(400, f"unsupported repo type '{repo_type}'")
        namespace, name = payload.get("organization") or self.user, payload.get("name") or ""
        self.store.check_name(namespace, name)
        repo_id = f"{namespace}/{name}"
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        with self.store.lock:
            if self.store.exists(repo_type, namespace, name):
                # the client's create_repo(exist_ok=True) reads "url" from this 409 body
                raise HubHTTPError(409, f"You already created this {repo_type} repo: {repo_id}",
                                   payload={"url": self._repo_url(repo_type, repo_id)})
            repo = self.store.create(repo_type, namespace, name, private)
        h.send_json(200, {"url": self._repo_url(repo_type, repo_id), "name": repo_id, "id": repo["_id"]})

    def _delete_repo(self, h: _Handler) -> None:
        self._check_auth(h, write=True)
        payload = h._json_body()
        repo_type = payload.get("type") or "model"
        namespace, name = payload.get("organization") or self.user, payload.get("name") or ""
        with self.store.lock:
            self.store.load(repo_type, namespace, name)  # 404 if missing
            self.store.repo_file(repo_type, namespace, name).unlink()
        h.send_json(200, {})

    def _info(self, repo_type: str, repo_id: str, revision: str, blobs: bool) -> dict[str, Any]:
        with self.store.lock:
            repo = self._load(repo_type, repo_id)
            sha = self.store.resolve(repo, revision)
            commit = repo["commits"][sha]
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry.get("lfs"):
                    sibling["lfs"] = {"size": entry["size"], "sha256": entry["sha256"],
                                      "pointerSize": entry["pointer_size"]}
            siblings.append(sibling)
        info = {"_id": repo["_id"], "id": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                "lastModified": commit["date"], "createdAt": repo["created_at"], "private": repo["private"],
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "usedStorage": sum(e["size"] for e in commit["files"].values())}
        if repo_type == "model":
            info["modelId"] = repo_id
        return info

    @staticmethod
    def _tree_entry(path: str, entry: dict[str, Any]) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry.get("lfs"):
            item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": entry["pointer_size"]}
        return item

    @staticmethod
    def _dir_entry(path: str) -> dict[str, Any]:
        return {"type": "directory", "oid": hashlib.sha1(f"tree {path}".encode()).hexdigest(), "size": 0, "path": path}

    def _files_at(self, repo_type: str, repo_id: str, revision: str) -> dict[str, Any]:
        with self.store.lock:
            repo = self._load(repo_type, repo_id)
            return repo["commits"][self.store.resolve(repo, revision)]["files"]

    def _tree(self, repo_type: str, repo_id: str, revision: str, sub: str, recursive: bool) -> list[dict[str, Any]]:
        files = self._files_at(repo_type, repo_id, revision)
        prefix = f"{sub}/" if sub else ""
        if sub and not any(p.startswith(prefix) for p in files):
            raise HubHTTPError(404, f"Entry not found: {sub}", code="EntryNotFound")
        out: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for path, entry in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            rel_parts = path[len(prefix):].split("/")
            for depth in range(1, len(rel_parts) if recursive else min(len(rel_parts), 2)):
                dirs.add(prefix + "/".join(rel_parts[:depth]))
            if recursive or len(rel_parts) == 1:
                out.append(self._tree_entry(path, entry))
        return [self._dir_entry(d) for d in sorted(dirs)] + out

    def _paths_info(self, repo_type: str, repo_id: str, revision: str, paths: list[str]) -> list[dict[str, Any]]:
        files = self._files_at(repo_type, repo_id, revision)
        out = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                out.append(self._tree_entry(path, files[path]))
            elif any(p.startswith(f"{path}/") for p in files):
                out.append(self._dir_entry(path))
        return out

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> list[dict[str, Any]]:
        with self.store.lock:
            repo = self._load(repo_type, repo_id)
            sha: str | None = self.store.resolve(repo, revision)
            out = []
            while sha:
                c = repo["commits"][sha]
                out.append({"id": sha, "title": c["title"], "message": c["message"], "date": c["date"],
                            "authors": [{"user": c["author"]}]})
                sha = c["parents"][0] if c["parents"] else None
        return out

    def _create_branch(self, h: _Handler, repo_type: str, repo_id: str, branch: str) -> dict[str, Any]:
        payload = h._json_body()
        with self.store.lock:
            repo = self._load(repo_type, repo_id)
            if branch in repo["refs"]:
                raise HubHTTPError(409, f"Reference already exists: {branch}")
            repo["refs"][branch] = self.store.resolve(repo, payload.get("startingPoint") or "main")
            self.store.save(repo_type, *self._split(repo_id), repo)
        return {}

    def _preupload(self, h: _Handler, repo_type: str, repo_id: str, revision: str,
                   query: dict[str, list[str]]) -> dict[str, Any]:
        payload = h._json_body()
        if _truthy(_q(query, "create_pr")):
            raise HubHTTPError(400, "hub_server does not support create_pr")
        files = self._files_at(repo_type, repo_id, revision)
        out = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item["size"])
            lfs = self.lfs_threshold is not None and size >= self.lfs_threshold and size > 0
            existing = files.get(path)
            oid = None
            if existing is not None:
                oid = existing["sha256"] if existing.get("lfs") else existing["oid"]
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return {"files": out, "commitOid": self.head(repo_id, revision, repo_type)}

    def _commit(self, h: _Handler, repo_type: str, repo_id: str, revision: str,
                query: dict[str, list[str]]) -> dict[str, Any]:
        body = h._body()
        if self._take_commit_failure():
            raise HubHTTPError(500, "Internal Error - injected by hub_server (fail_commits)")
        if _truthy(_q(query, "create_pr")):
            raise HubHTTPError(400, "hub_server does not support create_pr")
        header: dict[str, Any] = {}
        ops: list[tuple[str, dict[str, Any]]] = []
        for line in body.splitlines():
            if line.strip():
                try:
                    item = json.loads(line)
                except ValueError as exc:
                    raise HubHTTPError(400, f"invalid NDJSON line in commit payload: {exc}") from exc
                if item.get("key") == "header":
                    header = item.get("value") or {}
                else:
                    ops.append((item.get("key"), item.get("value") or {}))
        if not header.get("summary"):
            raise HubHTTPError(400, "commit payload has no header/summary line")
        namespace, name = self._split(repo_id)
        with self.store.lock:
            repo = self.store.load(repo_type, namespace, name)
            branch = revision[len("refs/heads/"):] if revision.startswith("refs/heads/") else revision
            if branch not in repo["refs"]:
                raise HubHTTPError(404, f"Invalid rev id: {revision} (commits must target a branch)",
                                   code="RevisionNotFound")
            parent = repo["refs"][branch]
            if header.get("parentCommit") and header["parentCommit"] != parent:
                raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo["commits"][parent]["files"])
            for key, value in ops:
                self._apply_op(files, key, value)
            commit = self.store.new_commit(parent, files, header["summary"], header.get("description") or "",
                                           self.user)
            repo["commits"][commit["id"]] = commit
            repo["refs"][branch] = commit["id"]
            self.store.save(repo_type, namespace, name, repo)
        return {"success": True, "commitOid": commit["id"], "pullRequestUrl": None, "hookOutput": "",
                "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{commit['id']}"}

    def _apply_op(self, files: dict[str, Any], key: str | None, value: dict[str, Any]) -> None:
        path = str(value.get("path", "")).strip("/")
        if not path or path.startswith("./") or any(p in ("", ".", "..") for p in path.split("/")) or "\\" in path:
            raise HubHTTPError(400, f"invalid path in commit: '{value.get('path')}'")
        if key == "file":
            if value.get("encoding") != "base64":
                raise HubHTTPError(400, f"unsupported encoding '{value.get('encoding')}' for {path}")
            data = base64.b64decode(value.get("content", ""), validate=True)
            if self.lfs_threshold is not None and len(data) >= self.lfs_threshold:
                raise HubHTTPError(400, f"Your push was rejected because {path} ({len(data)} bytes) is larger than "
                                        f"{self.lfs_threshold} bytes and was not sent through LFS")
            files[path] = self.store.file_entry(data, lfs=False)
        elif key == "lfsFile":
            oid, size = str(value.get("oid", "")), value.get("size")
            if value.get("algo", "sha256") != "sha256" or not _SHA256_RE.match(oid) or not self.store.has_blob(oid, size):
                raise HubHTTPError(400, f"Your push was rejected because an LFS pointer pointed to a file that does "
                                        f"not exist ({path}, sha256 {oid})")
            files[path] = self.store.lfs_entry(oid, self.store.blob_path(oid).stat().st_size)
        elif key == "deletedFile":
            if path not in files:
                raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            del files[path]
        elif key == "deletedFolder":
            for p in [p for p in files if p.startswith(f"{path}/")]:
                del files[p]
        else:
            raise HubHTTPError(400, f"unsupported commit operation '{key}'")

    def _lfs_batch(self, h: _Handler, repo_type: str, repo_id: str) -> None:
        self._check_auth(h, write=True)
        payload = h._json_body()
        self._load(repo_type, repo_id)  # 404 if the repo is missing
        if payload.get("operation") != "upload":
            raise HubHTTPError(400, "hub_server's LFS batch API only supports operation=upload")
        lfs_url = f"{self._repo_url(repo_type, repo_id)}.git/info/lfs/objects"
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj.get("oid", "")), obj.get("size")
            if not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": oid, "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "invalid oid or size"}})
                continue
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.store.has_blob(oid, size):  # already-present objects get no actions: the client skips them
                ticket = secrets.token_urlsafe(24)
                with self._lock:
                    self._tickets[ticket] = (oid, size)
                item["actions"] = {"upload": {"href": f"{self.endpoint}/__lfs__/upload/{ticket}", "header": {}},
                                   "verify": {"href": f"{lfs_url}/verify", "header": {}}}
            objects.append(item)
        h.send_json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                    content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, h: _Handler, ticket: str) -> None:
        """The 'presigned' upload URL: the single-use ticket in the path is the authorization, as with S3 on the Hub."""
        with self._lock:
            target = self._tickets.pop(ticket, None)
        if target is None:
            raise HubHTTPError(403, "unknown or already used LFS upload ticket")
        self.store.put_blob_from_stream(h._iter_body(), *target)
        h._send(200, b"", headers={"ETag": f'"{target[0]}"'})

    def _lfs_verify(self, h: _Handler) -> None:
        self._check_auth(h, write=True)
        payload = h._json_body()
        if not self.store.has_blob(str(payload.get("oid", "")), payload.get("size")):
            raise HubHTTPError(404, f"LFS object {payload.get('oid')} not found")
        h.send_json(200, {"success": True})

    def _resolve(self, h: _Handler, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        """``/resolve/{revision}/{path}``: what ``hf_hub_download`` HEADs then GETs (with optional ``Range``)."""
        self._check_auth(h, write=False)
        with self.store.lock:
            repo = self._load(repo_type, repo_id)
            sha = self.store.resolve(repo, revision)
            entry = repo["commits"][sha]["files"].get(path)
        if entry is None:
            raise HubHTTPError(404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": sha})
        size = entry["size"]
        etag = entry["sha256"] if entry.get("lfs") else entry["oid"]
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if entry.get("lfs"):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
        start, end, status = 0, size - 1, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", h.headers.get("Range", "").strip())
        if match and size > 0 and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:
                start = max(size - int(match.group(2)), 0)
            if start > end or start >= size:
                raise HubHTTPError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(length))
        for key, value in headers.items():
            h.send_header(key, value)
        h.end_headers()
        if h.command == "GET" and length:
            with open(self.store.blob_path(entry["sha256"]), "rb") as f:
                f.seek(start)
                remaining = length
                while remaining:
                    chunk = f.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    h.wfile.write(chunk)
                    remaining -= len(chunk)


def _q(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[-1] if values else None


@contextlib.contextmanager
def run_hub_server(root: str | os.PathLike[str], token: str = DEFAULT_TOKEN, *, user: str = DEFAULT_USER,
                   lfs_threshold: int | None = None) -> Iterator[HubServer]:
    """Start a :class:`HubServer` on a free ``127.0.0.1`` port for the duration of a ``with`` block.

    Yields the server: ``.endpoint``, ``.token``, ``.fail_commits`` / ``.require_auth`` (settable fault switches),
    ``.stop()`` (simulate the Hub going down mid-test; exiting the block after that is fine), ``.client_env()``,
    ``.repo_files()``, ``.head()``, ``.requests`` / ``.unhandled`` / ``.errors``.
    """
    server = HubServer(root, token, user=user, lfs_threshold=lfs_threshold).start()
    try:
        yield server
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve until SIGINT/SIGTERM; the first stdout line is the endpoint URL."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="directory holding the server's repos and blobs")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = pick a free one)")
    parser.add_argument("--token", default=os.environ.get("HUB_SERVER_TOKEN", DEFAULT_TOKEN),
                        help="the accepted token (default: $HUB_SERVER_TOKEN or %(default)s)")
    parser.add_argument("--user", default=DEFAULT_USER, help="user name returned by whoami")
    parser.add_argument("--lfs-threshold", type=int, default=None,
                        help="files of this many bytes or more go through LFS (client needs HF_HUB_DISABLE_XET=1)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = HubServer(args.root, args.token, user=args.user, lfs_threshold=args.lfs_threshold, port=args.port)
    server.start()
    print(server.endpoint, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        shutil.rmtree(server.root / "tmp", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
