"""The `dsv4 convert` command: flags -> `convert.convert_checkpoint`, with a progress bar on stderr."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import typer

from dsv4cli.errors import UsageError

TARGET_HELP = ("dsv4: runtime layout, experts packed per layer; fp8-experts: official format, FP4 experts -> FP8 "
               "(lossless); hf-bf16: dequantized BF16 for transformers.")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """'4GB' (10**9), '4GiB' (2**30), '500MB', '1048576' -> bytes."""
    match = _SIZE_RE.match(text)
    unit = match[2].upper() if match else ""
    if match is None or unit not in _UNITS:
        raise UsageError(f"invalid size {text!r}", "use e.g. 4GB, 500MB, 4GiB or a number of bytes")
    size = int(float(match[1]) * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"invalid size {text!r}", "the size must be positive")
    return size


@contextlib.contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich bytes-done / total bar on stderr, or None when disabled (stderr not a terminal)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("converting"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("convert", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def register(app: typer.Typer) -> None:
    """Add the `convert` command to `app` (once)."""
    if any(command.name == "convert" for command in app.registered_commands):
        return

    @app.command(name="convert")
    def convert(
        src: Path = typer.Argument(..., help="Source checkpoint directory (official or dsv4 layout)."),
        out: Path = typer.Argument(..., help="Output directory (created atomically)."),
        to: str = typer.Option(..., "--to", help=TARGET_HELP),
        force: bool = typer.Option(False, "--force", help="Replace OUT and discard an interrupted conversion."),
        max_shard_size: str = typer.Option("4GiB", "--max-shard-size", help="Largest output shard, e.g. 4GB."),
    ) -> None:
        """Convert a checkpoint: streaming, restartable (re-run after an interruption), atomic."""
        from dsv4cli.convert import TARGETS, convert_checkpoint

        if to not in TARGETS:
            raise UsageError(f"unknown --to {to!r}", f"choose one of: {', '.join(TARGETS)}")
        max_bytes = parse_size(max_shard_size)
        with progress_bar(sys.stderr.isatty()) as update:
            path = convert_checkpoint(src, out, to, max_shard_bytes=max_bytes, force=force, progress=update)
        typer.echo(str(path))
