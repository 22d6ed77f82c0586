"""A local stand-in for exactly the Hub HTTP calls a ``push_to_hub`` and a ``snapshot_download`` make, on
``pytest-httpserver``.

Why: push tests must run the real ``huggingface_hub`` client over real HTTP (auth header, the preupload/commit
protocol, the headers a download needs), and the real Hub is out of reach (and the wrong place for tests). The calls,
as recorded from ``trainer.push_to_hub()`` (also with ``hub_strategy="checkpoint"``) and ``snapshot_download``:

    POST /api/repos/create                      POST /api/validate-yaml (model card metadata)
    POST /api/models/NS/NAME/preupload/REV      POST /api/models/NS/NAME/commit/REV   (NDJSON, files inline base64)
    GET  /api/models/NS/NAME/revision/REV       GET  /api/models/NS/NAME/tree/REV
    HEAD|GET /NS/NAME/resolve/REV/PATH

Every file is uploaded "regular" (inline), so neither LFS nor Xet is involved. Any other request gets
pytest-httpserver's "no handler" answer and fails :meth:`MiniHub.check`. Known to match the ``huggingface_hub``
versions the ``test`` extra allows (checked with 2.4) and 1.33.0, the release of the GPU set
(``tools/gpu-constraints.txt``; ``tests/test_push.py`` passed with it). The token is never stored or logged.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import threading
from collections.abc import Iterator, Mapping

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

USER = "test-user"
REPO = r"/(?P<ns>[\w.-]+)/(?P<name>[\w.-]+)"


def git_blob_oid(data: bytes) -> str:
    """What the client compares with the ``oid`` of a ``preupload`` answer to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _json(payload, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(json.dumps(payload), status=status, headers=dict(headers or {}), content_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status, {"X-Error-Message": message})


class MiniHub:
    """Repositories held in memory: ``repos[repo_id]`` is a list of commits ``(sha, {path: bytes})``, newest last.

    ``fail_commits = True`` makes every commit answer 500 (nothing committed); ``stop()`` takes the server down.
    """

    def __init__(self, token: str):
        self.token = token
        self.fail_commits = False
        self.repos: dict[str, list[tuple[str, dict[str, bytes]]]] = {}
        self._lock = threading.Lock()
        self.server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
        routes = [("/api/repos/create", "POST", self._create), ("/api/validate-yaml", "POST", self._validate_yaml),
                  (rf"/api/models{REPO}/preupload/(?P<rev>.+)", "POST", self._preupload),
                  (rf"/api/models{REPO}/commit/(?P<rev>.+)", "POST", self._commit),
                  (rf"/api/models{REPO}/revision/(?P<rev>.+)", "GET", self._info),
                  (rf"/api/models{REPO}/tree/(?P<rev>[^/]+)", "GET", self._tree),
                  (rf"{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", None, self._resolve)]
        for uri, method, handler in routes:
            pattern = re.compile(f"^{uri}$")
            self.server.expect_request(pattern, **({"method": method} if method else {})).respond_with_handler(
                lambda request, pattern=pattern, handler=handler: self._authorized(request, pattern, handler))

    # -- test helpers ------------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return self.server.url_for("").rstrip("/")

    def stop(self) -> None:
        if self.server.is_running():
            self.server.stop()

    def repo_files(self, repo_id: str) -> dict[str, bytes]:
        """``{path: content}`` at the head of ``repo_id``."""
        with self._lock:
            return dict(self.repos[repo_id][-1][1])

    def check(self) -> None:
        """Fail if the client made a request no route answers, or a handler raised."""
        self.server.check()

    def client_env(self, hf_home: str | os.PathLike, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` pointed at this server only: online, its own ``HF_HOME``, no inherited token or endpoint."""
        env = {k: v for k, v in base.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
        env.update(HF_ENDPOINT=self.endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
        return env

    # -- handlers ----------------------------------------------------------------------------------------------
    def _authorized(self, request: Request, pattern: re.Pattern, handler) -> Response:
        """Writes need the token; a wrong token is refused everywhere (as on the Hub); public reads need none."""
        header = request.headers.get("Authorization")
        write = request.method == "POST"
        if header is not None and not hmac.compare_digest(header.encode(), f"Bearer {self.token}".encode()):
            return _error(401, "Invalid credentials in Authorization header")
        if header is None and write:
            return _error(401, "You must be authenticated to access this resource.")
        return handler(request, **pattern.match(request.path).groupdict())

    def _head(self, repo_id: str, rev: str) -> tuple[str, dict[str, bytes]]:
        commits = self.repos[repo_id]
        return commits[-1] if rev == "main" else next(c for c in commits if c[0] == rev)

    def _create(self, request: Request) -> Response:
        body = request.get_json()
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        with self._lock:
            self.repos.setdefault(repo_id, [(hashlib.sha1(repo_id.encode()).hexdigest(), {})])
        return _json({"url": f"{self.endpoint}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, request: Request) -> Response:
        return _json({"errors": [], "warnings": []})

    def _preupload(self, request: Request, ns: str, name: str, rev: str) -> Response:
        with self._lock:
            sha, files = self._head(f"{ns}/{name}", rev)
        out = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None}
               for f in request.get_json()["files"]]
        return _json({"files": out, "commitOid": sha})

    def _commit(self, request: Request, ns: str, name: str, rev: str) -> Response:
        if self.fail_commits:
            return _error(500, "Internal Error - injected by the test (fail_commits)")
        lines = [json.loads(line) for line in request.get_data().splitlines() if line.strip()]
        repo_id = f"{ns}/{name}"
        with self._lock:
            parent, files = self._head(repo_id, rev)
            files = dict(files)
            for op in lines:
                key, value = op["key"], op["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                elif key != "header":
                    return _error(400, f"mini hub: unsupported commit operation {key!r}")
            sha = hashlib.sha1((parent + json.dumps(sorted((p, git_blob_oid(d)) for p, d in files.items())))
                               .encode()).hexdigest()
            self.repos[repo_id].append((sha, files))
        return _json({"success": True, "commitOid": sha, "pullRequestUrl": None,
                      "commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}"})

    def _info(self, request: Request, ns: str, name: str, rev: str) -> Response:
        with self._lock:
            sha, files = self._head(f"{ns}/{name}", rev)
        return _json({"id": f"{ns}/{name}", "modelId": f"{ns}/{name}", "sha": sha, "private": False,
                      "siblings": [{"rfilename": p} for p in sorted(files)]})

    def _tree(self, request: Request, ns: str, name: str, rev: str) -> Response:
        with self._lock:
            _, files = self._head(f"{ns}/{name}", rev)
        return _json([{"type": "file", "path": p, "size": len(d), "oid": git_blob_oid(d)}
                      for p, d in sorted(files.items())])

    def _resolve(self, request: Request, ns: str, name: str, rev: str, path: str) -> Response:
        with self._lock:
            sha, files = self._head(f"{ns}/{name}", rev)
        if path not in files:
            return Response(status=404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
        data = files[path]
        return Response(data, content_type="application/octet-stream",
                        headers={"ETag": f'"{git_blob_oid(data)}"', "X-Repo-Commit": sha})


@contextlib.contextmanager
def run_mini_hub(token: str) -> Iterator[MiniHub]:
    """A :class:`MiniHub` serving on a free 127.0.0.1 port for the duration of the block."""
    hub = MiniHub(token)
    hub.server.start()
    try:
        yield hub
    finally:
        hub.stop()
