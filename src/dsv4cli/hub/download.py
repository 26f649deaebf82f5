"""Download DeepSeek-V4 repositories from the Hugging Face Hub into plain directories; list and remove them.

Layout of a downloaded model (`<data>/models/<owner>--<name>` unless `--local-dir`)::

    config.json, model-0000i-of-0000K.safetensors, ...   the repository files, at their repo paths
    .dsv4/manifest.json          what the hub listed at download time: path -> size, sha256 (LFS) or git blob id,
                                 plus the files already verified (size + mtime + digest, so re-runs skip re-hashing)
    .dsv4/incomplete/<path>.part bytes of a file still being downloaded (kept across runs, resumed with HTTP Range)
    .dsv4/lock                   held (flock) by the process downloading into, or removing, the directory; its pid

How a download works:

* One hub API call (`HfApi.model_info(files_metadata=True)`) gives the commit, every file, its size and, for LFS
  files, its SHA-256; files are then fetched from `/{repo}/resolve/{commit}/{path}` through huggingface_hub's
  HTTP session and headers, so `HF_ENDPOINT`, `HF_TOKEN` and the hub's redirects behave as with `hf download`.
* Every request has a connect and read timeout (`DSV4_HUB_TIMEOUT` seconds, default 30). Timeouts, dropped
  connections and the answers 408, 429, 500, 502, 503 and 504 are retried with exponential backoff (a short
  `Retry-After` is honoured), `DSV4_HUB_RETRIES` times (default 5); a transfer that moved forward starts counting
  again. Then the run stops with one line saying what the hub did.
* Resume: a finished file (right size, digest verified) is skipped; a partial file continues where it stopped
  with an HTTP `Range` request (if the server ignores Range, that file restarts from zero). A `.part` file always
  holds an exact prefix of the file: a failed write (disk full) cuts it back to the last whole write. A file is
  renamed to its final name only once its size and digest are checked; a mismatch deletes it and fails the run.
* Files are verified by size always, by SHA-256 for LFS files and by git blob id for the small ones.
* `HF_HUB_OFFLINE=1`: no network at all; the local copy is checked against its manifest.
* Before downloading, the bytes still to fetch are compared with the free space of the target filesystem.
  `DSV4_FAKE_FREE_BYTES` (test-only) replaces the free space reported by the OS.

Removing (`dsv4 rm`) deletes only what dsv4 wrote: the files the manifest lists and `.dsv4/`, then the directories
left empty; never while a download holds the lock, never through a symlink, never outside the directory. A
download whose manifest is damaged is still listed (as damaged); removing it deletes only `.dsv4/`.

Plain HTTP is used even where `hf_xet` is installed: xet cannot resume a partial file, plain HTTP can.
This module never imports rich and never prints: progress goes through a `Reporter` that the CLI supplies.
Failures a user can act on (network, disk, permissions, damaged files) are `DsvError`s, never tracebacks.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib
import json
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

from dsv4cli import __version__
from dsv4cli.errors import DsvError, ModelNotFound, UsageError
from dsv4cli.fsutil import atomic_write_text, file_lock
from dsv4cli.paths import data_dir
from dsv4cli.units import human_bytes

ALIASES = {
    "flash": "deepseek-ai/DeepSeek-V4-Flash",
    "pro": "deepseek-ai/DeepSeek-V4-Pro",
    "flash-base": "deepseek-ai/DeepSeek-V4-Flash-Base",
    "pro-base": "deepseek-ai/DeepSeek-V4-Pro-Base",
}
DEFAULT_ENDPOINT = "https://huggingface.co"
STATE_DIR = ".dsv4"
MANIFEST_NAME = "manifest.json"
INCOMPLETE_DIR = "incomplete"
PART_SUFFIX = ".part"
LOCK_NAME = "lock"
REGISTRY_NAME = "local-models.json"
#: Test-only: pretend the target filesystem has this many free bytes.
FAKE_FREE_ENV = "DSV4_FAKE_FREE_BYTES"
#: Seconds to wait for the hub to accept a connection and between the bytes of an answer.
TIMEOUT_ENV = "DSV4_HUB_TIMEOUT"
#: How many times a failed request is repeated (timeouts, dropped connections, 408/429/5xx answers).
RETRIES_ENV = "DSV4_HUB_RETRIES"
DEFAULT_TIMEOUT_SECONDS = 30.0
DEFAULT_RETRIES = 5
#: The first wait before a retry; it doubles with each failure, up to RETRY_MAX_SECONDS.
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0
#: A longer `Retry-After` stops the run at once (with the wait in the message) instead of stalling it.
RETRY_AFTER_MAX_SECONDS = 60.0
DEFAULT_MAX_WORKERS = 8
MANIFEST_SAVE_SECONDS = 5.0
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TRUE = {"1", "ON", "YES", "TRUE"}
_HASH_BLOCK = 8 << 20
_LOCAL_DIR_HINT = "fix the permissions, free some space, or choose another {opt:local_dir}"
_T = TypeVar("_T")


# ======================================================================= errors


class DownloadError(DsvError):
    """A download could not finish (network, server, verification)."""


class DiskSpaceError(DownloadError):
    """Not enough free space on the target filesystem."""


class VerificationError(DownloadError):
    """A downloaded file does not match the size or digest the hub announced."""


class ManifestError(DownloadError):
    """The download manifest cannot be read or does not parse; `reason` says why, in a few words."""

    def __init__(self, message: str, hint: str = "", reason: str = ""):
        super().__init__(message, hint)
        self.reason = reason or message


class DownloadBusy(DsvError):
    """Another process holds the lock of a download directory."""


class NotRemovable(DsvError):
    """`dsv4 rm` refuses a directory it cannot prove dsv4 made (or that it would reach through a symlink)."""


class OfflineMissing(DsvError):
    """Offline mode, and the local copy is missing or incomplete."""


class DownloadInterrupted(DsvError):
    """Ctrl-C during a download (partial files are kept for the next run)."""

    exit_code = 130


class DownloadCancelled(Exception):
    """Raised inside worker threads when the user interrupts the download."""


class _Incomplete(Exception):
    """An answer ended before all the bytes it announced (worth a retry that resumes)."""


class _GaveUp(Exception):
    """A request failed for good: `error` is its last failure, `why` says why retrying stopped ("" if the error
    was not worth a retry)."""

    def __init__(self, error: BaseException, why: str = ""):
        super().__init__(str(error))
        self.error, self.why = error, why


# ======================================================================= data


@dataclass(frozen=True)
class RemoteFile:
    """One repository file as the hub lists it."""

    path: str
    size: int
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git blob id (sha1) of non-LFS files

    @property
    def digest(self) -> str | None:
        return self.sha256 or self.blob_id

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256, "blob_id": self.blob_id}

    @classmethod
    def from_dict(cls, path: str, data: dict[str, Any]) -> RemoteFile:
        """Parse a manifest record; raises KeyError, TypeError or ValueError on a malformed one."""
        size, sha256, blob_id = int(data["size"]), data.get("sha256"), data.get("blob_id")
        if size < 0 or not all(digest is None or isinstance(digest, str) for digest in (sha256, blob_id)):
            raise ValueError(f"bad size or digest for {path!r}")
        return cls(path, size, sha256, blob_id)


@dataclass(frozen=True)
class Snapshot:
    """A repository at one commit: every file with its size and digest."""

    repo_id: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]


@dataclass
class Manifest:
    """`.dsv4/manifest.json`: the files wanted in a local copy and those already verified."""

    repo_id: str
    revision: str
    commit: str
    files: dict[str, RemoteFile]
    verified: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": 1, "repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "files": {p: f.to_dict() for p, f in sorted(self.files.items())},
                "verified": dict(sorted(self.verified.items()))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Parse; raises KeyError, TypeError or ValueError on a malformed manifest (one with an unsafe path too)."""
        files = {p: RemoteFile.from_dict(p, d) for p, d in data["files"].items()}
        unsafe = next((p for p in files if not is_safe_repo_path(p)), None)
        if unsafe is not None:
            raise ValueError(f"unsafe file path {unsafe!r}")
        repo_id, revision, commit = data["repo_id"], data.get("revision") or "main", data.get("commit") or ""
        if not all(isinstance(text, str) for text in (repo_id, revision, commit)):
            raise TypeError("repo_id, revision and commit must be strings")
        verified = {p: r for p, r in dict(data.get("verified") or {}).items() if isinstance(r, dict)}  # a cache
        return cls(repo_id, revision, commit, files, verified)


