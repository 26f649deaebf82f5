"""One file from the hub into its `.part`: HTTP Range from where it stopped, retried, then verified.

* Files are fetched from `/{repo}/resolve/{commit}/{path}` through huggingface_hub's HTTP session and headers,
  so `HF_ENDPOINT`, `HF_TOKEN` and the hub's redirects behave as with `hf download`.
* A partial file continues where it stopped with an HTTP `Range` request (if the server ignores Range, that file
  restarts from zero). A `.part` file always holds an exact prefix of the file: a failed write (disk full) cuts
  it back to the last whole write. A `.part` whose size or digest is wrong is deleted.

Plain HTTP is used even where `hf_xet` is installed: xet cannot resume a partial file, plain HTTP can.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, BinaryIO

from dsv4cli import __version__
from dsv4cli.errors import DsvError
from dsv4cli.hub.errors import (
    DiskSpaceError,
    DownloadCancelled,
    DownloadError,
    GaveUp,
    Incomplete,
    VerificationError,
    first_line,
    is_disk_full,
)
from dsv4cli.hub.layout import RemoteFile, free_bytes, part_path, size_or_zero
from dsv4cli.hub.progress import FileBar, Progress
from dsv4cli.hub.remote import Backoff, describe, hub_endpoint, hub_timeout
from dsv4cli.hub.verify import verify_file
from dsv4cli.units import human_bytes


def download_and_verify(repo_id: str, commit: str, local_dir: Path, file: RemoteFile, progress: Progress
                        ) -> dict[str, Any]:
    """Complete the `.part` of `file` and check it; a part that fails the check is deleted."""
    part = part_path(local_dir, file.path)
    try:
        _http_download(repo_id, commit, local_dir, file, progress)
        return verify_file(part, file)
    except VerificationError:
        _unlink_quietly(part)
        raise


def _unlink_quietly(path: Path) -> None:
    """Delete `path` if possible; used while another error is on its way out, which must stay the one raised."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _http_download(repo_id: str, commit: str, local_dir: Path, file: RemoteFile, progress: Progress) -> None:
    """Append the missing bytes of `file` to its `.part` (HTTP Range from its current size), retrying transient
    failures with backoff; each retry resumes where the last attempt stopped."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    part = part_path(local_dir, file.path)
    url = hf_hub_url(repo_id, file.path, revision=commit, endpoint=hub_endpoint())
    headers = build_hf_headers(library_name="dsv4", library_version=__version__)
    timeout = hub_timeout()
    backoff = Backoff(file.path, progress.reporter.note, timeout, progress.cancel)
    while True:
        before = size_or_zero(part)
        try:
            _transfer(url, headers, timeout, local_dir, file, progress)
            return
        except (DsvError, DownloadCancelled):
            raise
        except Exception as err:
            try:
                backoff.wait(err, progressed=size_or_zero(part) > before)
            except GaveUp as gave_up:
                raise _transfer_error(gave_up, part, file, timeout) from None


def _transfer(url: str, headers: dict[str, str], timeout: float, local_dir: Path, file: RemoteFile,
              progress: Progress) -> None:
    """One GET of the bytes still missing from the `.part` of `file`, appended as they arrive."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session, hf_raise_for_status

    part = part_path(local_dir, file.path)
    try:
        opened = part.open("ab", buffering=0)
    except OSError as err:
        raise _write_error(err, local_dir, file, size_or_zero(part)) from None
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
            bar = FileBar(progress=progress, path=file.path, resume_from=kept, initial=offset)
            for chunk in response.iter_bytes(constants.DOWNLOAD_CHUNK_SIZE):
                offset = _append(fh, chunk, offset, local_dir, file)
                bar.update(len(chunk))
    if offset < file.size:
        raise Incomplete(f"the answer ended after {offset} of {file.size} bytes")


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
    if is_disk_full(err):
        free = human_bytes(_free_or_zero(local_dir))
        return DiskSpaceError(f"disk full while writing {file.path}: {free} free in {local_dir}",
                              f"free some space or choose another {{opt:local_dir}}, then {resume}")
    reason = (err.strerror or first_line(err)).lower()
    return DownloadError(f"cannot write {part_path(local_dir, file.path)}: {reason}",
                         f"fix the permissions or choose another {{opt:local_dir}}, then {resume}")


def _free_or_zero(local_dir: Path) -> int:
    try:
        return free_bytes(local_dir)
    except (OSError, ValueError):
        return 0


def _transfer_error(gave_up: GaveUp, part: Path, file: RemoteFile, timeout: float) -> DownloadError:
    """The one-line error for a file that could not be fetched; says how much of it is kept for the next run."""
    kept = size_or_zero(part)
    if kept > file.size:
        _unlink_quietly(part)
        kept = 0
    why = f"; {gave_up.why}" if gave_up.why else ""
    return DownloadError(f"{file.path}: download failed: {describe(gave_up.error, timeout)}{why}",
                         f"run the same command again to resume ({human_bytes(kept)} of "
                         f"{human_bytes(file.size)} kept)")
