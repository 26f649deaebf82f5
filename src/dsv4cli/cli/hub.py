"""`dsv4 download`, `dsv4 list`, `dsv4 rm`: thin typer commands over `dsv4cli.hub` (download, local).

Output rules:

* stdout carries results only: the local path (last line) after `download`, the file table of
  `download --dry-run`, the table or JSON of `list`. Everything else goes to stderr.
* Progress: on a terminal, one aggregate rich bar on stderr (bytes, rate, ETA) for all files;
  when stderr is not a terminal, one short line per finished file instead (`fetched PATH (SIZE)`).

Call `register(app)` to add the commands to the dsv4 typer app (idempotent).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

DOWNLOAD_HELP = "\n\n".join([
    "Download a DeepSeek-V4 model from the Hugging Face Hub (resumable, verified).",
    "MODEL is an alias (flash, pro, flash-base, pro-base) or an owner/name repo id. Files go to "
    "$XDG_DATA_HOME/dsv4/models/OWNER--NAME unless --local-dir is given; the path is printed last on stdout.",
    "Finished files are skipped; a partial file resumes where it stopped (HTTP Range); every file is checked "
    "(size, SHA-256 for LFS files) before it gets its final name.",
    "Honours HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE=1 (then only the local copy is checked). A hub that does "
    "not answer within DSV4_HUB_TIMEOUT seconds (default 30), drops the connection or answers 429/5xx is asked "
    "again, DSV4_HUB_RETRIES times (default 5), waiting longer each time.",
])


class LineReporter:
    """Progress for a non-terminal stderr: one line per finished file."""

    def start(self, total_bytes: int, done_bytes: int, files: int) -> None:
        from dsv4cli.units import human_bytes

        resumed = f" ({human_bytes(done_bytes)} already here)" if done_bytes else ""
        typer.echo(f"downloading {_files(files)}, {human_bytes(total_bytes)}{resumed}", err=True)

    def advance(self, done_bytes: int) -> None:
        return None

    def file_done(self, path: str, size: int) -> None:
        from dsv4cli.units import human_bytes

        typer.echo(f"fetched {path} ({human_bytes(size)})", err=True)

    def note(self, message: str) -> None:
        typer.echo(message, err=True)

    def close(self) -> None:
        return None


class RichReporter:
    """Progress for a terminal: a single aggregate bar on stderr (bytes, rate, ETA)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.progress: Any = None
        self.task: Any = None
        self.files = self.files_done = 0

    def start(self, total_bytes: int, done_bytes: int, files: int) -> None:
        from rich import progress as rp

        self.files = files
        self.progress = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.DownloadColumn(),
                                    rp.TransferSpeedColumn(), rp.TimeRemainingColumn(), console=self.console)
        self.progress.start()
        self.task = self.progress.add_task(self._description(), total=total_bytes, completed=done_bytes)

    def _description(self) -> str:
        return f"{self.files_done}/{self.files} files"

    def advance(self, done_bytes: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done_bytes)

    def file_done(self, path: str, size: int) -> None:
        self.files_done += 1
        if self.progress is not None:
            self.progress.update(self.task, description=self._description())

    def note(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


def make_reporter() -> LineReporter | RichReporter:
    return RichReporter() if sys.stderr.isatty() else LineReporter()


def download_command(
    model: str = typer.Argument(..., help="Alias (flash, pro, flash-base, pro-base) or owner/name repo id."),
    revision: str | None = typer.Option(None, "--revision", help="Branch, tag or commit id (default: main)."),
    include: list[str] | None = typer.Option(None, "--include", help="Only files matching this glob (repeatable)."),
    exclude: list[str] | None = typer.Option(None, "--exclude", help="Skip files matching this glob (repeatable)."),
    local_dir: Path | None = typer.Option(None, "--local-dir",
                                          help="Target directory (default: $XDG_DATA_HOME/dsv4/models/OWNER--NAME)."),
    max_workers: int = typer.Option(8, "--max-workers", help="Files downloaded in parallel."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List files, sizes and the total; download nothing."),
    force: bool = typer.Option(False, "--force", help="Download every selected file again."),
) -> None:
    from dsv4cli.hub.download import DownloadRequest, download

    request = DownloadRequest(repo=model, revision=revision, include=tuple(include or ()),
                              exclude=tuple(exclude or ()), local_dir=local_dir, max_workers=max_workers, force=force)
    if dry_run:
        _print_dry_run(request)
        return
    result = download(request, make_reporter())
    typer.echo(str(result.local_dir))


def _print_dry_run(request: Any) -> None:
    """The file table (size, action, path) and a total line on stdout; nothing is written."""
    from dsv4cli.hub.download import check_disk_space, make_plan
    from dsv4cli.hub.errors import DiskSpaceError
    from dsv4cli.units import human_bytes

    plan = make_plan(request, check_existing=False, note=lambda message: typer.echo(message, err=True))
    width = max(len(human_bytes(item.file.size)) for item in plan.items)
    for item in plan.items:
        action = f"resume ({human_bytes(item.have_bytes)} here)" if item.action == "resume" else item.action
        typer.echo(f"{human_bytes(item.file.size):>{width}}  {action:<8}  {item.file.path}")
    fetch = plan.to_fetch
    typer.echo(f"total: {_files(len(plan.items))}, {human_bytes(plan.total_bytes)}; to download: "
               f"{_files(len(fetch))}, {human_bytes(plan.needed_bytes)} -> {plan.local_dir} "
               f"({plan.repo_id} @ {plan.commit[:12]})")
    try:
        check_disk_space(plan)
    except DiskSpaceError as err:
        typer.echo(f"warning: {err.message}", err=True)


def list_command(as_json: bool = typer.Option(False, "--json", help="Print a JSON array.")) -> None:
    from dsv4cli.hub.layout import models_dir
    from dsv4cli.hub.local import list_local_models
    from dsv4cli.hub.registry import aliases, outputs

    models = list_local_models()
    made, names = outputs(), aliases()
    if as_json:
        typer.echo(json.dumps([m.to_dict() for m in models], indent=2))
        return
    if not models:
        typer.echo(f"no downloaded models (dsv4 download MODEL puts them in {models_dir()})", err=True)
    else:
        _table([("NAME", "REVISION", "FILES", "SIZE", "STATUS", "PATH"), *(_list_row(m) for m in models)])
    if made:
        typer.echo("\nmade here (dsv4 quantize, dsv4 convert):")
        _table([("MADE BY", "SOURCE", "DATE", "PATH"),
                *((o["made_by"], o["source"], o["date"][:16].replace("T", " "), o["path"]) for o in made)])
    if names:
        typer.echo("\naliases (dsv4 alias):")
        _table([("ALIAS", "MODEL"), *names.items()])


def _table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last one as it is."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        typer.echo("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]))