@dataclass(frozen=True)
class PlannedFile:
    """What a download will do with one file.

    `have`: present and verified; `check`: right size, not verified yet (dry run only, a real run hashes it
    while planning); `resume`: `have_bytes` of it are in its `.part`; `get`: fetch from zero.
    """

    file: RemoteFile
    action: str
    have_bytes: int = 0

    @property
    def remaining(self) -> int:
        return 0 if self.action in ("have", "check") else self.file.size - self.have_bytes


@dataclass
class Plan:
    """The files selected for a local copy and what each needs."""

    repo_id: str
    revision: str
    commit: str
    local_dir: Path
    items: list[PlannedFile]
    verified: dict[str, dict[str, Any]] = field(default_factory=dict)
    repo_files: dict[str, RemoteFile] = field(default_factory=dict)

    @property
    def to_fetch(self) -> list[PlannedFile]:
        return [item for item in self.items if item.action in ("resume", "get")]

    @property
    def total_bytes(self) -> int:
        return sum(item.file.size for item in self.items)

    @property
    def needed_bytes(self) -> int:
        return sum(item.remaining for item in self.items)


@dataclass(frozen=True)
class DownloadRequest:
    """The `dsv4 download` flags."""

    repo: str
    revision: str | None = None
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    local_dir: Path | None = None
    max_workers: int = DEFAULT_MAX_WORKERS
    force: bool = False


@dataclass(frozen=True)
class DownloadResult:
    local_dir: Path
    fetched: list[str]
    skipped: list[str]
    bytes_fetched: int


class Reporter(Protocol):
    """Where a download reports progress (the CLI draws one aggregate bar or prints one line per file)."""

    def start(self, total_bytes: int, done_bytes: int, files: int) -> None: ...
    def advance(self, done_bytes: int) -> None: ...
    def file_done(self, path: str, size: int) -> None: ...
    def note(self, message: str) -> None: ...
    def close(self) -> None: ...


class SilentReporter:
    """A Reporter that says nothing."""

    def start(self, total_bytes: int, done_bytes: int, files: int) -> None: ...
    def advance(self, done_bytes: int) -> None: ...
    def file_done(self, path: str, size: int) -> None: ...
    def note(self, message: str) -> None: ...
    def close(self) -> None: ...


# ======================================================================= names and places


def is_safe_repo_path(path: str) -> bool:
    """True for a relative POSIX path that stays inside its directory and does not touch `.dsv4/`."""
    parts = path.split("/")
    return (not path.startswith("/") and "\\" not in path and "\0" not in path and parts[0] != STATE_DIR
            and all(part not in ("", ".", "..") for part in parts) and not re.match(r"^[A-Za-z]:", path))


def resolve_repo_id(name: str) -> str:
    """An alias (flash, pro, flash-base, pro-base) or an `owner/name` repo id -> the repo id."""
    if name in ALIASES:
        return ALIASES[name]
    if _REPO_ID.match(name) and ".." not in name:
        return name
    raise UsageError(f"{name!r} is not a model alias or an owner/name repo id",
                     f"aliases: {', '.join(ALIASES)}")


def models_dir() -> Path:
    return data_dir() / "models"


def default_local_dir(repo_id: str) -> Path:
    owner, name = repo_id.split("/")
    return models_dir() / f"{owner}--{name}"


def hub_timeout() -> float:
    """`DSV4_HUB_TIMEOUT`: seconds to wait for a connection and between the bytes of an answer (default 30)."""
    return _env_number(TIMEOUT_ENV, DEFAULT_TIMEOUT_SECONDS, float, "a number of seconds above 0")


def hub_retries() -> int:
    """`DSV4_HUB_RETRIES`: how many times a failed request is repeated before the run stops (default 5)."""
    return _env_number(RETRIES_ENV, DEFAULT_RETRIES, int, "a whole number, 0 or more")


def _env_number(name: str, default: _T, kind: Callable[[str], _T], expected: str) -> _T:
    text = (os.environ.get(name) or "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value < 0 or (kind is float and not 0 < value < float("inf")):
        raise UsageError(f"{name}={text!r} is not {expected}", f"unset {name} to use {default:g}")
    return value


def hub_endpoint() -> str:
    """`HF_ENDPOINT`, read now (huggingface_hub reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline_mode() -> bool:
    """`HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`), read now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def state_dir(local_dir: Path) -> Path:
    return local_dir / STATE_DIR


def part_path(local_dir: Path, path: str) -> Path:
    return state_dir(local_dir) / INCOMPLETE_DIR / (path + PART_SUFFIX)


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write `path` whole or not at all: a temp file, flushed to disk, renamed over it (so a crash or a full disk
    never leaves a truncated manifest behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1))


