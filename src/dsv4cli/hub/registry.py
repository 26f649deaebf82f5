"""The local registry beside the downloads: user aliases for models, and the checkpoints dsv4 made.

One JSON file, `$XDG_DATA_HOME/dsv4/registry.json`, changed under a file lock and replaced atomically:
* `aliases`: NAME -> MODEL (a directory, a downloaded name or `demo`), as `llm aliases` and `ollama cp`
  give; every MODEL argument takes an alias (runtime/resolve.py);
* `outputs`: the directories `dsv4 quantize` and `dsv4 convert` wrote, with what made them, so that
  `dsv4 list` shows them beside the downloads.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any

from dsv4cli import paths
from dsv4cli.errors import DsvError, UsageError
from dsv4cli.fsutil import file_lock, write_json

_ALIAS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
#: names an alias may not take: they already mean something everywhere a MODEL is given
RESERVED = ("demo", "last")


def registry_file() -> Path:
    return paths.data_dir() / "registry.json"


def _read() -> dict[str, Any]:
    try:
        data = json.loads(registry_file().read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"aliases": {}, "outputs": []}
    except (OSError, ValueError) as exc:
        raise UsageError(f"the registry {registry_file()} is unreadable: {exc}",
                         "fix or delete it (it holds only aliases and the list of made checkpoints)") from None
    aliases = data.get("aliases") if isinstance(data, dict) else None
    outputs = data.get("outputs") if isinstance(data, dict) else None
    return {"aliases": {k: v for k, v in (aliases or {}).items() if isinstance(k, str) and isinstance(v, str)},
            "outputs": [o for o in (outputs or []) if isinstance(o, dict) and isinstance(o.get("path"), str)]}


def _update(change) -> dict[str, Any]:
    """Apply `change(data)` to the registry under its lock; returns the new contents."""
    folder = paths.data_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / "registry.lock", wait=True):
        data = _read()
        change(data)
        write_json(registry_file(), data, sort_keys=True)
    return data


def aliases() -> dict[str, str]:
    return dict(sorted(_read()["aliases"].items()))


def alias_target(name: str) -> str | None:
    return _read()["aliases"].get(name)


def set_alias(name: str, target: str) -> None:
    """Make `name` stand for `target` (a MODEL the caller has checked resolves; a path given absolute)."""
    if not _ALIAS_NAME.fullmatch(name) or name in RESERVED:
        raise UsageError(f"{name!r} cannot be an alias",
                         "use letters, digits and . _ + - (up to 64), not demo or last")
    _update(lambda data: data["aliases"].__setitem__(name, target))


def remove_alias(name: str) -> None:
    if name not in _read()["aliases"]:
        raise UsageError(f"no alias {name!r}", "`dsv4 alias list` shows them")
    _update(lambda data: data["aliases"].pop(name, None))


def record_output(path: Path, made_by: str, source: str) -> str | None:
    """Remember a checkpoint dsv4 wrote (the newest record of a path replaces older ones). The checkpoint
    stands without it: a registry that cannot be written is returned as a warning, not raised."""
    entry = {"path": str(Path(path).absolute()), "made_by": made_by, "source": source,
             "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}

    def change(data: dict[str, Any]) -> None:
        data["outputs"] = [o for o in data["outputs"] if o["path"] != entry["path"]] + [entry]

    try:
        _update(change)
    except (OSError, DsvError) as err:
        detail = err.message if isinstance(err, DsvError) else str(err)
        return f"{path} is written, but `dsv4 list` will not show it: {detail}"
    return None


def outputs() -> list[dict[str, Any]]:
    """The recorded checkpoints that still exist, newest first."""
    return [o for o in reversed(_read()["outputs"]) if Path(o["path"]).is_dir()]
