"""The downloads on this machine: list them (`dsv4 list`), find one by name or path, remove one (`dsv4 rm`).

Removing deletes only what dsv4 wrote: the files the manifest lists and `.dsv4/`, then the directories left empty;
never while a download holds the lock, never through a symlink, never outside the directory. A download whose
manifest is damaged is still listed (as damaged); removing it deletes only `.dsv4/`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv4cli.errors import DsvError, ModelNotFound, UsageError
from dsv4cli.hub.errors import DownloadBusy, ManifestError, NotRemovable, first_line, os_errors
from dsv4cli.hub.layout import (
    ALIASES,
    INCOMPLETE_DIR,
    PART_SUFFIX,
    STATE_DIR,
    download_lock,
    guess_repo_id,
    models_dir,
    read_manifest,
    registered_dirs,
    size_or_zero,
    state_dir,
    unregister_dir,
)
from dsv4cli.hub.verify import size_matches

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
        return _damaged(local_dir, (err.strerror or first_line(err)).lower())
    if manifest is None:
        return _damaged(local_dir, "no manifest (its first download stopped early)")
    present = [f for f in manifest.files.values() if size_matches(local_dir / f.path, f)]
    partial = sum(size_or_zero(p) for p in _files_under(state_dir(local_dir) / INCOMPLETE_DIR)
                  if p.name.endswith(PART_SUFFIX))
    return LocalModel(manifest.repo_id, manifest.revision, manifest.commit, local_dir, len(manifest.files),
                      len(present), sum(f.size for f in present), sum(f.size for f in manifest.files.values()),
                      partial)


def _damaged(local_dir: Path, reason: str) -> LocalModel:
    size = sum(size_or_zero(p) for p in _files_under(local_dir) if STATE_DIR not in p.relative_to(local_dir).parts)
    return LocalModel(guess_repo_id(local_dir), "", "", local_dir, 0, 0, size, 0, 0, reason)


def _files_under(directory: Path) -> list[Path]:
    """The files and symlinks below `directory` (symlinks are not followed), sorted; [] if it does not exist."""
    found: list[Path] = []
    for root, dirs, files in os.walk(directory):
        base = Path(root)
        found += [base / name for name in files]
        found += [base / name for name in dirs if (base / name).is_symlink()]
    return sorted(found)


@os_errors(_FIX_HINT)
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


@os_errors(_FIX_HINT)
def remove_local_model(model: LocalModel) -> Removal:
    """Delete what dsv4 wrote for a download: the files its manifest lists, then `.dsv4/`, then the directories
    that leaves empty (the download dir too). Everything else stays, and is returned.

    Refused while a download holds the lock (nothing is deleted then), for a symlinked directory, and for a
    directory dsv4 neither registered nor made in its models dir. A listed path is deleted only if it is a
    regular file reached without a symlink. With a damaged manifest only `.dsv4/` goes.
    """
    local_dir = model.path
    _check_removable(local_dir)
    with download_lock(local_dir, functools.partial(_download_running, model.repo_id)):
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