def _unlink_quietly(path: Path) -> None:
    """Delete `path` if possible; used while another error is on its way out, which must stay the one raised."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def read_manifest(local_dir: Path) -> Manifest | None:
    """The manifest of `local_dir`; None if there is none; ManifestError if it cannot be read or parsed."""
    path = state_dir(local_dir) / MANIFEST_NAME
    hint = (f"delete {state_dir(local_dir)} and run the download again (files already there are checked, "
            "not fetched again), or remove it with dsv4 rm")
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        reason = (err.strerror or _first_line(err)).lower()
        raise ManifestError(f"cannot read the download manifest {path}: {reason}", hint, reason) from None
    try:
        return Manifest.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        reason = _manifest_problem(err)
        raise ManifestError(f"unreadable download manifest {path}: {reason}", hint, reason) from None


def _manifest_problem(err: Exception) -> str:
    if isinstance(err, json.JSONDecodeError):
        return "an empty file" if not err.doc.strip() else f"not valid JSON ({err})"
    if isinstance(err, KeyError):
        return f"no {err} entry"
    return str(err) or type(err).__name__


def write_manifest(local_dir: Path, manifest: Manifest) -> None:
    _write_json_atomic(state_dir(local_dir) / MANIFEST_NAME, manifest.to_dict())


# ======================================================================= registry of local dirs


def registry_path() -> Path:
    return data_dir() / REGISTRY_NAME


def registered_dirs() -> list[Path]:
    """The download directories dsv4 remembers (absolute paths). A missing, unreadable or malformed registry
    counts as empty: it only helps `dsv4 list` find downloads outside the models dir."""
    try:
        data = json.loads(registry_path().read_text())
    except (OSError, ValueError):
        return []
    entries = data.get("dirs") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return []
    return [Path(entry) for entry in entries if isinstance(entry, str) and os.path.isabs(entry)]


def _save_registry(dirs: Iterable[Path]) -> None:
    unique = sorted({str(d) for d in dirs})
    _write_json_atomic(registry_path(), {"dirs": unique})


def register_dir(local_dir: Path) -> None:
    """Remember a download directory so that `dsv4 list` finds it outside the models dir."""
    dirs = registered_dirs()
    if local_dir not in dirs:
        _save_registry([*dirs, local_dir])


def unregister_dir(local_dir: Path) -> None:
    dirs = registered_dirs()
    if local_dir in dirs:
        _save_registry(d for d in dirs if d != local_dir)


# ======================================================================= retries and timeouts


def _http_module() -> Any:
    """The HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x), or None if neither imports."""
    for name in ("httpx2", "httpx"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _status(err: BaseException) -> int | None:
    """The HTTP status of a failed answer, None if the failure came before an answer."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _is_timeout(err: BaseException) -> bool:
    module = _http_module()
    return isinstance(err, TimeoutError) or (module is not None and isinstance(err, module.TimeoutException))


def _is_connection_error(err: BaseException) -> bool:
    """A refused, reset or dropped connection, or an answer cut short."""
    module = _http_module()
    kinds: tuple[type[BaseException], ...] = (ConnectionError, _Incomplete)
    if module is not None:
        kinds += (module.NetworkError, module.RemoteProtocolError)
    return isinstance(err, kinds)


def _is_transient(err: BaseException) -> bool:
    """Worth another try: a timeout, a connection problem, or one of the "busy, try again" answers."""
    status = _status(err)
    if status is not None:
        return status in _RETRY_STATUSES
    return _is_timeout(err) or _is_connection_error(err)


def _retry_after(err: BaseException) -> float | None:
    """The seconds a `Retry-After: N` header asks for (an HTTP date is not honoured)."""
    headers = getattr(getattr(err, "response", None), "headers", None) or {}
    value = str(headers.get("Retry-After") or headers.get("retry-after") or "").strip()
    return float(value) if value.isdigit() else None


def _describe(err: BaseException, timeout: float) -> str:
    """What went wrong with a request, in words: the status, the timeout, or the connection error."""
    status = _status(err)
    if status is not None:
        return f"the Hub answered {status}"
    if _is_timeout(err):
        return f"the Hub did not answer within {timeout:g} s"
    if _is_connection_error(err):
        return f"the connection failed ({_first_line(err)})"
    return _first_line(err)


class _Backoff:
    """Bounded exponential backoff for one request (the file list, or one file).

    `wait(err)` after each failure: sleeps before the next attempt, or raises `_GaveUp` when `err` is not worth a
    retry, when the retries are spent, or when the hub asks for a wait longer than RETRY_AFTER_MAX_SECONDS.
    `progressed`: the failed attempt still moved the transfer forward, so the count of failures starts again.
    With `cancel` (download threads), the wait ends early with DownloadCancelled when it is set.
    """

    def __init__(self, what: str, note: Callable[[str], None] | None, timeout: float,
                 cancel: threading.Event | None = None) -> None:
        self.what, self.note, self.timeout, self.cancel = what, note, timeout, cancel
        self.retries = hub_retries()
        self.failures = 0

    def wait(self, err: BaseException, progressed: bool = False) -> None:
        if not _is_transient(err):
            raise _GaveUp(err) from err
        self.failures = 1 if progressed else self.failures + 1
        if self.failures > self.retries:
            raise _GaveUp(err, f"gave up after {self.failures} attempts") from err
        delay = _retry_after(err)
        if delay is not None and delay > RETRY_AFTER_MAX_SECONDS:
            raise _GaveUp(err, f"and asks to wait {delay:g} s before trying again") from err
        if delay is None:
            delay = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (self.failures - 1))
        if self.note:
            self.note(f"{self.what}: {_describe(err, self.timeout)}; retrying in {delay:g} s "
                      f"(attempt {self.failures + 1} of {self.retries + 1})")
        if self.cancel is None:
            time.sleep(delay)
        elif self.cancel.wait(delay):
            raise DownloadCancelled()


def _retrying(call: Callable[[], _T], backoff: _Backoff) -> _T:
    """`call()` until it succeeds or `backoff` gives up (then `_GaveUp`)."""
    while True:
        try:
            return call()
        except Exception as err:
            backoff.wait(err)


# ======================================================================= hub metadata


def fetch_snapshot(repo_id: str, revision: str | None, endpoint: str,
                   note: Callable[[str], None] | None = None) -> Snapshot:
    """List the repository at `revision` (default branch if None): commit, files, sizes, digests.

    The request has a timeout and is retried on transient failures (each retry reported through `note`).
    """
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, library_name="dsv4", library_version=__version__)
    timeout = hub_timeout()
    call = functools.partial(api.model_info, repo_id, revision=revision, files_metadata=True, timeout=timeout)
    try:
        info = _retrying(call, _Backoff(f"file list of {repo_id}", note, timeout))
    except _GaveUp as gave_up:
        raise _listing_error(gave_up, repo_id, revision, endpoint, timeout) from None
    files = tuple(_remote_file(repo_id, sibling) for sibling in info.siblings or ())
    return Snapshot(repo_id, revision or "main", info.sha or revision or "main", files)


