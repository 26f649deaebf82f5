"""The errors of downloading, listing and removing models, and file-system errors put in one line.

Failures a user can act on (network, disk, permissions, damaged files) are `DsvError`s, never tracebacks.
`Incomplete` and `GaveUp` never leave the hub package: a transfer raises them, the retry logic reads them.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from dsv4cli.errors import DsvError


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


class Incomplete(Exception):
    """An answer ended before all the bytes it announced (worth a retry that resumes)."""


class GaveUp(Exception):
    """A request failed for good: `error` is its last failure, `why` says why retrying stopped ("" if the error
    was not worth a retry)."""

    def __init__(self, error: BaseException, why: str = ""):
        super().__init__(str(error))
        self.error, self.why = error, why


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextmanager
def os_errors(hint: str) -> Iterator[None]:
    """Turn an OSError escaping the body (or the decorated function) into a one-line DsvError."""
    try:
        yield
    except OSError as err:
        raise os_error(err, hint) from None


def os_error(err: OSError, hint: str) -> DsvError:
    """A file-system error in words: permission denied, disk full, or the system's own reason."""
    where = err.filename or "a file"
    if is_disk_full(err):
        return DiskSpaceError(f"disk full while writing {where}", hint)
    if isinstance(err, PermissionError):
        return DownloadError(f"permission denied: {where}", hint)
    if err.errno is None:  # an HTTP library error: no file involved
        return DownloadError(first_line(err), hint)
    return DownloadError(f"{where}: {(err.strerror or first_line(err)).lower()}", hint)


def is_disk_full(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
