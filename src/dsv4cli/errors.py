"""The exceptions dsv4 raises for problems a user can fix.

Each carries a one-line message (what happened) and a hint (how to fix it);
the CLI prints both on one line and exits with `exit_code`. One rule for every command:
2 when the command line itself cannot work (a bad flag or value, a model or path that does not
exist, an output that exists or overlaps the source), 1 for a problem met while working (a corrupt
or unreadable file, a full disk, out of memory, a failed download).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: a setting named in a message, `{opt:ctx}`: each front end renders it (the CLI as --ctx, a server as its field)
_OPTION = re.compile(r"\{opt:([a-z][a-z0-9_]*)\}")


def option(name: str) -> str:
    """The placeholder for setting `name` in a message or hint ("raise {ctx}"); library code names
    settings this way instead of spelling a front end's flag."""
    return "{opt:" + name + "}"


def render(text: str, names: Mapping[str, str] | None = None) -> str:
    """`text` with every `{opt:setting}` placeholder replaced by its name in `names` (else the setting's own name)."""
    return _OPTION.sub(lambda m: (names or {}).get(m[1], m[1]), text)


class DsvError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = 1

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self, names: Mapping[str, str] | None = None) -> str:
        """Message and hint on one line, settings rendered with `names` (a front end's flags)."""
        text = f"{self.message} ({self.hint})" if self.hint else self.message
        return render(text, names)


class UsageError(DsvError):
    """Bad flags or arguments."""

    exit_code = 2


class ConfigError(DsvError):
    """config.json is missing, malformed or inconsistent."""


class CheckpointError(DsvError):
    """A checkpoint file is missing, truncated, corrupt, or does not match the config."""


class ModelNotFound(UsageError):
    """No model at the given path or name (a usage error: the argument names nothing)."""


class OutOfMemory(DsvError):
    """Not enough host or device memory for what was asked."""


class UnsupportedDevice(DsvError):
    """The requested device or GPU cannot run dsv4."""