def _listing_error(gave_up: _GaveUp, repo_id: str, revision: str | None, endpoint: str, timeout: float) -> DsvError:
    """The one-line error for a file list that could not be had."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    err, why = gave_up.error, f"; {gave_up.why}" if gave_up.why else ""
    status = _status(err)
    if isinstance(err, GatedRepoError):
        return DownloadError(f"access to {repo_id} is gated", "accept its terms on the Hub page, then set HF_TOKEN")
    if isinstance(err, RevisionNotFoundError):
        return ModelNotFound(f"{repo_id} has no revision {revision!r} on {endpoint}",
                             "use a branch, tag or commit id that exists")
    if isinstance(err, RepositoryNotFoundError):
        return ModelNotFound(f"no model repository {repo_id} on {endpoint}",
                             "check the name; private or gated repos need HF_TOKEN")
    if status in _RETRY_STATUSES:
        return DownloadError(f"the Hub answered {status} to the file list of {repo_id}{why}",
                             "the Hub is busy or down: run the same command again later")
    if isinstance(err, HfHubHTTPError):
        return DownloadError(f"the hub refused the file list of {repo_id}: {_first_line(err)}")
    if _is_timeout(err):
        return DownloadError(f"the Hub at {endpoint} did not answer within {timeout:g} s{why}",
                             f"check the network, or set {TIMEOUT_ENV} to wait longer, then run the same command "
                             "again")
    if _is_connection_error(err) or isinstance(err, OSError):
        return DownloadError(f"cannot reach {endpoint}: {_first_line(err)}{why}",
                             "check the network, or set HF_HUB_OFFLINE=1 to use a local copy")
    return DownloadError(f"unexpected answer from {endpoint} to the file list of {repo_id}: "
                         f"{type(err).__name__}: {_first_line(err)}", "run the same command again later")


def _remote_file(repo_id: str, sibling: Any) -> RemoteFile:
    """One listed file; a path that would leave the target directory, or missing sizes, stop the download."""
    path = getattr(sibling, "rfilename", None)
    if not isinstance(path, str) or not is_safe_repo_path(path):
        raise DownloadError(f"the hub listed an unsafe file path {path!r} in {repo_id}; nothing was downloaded")
    if sibling.size is None:
        raise DownloadError(f"the hub did not give the size of {path}")
    lfs = sibling.lfs
    try:
        if lfs:
            return RemoteFile(path, int(lfs["size"]), sha256=lfs["sha256"])
        return RemoteFile(path, int(sibling.size), blob_id=sibling.blob_id)
    except (KeyError, TypeError, ValueError) as err:
        raise DownloadError(f"the hub listed {path} in {repo_id} with unreadable metadata ({err})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def select_files(files: Iterable[RemoteFile], include: Sequence[str], exclude: Sequence[str]) -> list[RemoteFile]:
    """The files matching `include` (all if empty) and not `exclude` (hf download glob semantics)."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(files, allow_patterns=list(include) or None,
                                    ignore_patterns=list(exclude) or None, key=lambda f: f.path))


# ======================================================================= verification


def file_digest(path: Path, file: RemoteFile) -> str:
    """SHA-256 for LFS files, the git blob id (sha1 of `blob <size>\\0` + bytes) otherwise."""
    if file.sha256:
        hasher = hashlib.sha256()
    else:
        hasher = hashlib.sha1()
        hasher.update(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()


def verify_file(path: Path, file: RemoteFile) -> dict[str, Any]:
    """Check size and digest; returns the `verified` record, raises VerificationError on a mismatch."""
    size = path.stat().st_size
    if size != file.size:
        raise VerificationError(f"{file.path}: size mismatch (expected {file.size} bytes, got {size})")
    if file.digest:
        actual = file_digest(path, file)
        if actual != file.digest:
            kind = "SHA-256" if file.sha256 else "git blob id"
            raise VerificationError(f"{file.path}: {kind} mismatch (expected {file.digest[:12]}…, got {actual[:12]}…)")
    return _verified_record(path, file)


def _verified_record(path: Path, file: RemoteFile) -> dict[str, Any]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "digest": file.digest}


def is_known_good(path: Path, file: RemoteFile, record: dict[str, Any] | None) -> bool:
    """True if `path` was verified before and has not changed since (no hashing)."""
    if not record:
        return False
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    return (stat.st_size == file.size == record.get("size") and stat.st_mtime_ns == record.get("mtime_ns")
            and record.get("digest") == file.digest)


# ======================================================================= planning


def plan_download(plan: Plan, *, force: bool = False, check_existing: bool = True,
                  max_workers: int = DEFAULT_MAX_WORKERS, note: Callable[[str], None] | None = None) -> Plan:
    """Decide per selected file: `have`, `check`, `resume` or `get`.

    `plan.items` comes in with every selected file and `plan.verified` with the manifest's records. With
    `check_existing`, files already there without a valid record are hashed now (in parallel); without it
    (dry run) they are marked `check`.
    """
    files = [item.file for item in plan.items]
    local_dir = plan.local_dir
    by_path = {f.path: f for f in files}
    good = {} if force else {p: r for p, r in plan.verified.items()
                             if p in by_path and is_known_good(local_dir / p, by_path[p], r)}
    unverified = [] if force else [f for f in files if f.path not in good and _size_matches(local_dir / f.path, f)]
    if check_existing and unverified:
        if note:
            note(f"verifying {len(unverified)} file(s) already in {local_dir} "
                 f"({human_bytes(sum(f.size for f in unverified))})")
        with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
            records = list(pool.map(lambda f: _verify_or_none(local_dir / f.path, f), unverified))
        good.update({f.path: r for f, r in zip(unverified, records, strict=True) if r is not None})
        unverified = []
    unchecked = {f.path for f in unverified}
    plan.items = [_plan_one(f, local_dir, f.path in good, f.path in unchecked, force) for f in files]
    plan.verified = good
    return plan


def _size_matches(path: Path, file: RemoteFile) -> bool:
    try:
        return path.stat().st_size == file.size
    except OSError:  # missing, or not reachable (a later write says why, in one line)
        return False


def _verify_or_none(path: Path, file: RemoteFile) -> dict[str, Any] | None:
    try:
        return verify_file(path, file)
    except VerificationError:
        return None


