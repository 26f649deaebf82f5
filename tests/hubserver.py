"""A local stand-in for the Hugging Face Hub: enough of its HTTP API for `dsv4 download`.

Serves, on 127.0.0.1 (random port, a background thread), what huggingface_hub 2.x requests:

* `GET /api/models/{repo}` and `/api/models/{repo}/revision/{rev}` (`?blobs=True`): the model info
  with `sha` (commit) and `siblings` [{rfilename, size, blobId, lfs: {size, sha256, pointerSize}}];
* `GET|HEAD /{repo}/resolve/{rev}/{path}`: the file, with `X-Repo-Commit`, `ETag`, `X-Linked-Etag`,
  `X-Linked-Size` (LFS files), `Content-Length`, `Accept-Ranges` and `Range` -> 206 + `Content-Range`.

Errors carry the `X-Error-Code` header huggingface_hub maps to its exceptions (RepoNotFound,
RevisionNotFound, EntryNotFound). Switchable faults: `corrupt` (serve a file with one byte flipped),
`cut(path, n)` (drop the connection after n body bytes, once; optionally answer 503 afterwards),
`broken` (503 for a file, or for the file list: `LISTING`), `fail(target, *statuses)` (answer the next
requests for a file or `LISTING` with these statuses, 0 meaning: close the connection without an answer),
`token` (require `Authorization: Bearer <token>`), `ignore_range` (answer 200 + the whole file to Range
requests); `rate` throttles transfers (to watch the progress bar by hand). Every request is logged in
`requests`. `StalledServer` accepts connections and never answers (for timeouts).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")
LFS_MIN_SIZE = 1_000_000
#: The fault target that stands for the file-list request (`/api/models/...`).
LISTING = "<file list>"


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # URL path, without the query
    file: str | None  # repo file path for resolve requests
    range: str | None
    authorization: str | None


@dataclass(frozen=True)
class ServedFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def blob_id(self) -> str:
        content = self.pointer if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()

    def sibling(self, name: str) -> dict:
        entry = {"rfilename": name, "size": len(self.data), "blobId": self.blob_id}
        if self.lfs:
            entry["lfs"] = {"size": len(self.data), "sha256": self.sha256, "pointerSize": len(self.pointer)}
        return entry


def files_from_dir(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, keyed by its POSIX relative path."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


class FakeHub:
    """The fake hub; use as a context manager (`with FakeHub() as hub: hub.endpoint`)."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, ServedFile]] = {}
        self.commits: dict[str, str] = {}
        self.requests: list[Request] = []
        self.corrupt: set[str] = set()
        self.broken: set[str] = set()
        self.token: str | None = None
        self.rate: int | None = None  # bytes per second per transfer (None: as fast as possible)
        self.ignore_range = False  # answer 200 with the whole file, like a CDN that drops Range
        self._cuts: dict[str, tuple[int, bool]] = {}
        self._failures: dict[str, list[tuple[int, int | None]]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ setup

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Serve `files` as `repo_id`; returns the commit id."""
        served = {name: ServedFile(data, name.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE)
                  for name, data in files.items()}
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(served):
            digest.update(f"{name}:{served[name].blob_id}\n".encode())
        self.repos[repo_id] = served
        self.commits[repo_id] = digest.hexdigest()
        return self.commits[repo_id]

    def cut(self, path: str, after_bytes: int, then_fail: bool = False) -> None:
        """Drop the next transfer of `path` after `after_bytes` body bytes; with `then_fail`, 503 afterwards."""
        self._cuts[path] = (after_bytes, then_fail)

    def fail(self, target: str, *statuses: int, retry_after: int | None = None) -> None:
        """Answer the next requests for `target` (a repo file or `LISTING`) with `statuses`, in order; 0 closes
        the connection without an answer. `retry_after` adds a `Retry-After` header (seconds) to each."""
        self._failures.setdefault(target, []).extend((status, retry_after) for status in statuses)

    def clear_faults(self) -> None:
        self.corrupt.clear()
        self.broken.clear()
        self._cuts.clear()
        self._failures.clear()

    def gets(self, file: str) -> list[Request]:
        """The GET requests for one repo file."""
        return [r for r in self.requests if r.method == "GET" and r.file == file]

    def listings(self) -> list[Request]:
        """The file-list requests."""
        return [r for r in self.requests if r.path.startswith("/api/models/")]

    # ------------------------------------------------------------ server

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ used by the handler

    def log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def take_failure(self, target: str) -> tuple[int, int | None] | None:
        """The (status, retry_after) to answer for `target` now, if a fault says so."""
        with self._lock:
            queued = self._failures.get(target)
            if queued:
                return queued.pop(0)
        return (503, None) if target in self.broken else None

    def take_cut(self, path: str) -> int | None:
        with self._lock:
            cut = self._cuts.pop(path, None)
        if cut is None:
            return None
        after, then_fail = cut
        if then_fail:
            self.broken.add(path)
        return after

    def body(self, repo_id: str, path: str) -> bytes:
        data = self.repos[repo_id][path].data
        if path in self.corrupt and data:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
        return data


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format: str, *args: object) -> None:
        return None

    def do_GET(self) -> None:
        self._route(send_body=True)

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    # ------------------------------------------------------------ routing

    def _route(self, send_body: bool) -> None:
        url_path = urlsplit(self.path).path
        parts = [unquote(p) for p in url_path.strip("/").split("/")]
        file = "/".join(parts[4:]) if len(parts) > 4 and parts[2] == "resolve" else None
        self.hub.log(Request(self.command, url_path, file, self.headers.get("Range"),
                             self.headers.get("Authorization")))
        if self.hub.token and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            self._error(401, "RepoNotFound", "Invalid username or password.")
        elif parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._model_info(f"{parts[2]}/{parts[3]}", parts[5] if len(parts) > 5 and parts[4] == "revision" else None)
        elif file is not None:
            self._resolve(f"{parts[0]}/{parts[1]}", parts[3], file, send_body)
        else:
            self._error(404, None, "Not found")

    def _repo_at(self, repo_id: str, revision: str | None) -> bool:
        if repo_id not in self.hub.repos:
            self._error(404, "RepoNotFound", "Repository not found")
            return False
        if revision not in (None, "main", self.hub.commits[repo_id]):
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return False
        return True

    def _failed(self, target: str) -> bool:
        """Answer with the fault queued for `target`, if any; True if it did."""
        failure = self.hub.take_failure(target)
        if failure is None:
            return False
        status, retry_after = failure
        if status == 0:
            self.close_connection = True
        else:
            extra = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            self._error(status, None, "Service unavailable" if status == 503 else f"Error {status}", extra)
        return True

    def _model_info(self, repo_id: str, revision: str | None) -> None:
        if self._failed(LISTING) or not self._repo_at(repo_id, revision):
            return
        files = self.hub.repos[repo_id]
        info = {"_id": "0" * 24, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                "sha": self.hub.commits[repo_id], "lastModified": "2026-01-01T00:00:00.000Z", "private": False,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                "library_name": "transformers", "siblings": [f.sibling(n) for n, f in sorted(files.items())]}
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def _resolve(self, repo_id: str, revision: str, file: str, send_body: bool) -> None:
        if not self._repo_at(repo_id, revision):
            return
        served = self.hub.repos[repo_id].get(file)
        if served is None:
            self._error(404, "EntryNotFound", "Entry not found")
            return
        if self._failed(file):
            return
        data = self.hub.body(repo_id, file)
        start, end = self._range(len(data))
        if start is None:
            self._error(416, None, "Range not satisfiable")
            return
        etag = served.sha256 if served.lfs else served.blob_id
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", "ETag": f'"{etag}"',
                   "X-Repo-Commit": self.hub.commits[repo_id]}
        if served.lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        partial = self.headers.get("Range") is not None and not self.hub.ignore_range
        if partial:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        body = data[start:end]
        cut = self.hub.take_cut(file) if send_body else None
        self._send(206 if partial else 200, body if send_body else b"", headers, length=len(body), cut=cut)

    def _range(self, size: int) -> tuple[int | None, int]:
        """(start, end) of the requested bytes; start None if the range cannot be served."""
        header = self.headers.get("Range")
        if not header or self.hub.ignore_range:
            return 0, size
        first, _, last = header.removeprefix("bytes=").partition("-")
        start = int(first) if first else 0
        end = int(last) + 1 if last else size
        return (start, min(end, size)) if start < size else (None, size)

    # ------------------------------------------------------------ responses

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str], length: int | None = None,
              cut: int | None = None) -> None:
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            self._write(body if cut is None else body[:cut])
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if cut is not None:
            self.close_connection = True

    def _write(self, data: bytes) -> None:
        step = max(1, self.hub.rate // 20) if self.hub.rate else len(data) or 1
        for start in range(0, len(data), step):
            self.wfile.write(data[start:start + step])
            if self.hub.rate:
                self.wfile.flush()
                time.sleep(step / self.hub.rate)
        self.wfile.flush()


class StalledServer:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers; use as a context manager."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.05)
        self._connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="stalled-server", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._socket.getsockname()[:2]
        return f"http://{host}:{port}"

    @property
    def accepted(self) -> int:
        return len(self._connections)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except OSError:  # the accept timeout: look at the stop flag again
                continue
            self._connections.append(connection)

    def __enter__(self) -> StalledServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for connection in self._connections:
            connection.close()
        self._socket.close()
