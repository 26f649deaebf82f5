"""`dsv4 info` (what a model is: layer schedule, parameters, bytes, per-token costs) and `dsv4 synth`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dsv4cli.runtime.resolve import CONFIG_ONLY, resolve_model


def register(app: typer.Typer) -> None:
    """Add the `info` and `synth` commands to `app`."""
    app.command(name="info")(info)
    app.command(name="synth")(synth)


def _args_of(model: str):
    """The configuration MODEL names (see `runtime.resolve`): a download wins over a preset."""
    return resolve_model(model, weights=False).args()


def info(
    model: str = typer.Argument(..., help=f"MODEL: {CONFIG_ONLY}."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Describe a model: layer schedule, parameter counts, bytes on disk, per-token costs."""
    from dsv4cli.io.describe import summarize
    from dsv4cli.ui.info import render_summary

    ref = resolve_model(model, weights=False)
    summary = summarize(ref.args())
    if as_json:
        source = {"source": ref.kind, "path": str(ref.path) if ref.path is not None else None}
        typer.echo(json.dumps({"model": model, **source, **summary.to_dict()}, indent=2))
    else:
        render_summary(ref.describe(), summary)


def synth(
    preset: str = typer.Argument(..., metavar="MODEL", help=f"Whose configuration to fill with random weights: "
                                                            f"{CONFIG_ONLY}."),
    out: Path = typer.Argument(..., help="Output directory (created atomically)."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives byte-identical files."),
    layers: int | None = typer.Option(None, help="Override the number of layers (schedule is cut to fit)."),
    experts: int | None = typer.Option(None, help="Override the number of routed experts."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Write a random checkpoint in the exact official on-disk format (for tests and benchmarks)."""
    from dsv4cli.io.writer import write_random_checkpoint
    from dsv4cli.model.presets import shrink

    args = shrink(_args_of(preset), layers, experts)
    path = write_random_checkpoint(args, out, seed=seed, overwrite=force)
    typer.echo(f"random weights for tests and benchmarks (`dsv4 bench {path}`, `dsv4 info {path}`); "
               "no tokenizer: they do not chat", err=True)
    typer.echo(str(path))