def _plan_one(file: RemoteFile, local_dir: Path, good: bool, unchecked: bool, force: bool) -> PlannedFile:
    if good:
        return PlannedFile(file, "have")
    if unchecked:
        return PlannedFile(file, "check")
    part = part_path(local_dir, file.path)
    have = 0 if force else _size_or_zero(part)
    if 0 < have <= file.size:
        return PlannedFile(file, "resume", have)
    return PlannedFile(file, "get")


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def free_bytes(local_dir: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) `local_dir`."""
    fake = os.environ.get(FAKE_FREE_ENV)
    if fake:
        return int(fake)
    probe = local_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_disk_space(plan: Plan) -> None:
    needed, free = plan.needed_bytes, free_bytes(plan.local_dir)
    if needed > free:
        raise DiskSpaceError(f"not enough disk space for {plan.repo_id}: need {human_bytes(needed)}, "
                             f"{human_bytes(free)} free in {plan.local_dir}",
                             "free some space or choose another {opt:local_dir}")


# ======================================================================= download


def prepare(request: DownloadRequest) -> tuple[str, Path, Manifest | None]:
    """Validate the request: repo id, target directory, and any manifest already there."""
    if request.max_workers < 1:
        raise UsageError("{opt:max_workers} must be at least 1")
    repo_id = resolve_repo_id(request.repo)
    local_dir = Path(os.path.abspath(os.path.expanduser(request.local_dir or default_local_dir(repo_id))))
    if local_dir.exists() and not local_dir.is_dir():
        raise UsageError(f"{local_dir} exists and is not a directory")
    manifest = read_manifest(local_dir)
    if manifest is not None and manifest.repo_id != repo_id:
        raise UsageError(f"{local_dir} holds {manifest.repo_id}, not {repo_id}",
                         "choose another {opt:local_dir}, or remove it with dsv4 rm")
    return repo_id, local_dir, manifest


@contextmanager
def _os_errors(hint: str) -> Iterator[None]:
    """Turn an OSError escaping the body (or the decorated function) into a one-line DsvError."""
    try:
        yield
    except OSError as err:
        raise _os_error(err, hint) from None


def _os_error(err: OSError, hint: str) -> DsvError:
    """A file-system error in words: permission denied, disk full, or the system's own reason."""
    where = err.filename or "a file"
    if _is_disk_full(err):
        return DiskSpaceError(f"disk full while writing {where}", hint)
    if isinstance(err, PermissionError):
        return DownloadError(f"permission denied: {where}", hint)
    if err.errno is None:  # an HTTP library error: no file involved
        return DownloadError(_first_line(err), hint)
    return DownloadError(f"{where}: {(err.strerror or _first_line(err)).lower()}", hint)