def _list_row(model: Any) -> tuple[str, ...]:
    from dsv4cli.units import human_bytes

    if model.damaged:
        return (model.repo_id, "-", "-", human_bytes(model.bytes_present), f"damaged: {model.damaged}",
                str(model.path))
    status = "complete" if model.complete else f"incomplete ({model.files - model.files_present} missing)"
    if model.partial_bytes:
        status += f", {human_bytes(model.partial_bytes)} partial"
    return (model.repo_id, f"{model.revision}@{model.commit[:7]}", f"{model.files_present}/{model.files}",
            human_bytes(model.bytes_present), status, str(model.path))


def rm_command(
    name: str = typer.Argument(..., help="Alias, repo id or path, as `dsv4 list` shows it."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    from dsv4cli.errors import DsvError
    from dsv4cli.hub.local import find_local_model, remove_local_model
    from dsv4cli.units import human_bytes

    model = find_local_model(name)
    what = f"damaged: {model.damaged}" if model.damaged else human_bytes(model.bytes_present)
    if not yes and not _confirm(f"remove {model.repo_id} ({what}) at {model.path}?"):
        raise DsvError("nothing removed", "answer y to remove it, or pass --yes")
    removal = remove_local_model(model)
    if removal.damaged and removal.kept:
        typer.echo(f"the download manifest of {model.path} was unusable ({removal.damaged}), so dsv4 cannot tell "
                   f"its files from yours: removed only its .dsv4 state and kept {_files(len(removal.kept))} "
                   f"({_some(removal.kept, model.path)}); delete them yourself if you do not need them", err=True)
    elif removal.kept:
        typer.echo(f"kept {len(removal.kept)} files in {model.path} that dsv4 did not download: "
                   f"{_some(removal.kept, model.path)}", err=True)
    typer.echo(f"removed {model.path}")


def _some(paths: list[Path], root: Path, shown: int = 5) -> str:
    """A few paths, relative to `root`, for a one-line message."""
    names = [str(path.relative_to(root)) for path in paths[:shown]]
    return ", ".join(names) + (f", and {len(paths) - shown} more" if len(paths) > shown else "")


def _confirm(question: str) -> bool:
    """Ask on stderr, read one line from stdin (a pipe works too); only y/yes confirms."""
    typer.echo(f"{question} [y/N] ", err=True, nl=False)
    answer = sys.stdin.readline()
    if not answer.endswith("\n"):
        typer.echo("", err=True)
    return answer.strip().lower() in ("y", "yes")


COMMANDS = {"download": (download_command, DOWNLOAD_HELP),
            "list": (list_command, "List downloaded models (size, files, complete, incomplete or damaged, revision, "
                                   "path), then the checkpoints dsv4 quantize and dsv4 convert made, then the "
                                   "aliases (--json: the downloads)."),
            "rm": (rm_command, "Remove a downloaded model: the files dsv4 downloaded and its .dsv4 state; other files "
                               "stay, and a running download is never touched (asks first; --yes to skip).")}


def register(app: typer.Typer) -> typer.Typer:
    """Add download, list and rm to `app` (skipping any it already has); returns `app`."""
    present = {info.name or (info.callback.__name__.replace("_", "-") if info.callback else "")
               for info in app.registered_commands}
    for name, (callback, help_text) in COMMANDS.items():
        if name not in present:
            app.command(name, help=help_text)(callback)
    return app
