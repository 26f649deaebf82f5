"""Where and how a downloaded model is kept on disk: names, paths, the manifest, the lock, the registry.

Layout of a downloaded model (`<data>/models/<owner>--<name>` unless `--local-dir`)::

    config.json, model-0000i-of-0000K.safetensors, ...   the repository files, at their repo paths
    .dsv4/manifest.json          what the hub listed at download time: path -> size, sha256 (LFS) or git blob id,
                                 plus the files already verified (size + mtime + digest, so re-runs skip re-hashing)
    .dsv4/incomplete/<path>.part bytes of a file still being downloaded (kept across runs, resumed with HTTP Range)
    .dsv4/lock                   held (flock) by the process downloading into, or removing, the directory; its pid

`<data>/local-models.json` lists the download directories outside the models dir, so that `dsv4 list` finds them.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv4cli import fsutil
from dsv4cli.errors import DsvError, UsageError
from dsv4cli.fsutil import atomic_write_text, file_lock
from dsv4cli.hub.errors import DownloadError, ManifestError, first_line
from dsv4cli.paths import data_dir

ALIASES = {
    "flash": "deepseek-ai/DeepSeek-V4-Flash",
    "pro": "deepseek-ai/DeepSeek-V4-Pro",
    "flash-base": "deepseek-ai/DeepSeek-V4-Flash-Base",
    "pro-base": "deepseek-ai/DeepSeek-V4-Pro-Base",
}
STATE_DIR = ".dsv4"
MANIFEST_NAME = "manifest.json"
INCOMPLETE_DIR = "incomplete"
PART_SUFFIX = ".part"
LOCK_NAME = "lock"
REGISTRY_NAME = "local-models.json"
#: Test-only: pretend the target filesystem has this many free bytes.
FAKE_FREE_ENV = "DSV4_FAKE_FREE_BYTES"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


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


def guess_repo_id(local_dir: Path) -> str:
    """`owner/name` from a default directory name (`owner--name`); "(unknown)" for any other name."""
    guess = local_dir.name.replace("--", "/", 1)
    return guess if "--" in local_dir.name and _REPO_ID.match(guess) else "(unknown)"


def state_dir(local_dir: Path) -> Path:
    return local_dir / STATE_DIR


def part_path(local_dir: Path, path: str) -> Path:
    return state_dir(local_dir) / INCOMPLETE_DIR / (path + PART_SUFFIX)


def size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def free_bytes(local_dir: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) `local_dir`."""
    fake = os.environ.get(FAKE_FREE_ENV)
    if fake:
        return int(fake)
    return fsutil.free_bytes(local_dir)


# ======================================================================= manifest


@dataclass(frozen=True)
class RemoteFile:
    """One repository file as the hub lists it (and as the manifest records it)."""

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


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write `path` whole or not at all: a temp file, flushed to disk, renamed over it (so a crash or a full disk
    never leaves a truncated manifest behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1))


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
        reason = (err.strerror or first_line(err)).lower()
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


# ======================================================================= lock


@contextmanager
def download_lock(local_dir: Path, busy: Callable[[str], DsvError] | None = None) -> Iterator[None]:
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