def _is_disk_full(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


@_os_errors(_LOCAL_DIR_HINT)
def make_plan(request: DownloadRequest, *, check_existing: bool = True,
              note: Callable[[str], None] | None = None) -> Plan:
    """Everything a download would do, without writing anything (online: one hub API call)."""
    repo_id, local_dir, manifest = prepare(request)
    verified = manifest.verified if manifest else {}
    if offline_mode():
        snapshot = _offline_snapshot(repo_id, request.revision, local_dir, manifest)
    else:
        snapshot = fetch_snapshot(repo_id, request.revision, hub_endpoint(), note)
    files = select_files(snapshot.files, request.include, request.exclude)
    if not files:
        raise UsageError(f"no file of {repo_id} matches {{opt:include}}/{{opt:exclude}}",
                         f"{len(snapshot.files)} files in the repository")
    plan = Plan(repo_id, snapshot.revision, snapshot.commit, local_dir, [PlannedFile(f, "get") for f in files],
                dict(verified), {f.path: f for f in snapshot.files})
    return plan_download(plan, force=request.force and not offline_mode(), check_existing=check_existing,
                         max_workers=request.max_workers, note=note)


def _offline_snapshot(repo_id: str, revision: str | None, local_dir: Path, manifest: Manifest | None) -> Snapshot:
    if manifest is None:
        raise OfflineMissing(f"offline (HF_HUB_OFFLINE is set) and there is no local copy of {repo_id} in {local_dir}",
                             "unset HF_HUB_OFFLINE to download it")
    if revision and revision not in (manifest.revision, manifest.commit):
        raise OfflineMissing(f"offline and the local copy of {repo_id} is revision {manifest.revision} "
                             f"({manifest.commit[:12]}), not {revision}", "unset HF_HUB_OFFLINE to download it")
    return Snapshot(repo_id, manifest.revision, manifest.commit, tuple(manifest.files.values()))


@_os_errors(_LOCAL_DIR_HINT)
def download(request: DownloadRequest, reporter: Reporter | None = None) -> DownloadResult:
    """Download (or finish, or check) a local copy; returns where it is. See the module docstring."""
    reporter = reporter or SilentReporter()
    plan = make_plan(request, note=reporter.note)
    if offline_mode():
        return _finish_offline(plan, reporter)
    check_disk_space(plan)
    with _download_lock(plan.local_dir):
        manifest = _updated_manifest(plan)
        write_manifest(plan.local_dir, manifest)
        register_dir(plan.local_dir)
        resumed = [item for item in plan.items if item.action == "resume"]
        if resumed:
            reporter.note(f"resuming {len(resumed)} partial file(s) where they stopped (HTTP Range), "
                          f"{human_bytes(sum(item.have_bytes for item in resumed))} already downloaded")
        save = functools.partial(write_manifest, plan.local_dir, manifest)
        with _cleanup(save, "saving the download state", reporter.note):
            fetched = _fetch_all(plan, manifest, request.max_workers, reporter)
    skipped = [item.file.path for item in plan.items if item.action == "have"]
    if not fetched:
        reporter.note(f"{plan.repo_id}: all {len(skipped)} files already present and verified")
    return DownloadResult(plan.local_dir, fetched, skipped, plan.needed_bytes)


@contextmanager
def _cleanup(action: Callable[[], object], what: str, note: Callable[[str], None]) -> Iterator[None]:
    """Run `action` after the body. If the body failed, its error is the one raised: a failure of `action` is then
    only reported through `note`, because a cleanup error must never hide why a download stopped."""
    try:
        yield
    except BaseException:
        try:
            action()
        except Exception as err:
            with contextlib.suppress(Exception):
                note(f"also failed while {what}: {_first_line(err)}")
        raise
    action()


@contextmanager
def _download_lock(local_dir: Path, busy: Callable[[str], DsvError] | None = None) -> Iterator[None]:
    """Hold `.dsv4/lock`, with this pid written in it, while downloading into or removing `local_dir`: two runs
    never append to the same `.part` file, and `dsv4 rm` never deletes under a running download.

    If another process holds it, raises `busy(pid)` (default: "another dsv4 download is writing to ...").
    """
    path = state_dir(local_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path, busy=busy or functools.partial(_writing_elsewhere, local_dir)):
        yield


def _writing_elsewhere(local_dir: Path, pid: str) -> DsvError:
    return DownloadError(f"another dsv4 download is writing to {local_dir} (pid {pid})", "wait for it to finish")


def _finish_offline(plan: Plan, reporter: Reporter) -> DownloadResult:
    missing = plan.to_fetch
    if missing:
        raise OfflineMissing(f"offline and the local copy of {plan.repo_id} is incomplete: {len(missing)} of "
                             f"{len(plan.items)} files missing or not verified (first: {missing[0].file.path})",
                             "unset HF_HUB_OFFLINE and run dsv4 download again to finish it")
    manifest = read_manifest(plan.local_dir)
    if manifest is not None and any(p not in manifest.verified for p in plan.verified):
        manifest.verified.update(plan.verified)
        write_manifest(plan.local_dir, manifest)
    reporter.note(f"{plan.repo_id}: local copy complete ({len(plan.items)} files, {human_bytes(plan.total_bytes)});"
                  " offline, the hub was not checked")
    return DownloadResult(plan.local_dir, [], [item.file.path for item in plan.items], 0)


def _updated_manifest(plan: Plan) -> Manifest:
    """The manifest after this download: the new selection plus the files wanted before, as listed at this
    commit (a file gone from the repo is dropped; a changed one no longer matches its old record)."""
    old = read_manifest(plan.local_dir)
    files = {item.file.path: item.file for item in plan.items}
    verified = dict(plan.verified)
    if old is not None:
        for path in old.files:
            if path not in files and path in plan.repo_files:
                files[path] = plan.repo_files[path]
                if path in old.verified:
                    verified[path] = old.verified[path]
    return Manifest(plan.repo_id, plan.revision, plan.commit, files, verified)


class _Progress:
    """Adds up the bytes of all files for one aggregate bar; lets workers notice a cancel."""

    def __init__(self, reporter: Reporter, kept_bytes: dict[str, int]):
        self.reporter = reporter
        self.cancel = threading.Event()
        self._lock = threading.Lock()
        self._credited = dict(kept_bytes)
        self._done = sum(kept_bytes.values())

    def set_file(self, path: str, size_on_disk: int) -> None:
        """A file (re)starts with `size_on_disk` of its bytes already there (0 if it restarts from zero)."""
        with self._lock:
            self._done += size_on_disk - self._credited.get(path, 0)
            self._credited[path] = size_on_disk
            done = self._done
        self.reporter.advance(done)

    def add(self, path: str, n: int) -> None:
        if self.cancel.is_set():
            raise DownloadCancelled()
        with self._lock:
            self._credited[path] = self._credited.get(path, 0) + n
            self._done += n
            done = self._done
        self.reporter.advance(done)


class _FileBar:
    """One transfer of one file, as the aggregate `_Progress` sees it."""

    def __init__(self, *, progress: _Progress, path: str, resume_from: int = 0, initial: int = 0):
        self.progress, self.path = progress, path
        if initial < resume_from:
            progress.reporter.note(f"{path}: the server ignored the Range request; this file restarts from zero")
        progress.set_file(path, initial)

    def update(self, n: int) -> None:
        self.progress.add(self.path, n)


def _fetch_all(plan: Plan, manifest: Manifest, max_workers: int, reporter: Reporter) -> list[str]:
    """Fetch the missing files in parallel; record each verified one in `manifest`; raise on any failure."""
    todo = plan.to_fetch
    if not todo:
        return []
    progress = _Progress(reporter, {item.file.path: item.have_bytes for item in todo})
    reporter.start(sum(item.file.size for item in todo), sum(item.have_bytes for item in todo), len(todo))
    fetcher = functools.partial(_fetch_one, plan.repo_id, plan.commit, plan.local_dir, progress)
    fetched: list[str] = []
    failures: list[BaseException] = []
    saved_at = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="dsv4-download")
    stop_pool = functools.partial(pool.shutdown, wait=True, cancel_futures=True)
    with (_cleanup(reporter.close, "closing the progress display", reporter.note),
          _cleanup(stop_pool, "stopping the download threads", reporter.note)):
        try:
            futures = {pool.submit(fetcher, item): item for item in todo}
            for future in as_completed(futures):
                item = futures[future]
                try:
                    manifest.verified[item.file.path] = future.result()
                except Exception as err:
                    failures.append(err)
                    continue
                fetched.append(item.file.path)
                reporter.file_done(item.file.path, item.file.size)
                if time.monotonic() - saved_at > MANIFEST_SAVE_SECONDS:  # survive a kill -9 without re-hashing
                    write_manifest(plan.local_dir, manifest)
                    saved_at = time.monotonic()
        except KeyboardInterrupt:
            progress.cancel.set()
            raise DownloadInterrupted("download interrupted",
                                      "run the same command again to resume; partial files are kept") from None
        except BaseException:
            progress.cancel.set()
            raise
    if failures:
        raise _summarise(failures, len(todo))
    return fetched


def _summarise(failures: list[BaseException], total: int) -> DsvError:
    first = failures[0]
    if isinstance(first, DsvError):
        error = first
    elif isinstance(first, OSError):
        error = _os_error(first, "run the same command again to resume; " + _LOCAL_DIR_HINT)
    else:
        error = DownloadError(_first_line(first))
    if len(failures) > 1:
        error = type(error)(f"{len(failures)} of {total} files failed; first: {error.message}", error.hint)
    return error


def _fetch_one(repo_id: str, commit: str, local_dir: Path, progress: _Progress, item: PlannedFile) -> dict[str, Any]:
    """Download one file to its `.part`, verify it, rename it into place; returns its verified record.

    A kept partial file that fails verification is thrown away and the file fetched once more from zero.
    """
    part = part_path(local_dir, item.file.path)
    part.parent.mkdir(parents=True, exist_ok=True)
    if item.action == "get":
        part.unlink(missing_ok=True)
    resumed = _size_or_zero(part) > 0
    fetch = functools.partial(_download_and_verify, repo_id, commit, local_dir, item.file, progress)
    try:
        record = fetch()
    except VerificationError as err:
        if not resumed:
            raise _bad_file(err) from None
        progress.reporter.note(f"{item.file.path}: the kept partial download did not verify; fetching it from zero")
        try:
            record = fetch()
        except VerificationError as again:
            raise _bad_file(again) from None
    destination = local_dir / item.file.path
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, destination)
    return record


