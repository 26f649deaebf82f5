"""The `dsv4 convert` command: flags -> `convert.convert_checkpoint`, with a progress bar on stderr."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import typer

from dsv4cli.errors import UsageError
from dsv4cli.runtime.resolve import WITH_WEIGHTS
from dsv4cli.units import parse_size

TARGET_HELP = ("dsv4: runtime layout, experts packed per layer; fp8-experts: official format, FP4 experts -> FP8 "
               "(lossless); hf-bf16: dequantized BF16 for transformers.")
@contextlib.contextmanager
def progress_bar(enabled: bool, label: str = "converting", unit: str = "bytes",
                 ) -> Iterator[Callable[[int, int], None] | None]:
    """A rich done / total bar on stderr (`unit` "bytes": sizes and rate; else counts of it), labelled
    `label`, or None when disabled (stderr not a terminal). The first update is the starting point: work
    a resumed run finds already done does not count as speed, so the time left is that of what is left."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    amounts = ((DownloadColumn(), TransferSpeedColumn()) if unit == "bytes"
               else (MofNCompleteColumn(), TextColumn(unit)))
    columns = (TextColumn(label), BarColumn(), *amounts, TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)
        started = False

        def update(done: int, total: int) -> None:
            nonlocal started
            if not started:  # the starting point: no speed sample from 0 to what a resumed run found done
                bar.reset(task, total=total, completed=done)
                started = True
            else:
                bar.update(task, completed=done, total=total)

        yield update


def register(app: typer.Typer) -> None:
    """Add the `convert` command to `app` (once)."""
    if any(command.name == "convert" for command in app.registered_commands):
        return

    @app.command(name="convert")
    def convert(
        src: str = typer.Argument(..., metavar="SRC", help=f"Source: {WITH_WEIGHTS}."),
        out: Path = typer.Argument(..., help="Output directory (created atomically)."),
        to: str = typer.Option(..., "--to", help=TARGET_HELP),
        force: bool = typer.Option(False, "--force", help="Replace OUT and discard an interrupted conversion."),
        max_shard_size: str = typer.Option("4GiB", "--max-shard-size", help="Largest output shard, e.g. 4GB."),
    ) -> None:
        """Convert a checkpoint: streaming, restartable (re-run after an interruption), atomic."""
        from dsv4cli.fsutil import check_output_dir
        from dsv4cli.runtime.resolve import resolve_model

        max_bytes = parse_size(max_shard_size)
        source = resolve_model(src).path
        check_output_dir(out.absolute(), [source.absolute()], force)  # bad paths fail before torch loads
        from dsv4cli.io.convert import TARGETS, convert_checkpoint

        if to not in TARGETS:
            raise UsageError(f"unknown --to {to!r}", f"choose one of: {', '.join(TARGETS)}")
        with progress_bar(sys.stderr.isatty()) as update:
            path = convert_checkpoint(source, out, to, max_shard_bytes=max_bytes, force=force, progress=update)
        from dsv4cli.hub.registry import record_output

        warning = record_output(path, f"dsv4 convert --to {to}", str(source))
        if warning:
            typer.echo(f"warning: {warning}", err=True)
        typer.echo(str(path))
