"""A local stand-in for the Hugging Face hub, and a way to run code against it.

`StandInHub` is a threaded `http.server` speaking the part of the hub's HTTP API that
huggingface_hub's downloads use (read from its `file_download.py` / `utils/_http.py`):

- ``HEAD``/``GET /{repo}/resolve/{revision}/{file}``: the file, with ``X-Repo-Commit`` (the
  commit huggingface_hub files the snapshot under), ``ETag`` (the blob name in its cache) and
  ``Content-Length``. A missing file answers 404 with ``X-Error-Code: EntryNotFound`` (timm
  and transformers probe optional files this way), an unknown repo 404 ``RepoNotFound``, an
  unknown revision 404 ``RevisionNotFound``.
- ``GET /api/models/{repo}[/revision/{revision}]``: the repo's info (``sha``, ``siblings``).
- ``GET /api/models/{repo}/tree/{revision}[/{path}]``: its file listing.

Every request is recorded in `requests`, so a test can check that the real download code ran.

huggingface_hub reads ``HF_ENDPOINT`` once, at import, and an `HfApi` made at import keeps
the endpoint it saw; so the code under test runs in a fresh interpreter (`run_python`) whose
environment names the stand-in from the start, as a person's shell would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_API_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")


class StandInHub:
    """Serves repos (``owner/name`` -> {file name: bytes}) over HTTP on 127.0.0.1.

    Use as a context manager; `url` is the value for ``HF_ENDPOINT``.
    """

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self._server: ThreadingHTTPServer | None = None

    def add_repo(self, repo_id: str, directory: str | os.PathLike) -> None:
        """Serve every file under ``directory`` as repo ``repo_id`` (branch ``main``)."""
        root = Path(directory)
        self.repos[repo_id] = {p.relative_to(root).as_posix(): p.read_bytes()
                               for p in sorted(root.rglob("*")) if p.is_file()}

    def commit(self, repo_id: str) -> str:
        """The repo's commit hash: 40 hex digits derived from its content."""
        digest = hashlib.sha1(repo_id.encode())
        for name, data in sorted(self.repos[repo_id].items()):
            digest.update(name.encode() + hashlib.sha256(data).digest())
        return digest.hexdigest()

    @property
    def url(self) -> str:
        assert self._server is not None, "start the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def downloads(self, repo_id: str) -> list[str]:
        """Files of ``repo_id`` fetched with GET (their content, not only their metadata)."""
        found = [(method, _RESOLVE.match(path)) for method, path in self.requests]
        return [m["file"] for method, m in found if method == "GET" and m and m["repo"] == repo_id]

    def __enter__(self) -> StandInHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


def _handler_for(hub: StandInHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects from the hub

        def log_message(self, *args) -> None:  # quiet: the test reads `hub.requests`
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path))
            if m := _RESOLVE.match(path):
                self._resolve(m["repo"], m["rev"], m["file"], body)
            elif m := _API_TREE.match(path):
                self._tree(m["repo"], m["rev"], m["path"] or "")
            elif m := _API_INFO.match(path):
                self._info(m["repo"], m["rev"] or "main")
            else:
                self._error(404, "RepoNotFound", f"No route for {path}")

        def _known(self, repo: str, rev: str) -> bool:
            if repo not in hub.repos:
                self._error(404, "RepoNotFound", f"Repository {repo} not found")
                return False
            if rev not in ("main", hub.commit(repo)):
                self._error(404, "RevisionNotFound", f"Revision {rev} not found")
                return False
            return True

        def _resolve(self, repo: str, rev: str, name: str, body: bool) -> None:
            if not self._known(repo, rev):
                return
            data = hub.repos[repo].get(name)
            if data is None:
                self._error(404, "EntryNotFound", f"{name} not found in {repo}")
                return
            self._send(200, data if body else b"", {
                "X-Repo-Commit": hub.commit(repo),
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "Content-Type": "application/octet-stream",
            }, length=len(data))

        def _info(self, repo: str, rev: str) -> None:
            if self._known(repo, rev):
                self._json({"id": repo, "modelId": repo, "sha": hub.commit(repo),
                            "private": False, "gated": False, "disabled": False, "tags": [],
                            "siblings": [{"rfilename": n} for n in hub.repos[repo]]})

        def _tree(self, repo: str, rev: str, folder: str) -> None:
            if self._known(repo, rev):
                prefix = f"{folder.rstrip('/')}/" if folder else ""
                self._json([{"type": "file", "path": n, "size": len(d),
                             "oid": hashlib.sha1(d).hexdigest()}
                            for n, d in hub.repos[repo].items() if n.startswith(prefix)])

        def _json(self, value) -> None:
            data = json.dumps(value).encode()
            self._send(200, data, {"Content-Type": "application/json"}, length=len(data))

        def _error(self, status: int, code: str, message: str) -> None:
            data = json.dumps({"error": message}).encode()
            self._send(status, data if self.command == "GET" else b"",
                       {"X-Error-Code": code, "X-Error-Message": message,
                        "Content-Type": "application/json"}, length=len(data))

        def _send(self, status: int, data: bytes, headers: dict, length: int) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if data:
                self.wfile.write(data)

    return Handler


def closed_port_url() -> str:
    """An endpoint where nothing listens: connections are refused at once (offline)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run_python(code: str, endpoint: str, hf_home: str | os.PathLike, args: list = (),
               timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``code`` (with ``sys.argv[1:] == args``) in a fresh interpreter whose hub is
    ``endpoint`` and whose Hugging Face cache is ``hf_home``.

    The environment is a person's with the hub moved: no offline flags, no token, telemetry
    and progress bars off, one thread (tiny models on a shared machine).
    """
    drop = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
            "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