def _download_and_verify(repo_id: str, commit: str, local_dir: Path, file: RemoteFile, progress: _Progress
                         ) -> dict[str, Any]:
    """Complete the `.part` of `file` and check it; a part that fails the check is deleted."""
    part = part_path(local_dir, file.path)
    try:
        _http_download(repo_id, commit, local_dir, file, progress)
        return verify_file(part, file)
    except VerificationError:
        _unlink_quietly(part)
        raise


def _bad_file(err: VerificationError) -> VerificationError:
    return VerificationError(f"{err.message}; the bad file was deleted", "run the same command again to fetch it again")


def _http_download(repo_id: str, commit: str, local_dir: Path, file: RemoteFile, progress: _Progress) -> None:
    """Append the missing bytes of `file` to its `.part` (HTTP Range from its current size), retrying transient
    failures with backoff; each retry resumes where the last attempt stopped."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    part = part_path(local_dir, file.path)
    url = hf_hub_url(repo_id, file.path, revision=commit, endpoint=hub_endpoint())
    headers = build_hf_headers(library_name="dsv4", library_version=__version__)
    timeout = hub_timeout()
    backoff = _Backoff(file.path, progress.reporter.note, timeout, progress.cancel)
    while True:
        before = _size_or_zero(part)
        try:
            _transfer(url, headers, timeout, local_dir, file, progress)
            return
        except (DsvError, DownloadCancelled):
            raise
        except Exception as err:
            try:
                backoff.wait(err, progressed=_size_or_zero(part) > before)
            except _GaveUp as gave_up:
                raise _transfer_error(gave_up, part, file, timeout) from None


def _transfer(url: str, headers: dict[str, str], timeout: float, local_dir: Path, file: RemoteFile,
              progress: _Progress) -> None:
    """One GET of the bytes still missing from the `.part` of `file`, appended as they arrive."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session, hf_raise_for_status

    part = part_path(local_dir, file.path)
    try:
        opened = part.open("ab", buffering=0)
    except OSError as err:
        raise _write_error(err, local_dir, file, _size_or_zero(part)) from None
    with opened as fh:
        kept = offset = fh.tell()
        if kept >= file.size:  # complete (a longer part fails verification and is fetched again)
            return
        ranged = {**headers, "Range": f"bytes={kept}-"} if kept else headers
        with get_session().stream("GET", url, headers=ranged, timeout=timeout, follow_redirects=True) as response:
            if response.status_code >= 400:
                response.read()
                hf_raise_for_status(response)
            if kept and response.status_code != 206:  # the server ignored Range: the whole file comes
                fh.truncate(0)
                offset = 0
            bar = _FileBar(progress=progress, path=file.path, resume_from=kept, initial=offset)
            for chunk in response.iter_bytes(constants.DOWNLOAD_CHUNK_SIZE):
                offset = _append(fh, chunk, offset, local_dir, file)
                bar.update(len(chunk))
    if offset < file.size:
        raise _Incomplete(f"the answer ended after {offset} of {file.size} bytes")


def _append(fh: BinaryIO, chunk: bytes, offset: int, local_dir: Path, file: RemoteFile) -> int:
    """Write `chunk` after the `offset` bytes of the `.part` (opened unbuffered); returns its new size.

    A failed write cuts the part back to `offset`, so that it stays an exact prefix of the file and the next run
    resumes from there; disk full becomes a DiskSpaceError, any other write error a one-line DownloadError.
    """
    if offset + len(chunk) > file.size:
        raise VerificationError(f"{file.path}: the server sent more than the {file.size} bytes the hub listed")
    view = memoryview(chunk)
    try:
        while view:
            view = view[fh.write(view) or 0:]
    except OSError as err:
        with contextlib.suppress(OSError):
            fh.truncate(offset)
        raise _write_error(err, local_dir, file, offset) from None
    return offset + len(chunk)


def _write_error(err: OSError, local_dir: Path, file: RemoteFile, kept: int) -> DsvError:
    resume = f"run the same command again to resume ({human_bytes(kept)} of {human_bytes(file.size)} kept)"
    if _is_disk_full(err):
        free = human_bytes(_free_or_zero(local_dir))
        return DiskSpaceError(f"disk full while writing {file.path}: {free} free in {local_dir}",
                              f"free some space or choose another {{opt:local_dir}}, then {resume}")
    reason = (err.strerror or _first_line(err)).lower()
    return DownloadError(f"cannot write {part_path(local_dir, file.path)}: {reason}",
                         f"fix the permissions or choose another {{opt:local_dir}}, then {resume}")


def _free_or_zero(local_dir: Path) -> int:
    try:
        return free_bytes(local_dir)
    except (OSError, ValueError):
        return 0


def _transfer_error(gave_up: _GaveUp, part: Path, file: RemoteFile, timeout: float) -> DownloadError:
    """The one-line error for a file that could not be fetched; says how much of it is kept for the next run."""
    kept = _size_or_zero(part)
    if kept > file.size:
        _unlink_quietly(part)
        kept = 0
    why = f"; {gave_up.why}" if gave_up.why else ""
    return DownloadError(f"{file.path}: download failed: {_describe(gave_up.error, timeout)}{why}",
                         f"run the same command again to resume ({human_bytes(kept)} of "
                         f"{human_bytes(file.size)} kept)")


# ======================================================================= list and rm

_FIX_HINT = "fix the permissions, then run the same command again"


@dataclass(frozen=True)
class LocalModel:
    """A downloaded model as `dsv4 list` shows it.

    `damaged`: why its manifest cannot be used (then the repo id is guessed from the directory name, the file
    counts are 0 and `bytes_present` is what the directory holds).
    """

    repo_id: str
    revision: str
    commit: str
    path: Path
    files: int
    files_present: int
    bytes_present: int
    bytes_expected: int
    partial_bytes: int
    damaged: str | None = None

    @property
    def complete(self) -> bool:
        return self.damaged is None and self.files_present == self.files

    def to_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit, "path": str(self.path),
                "files": self.files, "files_present": self.files_present, "bytes": self.bytes_present,
                "bytes_expected": self.bytes_expected, "partial_bytes": self.partial_bytes,
                "complete": self.complete, "damaged": self.damaged}


@dataclass(frozen=True)
class Removal:
    """What `dsv4 rm` did: `removed` files deleted; `kept` the files left in the directory (not dsv4's, or, with
    a damaged manifest, not known to be); `damaged` as in LocalModel."""

    path: Path
    removed: int
    kept: list[Path]
    damaged: str | None = None


