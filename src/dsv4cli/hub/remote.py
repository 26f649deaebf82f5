"""Talking to the Hugging Face Hub: settings, the file list of a repository, and retrying what failed.

* One hub API call (`HfApi.model_info(files_metadata=True)`) gives the commit, every file, its size and, for LFS
  files, its SHA-256.
* Every request has a connect and read timeout (`DSV4_HUB_TIMEOUT` seconds, default 30). Timeouts, dropped
  connections and the answers 408, 429, 500, 502, 503 and 504 are retried with exponential backoff (a short
  `Retry-After` is honoured), `DSV4_HUB_RETRIES` times (default 5); a transfer that moved forward starts counting
  again. Then the run stops with one line saying what the hub did.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from dsv4cli import __version__
from dsv4cli.errors import DsvError, ModelNotFound, UsageError
from dsv4cli.hub.errors import DownloadCancelled, DownloadError, GaveUp, Incomplete, first_line
from dsv4cli.hub.layout import RemoteFile, is_safe_repo_path

DEFAULT_ENDPOINT = "https://huggingface.co"
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
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_TRUE = {"1", "ON", "YES", "TRUE"}
_T = TypeVar("_T")


@dataclass(frozen=True)
class Snapshot:
    """A repository at one commit: every file with its size and digest."""

    repo_id: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]


# ======================================================================= settings


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
    kinds: tuple[type[BaseException], ...] = (ConnectionError, Incomplete)
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


def describe(err: BaseException, timeout: float) -> str:
    """What went wrong with a request, in words: the status, the timeout, or the connection error."""
    status = _status(err)
    if status is not None:
        return f"the Hub answered {status}"
    if _is_timeout(err):
        return f"the Hub did not answer within {timeout:g} s"
    if _is_connection_error(err):
        return f"the connection failed ({first_line(err)})"
    return first_line(err)


class Backoff:
    """Bounded exponential backoff for one request (the file list, or one file).

    `wait(err)` after each failure: sleeps before the next attempt, or raises `GaveUp` when `err` is not worth a
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
            raise GaveUp(err) from err
        self.failures = 1 if progressed else self.failures + 1
        if self.failures > self.retries:
            raise GaveUp(err, f"gave up after {self.failures} attempts") from err
        delay = _retry_after(err)
        if delay is not None and delay > RETRY_AFTER_MAX_SECONDS:
            raise GaveUp(err, f"and asks to wait {delay:g} s before trying again") from err
        if delay is None:
            delay = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (self.failures - 1))
        if self.note:
            self.note(f"{self.what}: {describe(err, self.timeout)}; retrying in {delay:g} s "
                      f"(attempt {self.failures + 1} of {self.retries + 1})")
        if self.cancel is None:
            time.sleep(delay)
        elif self.cancel.wait(delay):
            raise DownloadCancelled()


def _retrying(call: Callable[[], _T], backoff: Backoff) -> _T:
    """`call()` until it succeeds or `backoff` gives up (then `GaveUp`)."""
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
        info = _retrying(call, Backoff(f"file list of {repo_id}", note, timeout))
    except GaveUp as gave_up:
        raise _listing_error(gave_up, repo_id, revision, endpoint, timeout) from None
    files = tuple(_remote_file(repo_id, sibling) for sibling in info.siblings or ())
    return Snapshot(repo_id, revision or "main", info.sha or revision or "main", files)


def _listing_error(gave_up: GaveUp, repo_id: str, revision: str | None, endpoint: str, timeout: float) -> DsvError:
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
        return DownloadError(f"the hub refused the file list of {repo_id}: {first_line(err)}")
    if _is_timeout(err):
        return DownloadError(f"the Hub at {endpoint} did not answer within {timeout:g} s{why}",
                             f"check the network, or set {TIMEOUT_ENV} to wait longer, then run the same command "
                             "again")
    if _is_connection_error(err) or isinstance(err, OSError):
        return DownloadError(f"cannot reach {endpoint}: {first_line(err)}{why}",
                             "check the network, or set HF_HUB_OFFLINE=1 to use a local copy")
    return DownloadError(f"unexpected answer from {endpoint} to the file list of {repo_id}: "
                         f"{type(err).__name__}: {first_line(err)}", "run the same command again later")


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


def select_files(files: Iterable[RemoteFile], include: Sequence[str], exclude: Sequence[str]) -> list[RemoteFile]:
    """The files matching `include` (all if empty) and not `exclude` (hf download glob semantics)."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(files, allow_patterns=list(include) or None,
                                    ignore_patterns=list(exclude) or None, key=lambda f: f.path))
