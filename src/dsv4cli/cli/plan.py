"""The `dsv4 plan` command: show (and save) where a model's parts would live on this machine."""

from __future__ import annotations

from pathlib import Path

import typer

from dsv4cli.cli.options import FLAG_NAMES, CpuMemory, Device, GpuMemory, RoutingCounts
from dsv4cli.errors import UsageError, render
from dsv4cli.runtime.resolve import CONFIG_ONLY
from dsv4cli.units import human_bytes


def register(app: typer.Typer) -> None:
    if any(getattr(c, "name", None) == "plan" for c in app.registered_commands):
        return

    @app.command(name="plan")
    def plan(
        model: str = typer.Argument(..., help=f"MODEL: {CONFIG_ONLY} (--profile runs the "
                                                       "model: not a preset)."),
        device: Device = None,
        gpu_memory: GpuMemory = None,
        cpu_memory: CpuMemory = None,
        ctx: int = typer.Option(16384, "--ctx", help="Context size the KV cache must hold."),
        counts: RoutingCounts = None,
        profile: Path | None = typer.Option(None, "--profile",
                                            help="Text file to run through MODEL (a directory) to count routing."),
        save_counts: Path | None = typer.Option(None, "--save-counts", help="Where to write the measured counts."),
        save: Path | None = typer.Option(None, "--save", help="Write the plan as JSON."),
        as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
        simulate: bool = typer.Option(False, "--simulate", help="Plan with host memory standing in for a GPU of "
                                      "--gpu-memory bytes (measure the expert cache without a GPU)."),
        cache_policy: str = typer.Option("mru", "--cache-policy", help="Staging-slot eviction: mru, lru or lfu "
                                         "(prefill cycles through layers: lru evicts what the next pass needs)."),
    ) -> None:
        """Compute where dense weights, KV cache and each routed expert go for given memory budgets."""
        from dsv4cli.runtime.options import PlacementOptions, resolve_plan
        from dsv4cli.runtime.placement import CACHE_POLICIES
        from dsv4cli.runtime.resolve import resolve_model

        args = resolve_model(model, weights=False).args()
        if ctx < 16:
            raise UsageError("--ctx must be at least 16 tokens")
        if cache_policy not in CACHE_POLICIES:
            raise UsageError(f"unknown --cache-policy {cache_policy!r}", f"choose one of: {', '.join(CACHE_POLICIES)}")
        options = PlacementOptions(device=device, gpu_memory=gpu_memory, cpu_memory=cpu_memory, simulate=simulate,
                                   cache_policy=cache_policy)
        result = resolve_plan(args, options, ctx, calculation=True)  # the flags are checked before a --profile run
        routing = _routing_counts(model, counts, profile, save_counts)
        if routing:
            result = resolve_plan(args, options, ctx, routing, calculation=True)
        if save is not None:
            result.save(save)
        if as_json:
            typer.echo(result.to_json())
            return
        _print_plan(model, result)

def _routing_counts(model: str, counts: Path | None, profile: Path | None,
                    save_counts: Path | None) -> dict[int, list[int]] | None:
    from dsv4cli.runtime.profiling import load_counts
    from dsv4cli.runtime.profiling import save_counts as write_counts

    if counts is not None and profile is not None:
        raise UsageError("--counts and --profile are alternatives", "give one of them")
    if counts is not None:
        return load_counts(counts)
    if profile is None:
        return None
    measured = _profile(model, profile)
    if save_counts is not None:
        write_counts(measured, save_counts)
    return measured


def _profile(model: str, text_file: Path) -> dict[int, list[int]]:
    from dsv4cli.runtime.open import open_model
    from dsv4cli.runtime.profiling import count_routes

    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {text_file}: {exc}") from None
    with open_model(model) as opened:  # it runs the model: a directory, `demo` or a downloaded model
        for notice in opened.notices:
            typer.echo(f"dsv4: {render(notice, FLAG_NAMES)}", err=True)
        paragraphs = [opened.tokenizer.encode(p) for p in text.split("\n\n") if p.strip()]
        return count_routes(opened.model, paragraphs)


def _print_plan(model: str, result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"placement plan: {model}", title_justify="left")
    table.add_column("what")
    table.add_column("where")
    table.add_column("bytes", justify="right")
    for what, where, nbytes in result.rows():
        table.add_row(what, where, human_bytes(nbytes))
    console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