def candidate_dirs() -> list[Path]:
    """Every directory that may hold a download: the models dir's children and the registered dirs."""
    root = models_dir()
    found = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return list(dict.fromkeys([*found, *registered_dirs()]))


def describe_local(local_dir: Path) -> LocalModel | None:
    """Compare a directory with its manifest (sizes only, no hashing); None if it holds no download.

    A directory with dsv4's state dir whose manifest is missing, unreadable or malformed is described as damaged,
    so that `dsv4 list` shows it and `dsv4 rm` can remove it.
    """
    try:
        if not state_dir(local_dir).is_dir():
            return None
        manifest = read_manifest(local_dir)
    except ManifestError as err:
        return _damaged(local_dir, err.reason)
    except OSError as err:
        return _damaged(local_dir, (err.strerror or _first_line(err)).lower())
    if manifest is None:
        return _damaged(local_dir, "no manifest (its first download stopped early)")
    present = [f for f in manifest.files.values() if _size_matches(local_dir / f.path, f)]
    partial = sum(_size_or_zero(p) for p in _files_under(state_dir(local_dir) / INCOMPLETE_DIR)
                  if p.name.endswith(PART_SUFFIX))
    return LocalModel(manifest.repo_id, manifest.revision, manifest.commit, local_dir, len(manifest.files),
                      len(present), sum(f.size for f in present), sum(f.size for f in manifest.files.values()),
                      partial)


def _damaged(local_dir: Path, reason: str) -> LocalModel:
    size = sum(_size_or_zero(p) for p in _files_under(local_dir) if STATE_DIR not in p.relative_to(local_dir).parts)
    return LocalModel(_guess_repo_id(local_dir), "", "", local_dir, 0, 0, size, 0, 0, reason)


def _guess_repo_id(local_dir: Path) -> str:
    """`owner/name` from a default directory name (`owner--name`); "(unknown)" for any other name."""
    guess = local_dir.name.replace("--", "/", 1)
    return guess if "--" in local_dir.name and _REPO_ID.match(guess) else "(unknown)"


def _files_under(directory: Path) -> list[Path]:
    """The files and symlinks below `directory` (symlinks are not followed), sorted; [] if it does not exist."""
    found: list[Path] = []
    for root, dirs, files in os.walk(directory):
        base = Path(root)
        found += [base / name for name in files]
        found += [base / name for name in dirs if (base / name).is_symlink()]
    return sorted(found)


@_os_errors(_FIX_HINT)
def list_local_models() -> list[LocalModel]:
    models = (describe_local(d) for d in candidate_dirs())
    return sorted((m for m in models if m is not None), key=lambda m: (m.repo_id, str(m.path)))


def find_local_model(name: str) -> LocalModel:
    """`name` is an alias, a repo id or a path shown by `dsv4 list`."""
    models = list_local_models()
    as_path = Path(os.path.abspath(os.path.expanduser(name)))
    matches = [m for m in models if m.path == as_path]
    if not matches:
        repo_id = ALIASES.get(name, name)
        matches = [m for m in models if m.repo_id.lower() == repo_id.lower()]
    if not matches:
        raise ModelNotFound(f"no downloaded model {name!r}", "dsv4 list shows the names and paths you can remove")
    if len(matches) > 1:
        paths = ", ".join(str(m.path) for m in matches)
        raise UsageError(f"{name!r} matches {len(matches)} local copies: {paths}", "pass the path to remove one")
    return matches[0]


@_os_errors(_FIX_HINT)
def remove_local_model(model: LocalModel) -> Removal:
    """Delete what dsv4 wrote for a download: the files its manifest lists, then `.dsv4/`, then the directories
    that leaves empty (the download dir too). Everything else stays, and is returned.

    Refused while a download holds the lock (nothing is deleted then), for a symlinked directory, and for a
    directory dsv4 neither registered nor made in its models dir. A listed path is deleted only if it is a
    regular file reached without a symlink. With a damaged manifest only `.dsv4/` goes.
    """
    local_dir = model.path
    _check_removable(local_dir)
    with _download_lock(local_dir, functools.partial(_download_running, model.repo_id)):
        try:
            manifest = read_manifest(local_dir)
        except ManifestError:
            manifest = None
        listed = [local_dir / path for path in (manifest.files if manifest else ())]
        removed = [path for path in listed if _delete_own(local_dir, path)]
        shutil.rmtree(state_dir(local_dir))
    _remove_empty_dirs(local_dir, removed)
    unregister_dir(local_dir)
    damaged = None if manifest else model.damaged or "no manifest"
    return Removal(local_dir, len(removed), _files_under(local_dir), damaged)


def _check_removable(local_dir: Path) -> None:
    """Refuse anything but a real directory with dsv4's state dir that dsv4 registered or made in its models dir."""
    if local_dir.is_symlink():
        raise NotRemovable(f"{local_dir} is a symlink to {os.path.realpath(local_dir)}; dsv4 rm does not delete "
                           "through symlinks", "remove the link, and what it points to, yourself")
    state = state_dir(local_dir)
    ours = local_dir.parent == models_dir() or local_dir in registered_dirs()
    if not (ours and local_dir.is_dir() and state.is_dir() and not state.is_symlink()):
        raise NotRemovable(f"{local_dir} is not a directory dsv4 downloaded; nothing was removed",
                           "dsv4 rm removes only what dsv4 list shows")


def _download_running(repo_id: str, pid: str) -> DsvError:
    return DownloadBusy(f"a download of {repo_id} is running (pid {pid}); stop it first",
                        "wait for it to finish, or stop it, then run dsv4 rm again")


def _delete_own(local_dir: Path, path: Path) -> bool:
    """Delete `path` if it is a regular file inside `local_dir` reached through no symlink; True if deleted."""
    relative_parent = path.parent.relative_to(local_dir)
    if Path(os.path.realpath(path.parent)) != Path(os.path.realpath(local_dir)) / relative_parent:
        return False
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return False
    except FileNotFoundError:
        return False
    path.unlink()
    return True


def _remove_empty_dirs(local_dir: Path, removed: Iterable[Path]) -> None:
    """Remove the directories that deleting `removed` emptied, up to and including `local_dir` (never a symlink,
    never a directory that still holds something)."""
    parents = {parent for path in removed for parent in path.parents if local_dir in parent.parents}
    for directory in sorted(parents | {local_dir}, key=lambda p: len(p.parts), reverse=True):
        if directory.is_dir() and not directory.is_symlink() and not any(directory.iterdir()):
            with contextlib.suppress(OSError):
                directory.rmdir()
