"""The `dsv4` command line: parses flags, calls one service function per command, maps errors to exit codes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from dsv4cli import __version__
from dsv4cli.errors import DsvError, UsageError

# typer may vendor its own click: take the exception classes from typer itself.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

app = typer.Typer(
    name="dsv4",
    help="Run DeepSeek-V4 (Flash, Pro) locally on one machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsv4 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """dsv4: a local runner for DeepSeek-V4."""


def resolve_args(model: str):
    """A model directory (its config.json), a config file, or a preset name -> ModelArgs."""
    from dsv4cli.model.args import ModelArgs
    from dsv4cli.presets import PRESETS, get_preset

    path = Path(model)
    if path.exists():
        return ModelArgs.from_file(path)
    if model in PRESETS:
        return get_preset(model)
    raise UsageError(f"{model!r} is neither a model directory, a config file nor a preset",
                     f"presets: {', '.join(PRESETS)}")


@app.command()
def info(
    model: str = typer.Argument(..., help="Model directory, config.json, or preset (flash, pro, tiny, ...)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Describe a model: layer schedule, parameter counts, bytes on disk, per-token costs."""
    from dsv4cli.describe import summarize
    from dsv4cli.render_info import render_summary

    summary = summarize(resolve_args(model))
    if as_json:
        typer.echo(json.dumps({"model": model, **summary.to_dict()}, indent=2))
    else:
        render_summary(model, summary)


@app.command()
def synth(
    preset: str = typer.Argument(..., help="Preset to generate (tiny, tiny-mix, flash-slice, pro-slice, ...)."),
    out: Path = typer.Argument(..., help="Output directory (created atomically)."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives byte-identical files."),
    layers: int | None = typer.Option(None, help="Override the number of layers (schedule is cut to fit)."),
    experts: int | None = typer.Option(None, help="Override the number of routed experts."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Write a random checkpoint in the exact official on-disk format (for tests and benchmarks)."""
    from dsv4cli.io.writer import write_random_checkpoint

    args = resolve_args(preset)
    if layers is not None:
        if layers < 1:
            raise UsageError("--layers must be at least 1")
        ratios = (*args.compress_ratios[:layers], *args.compress_ratios[args.n_layers:])
        if len(ratios) < layers + args.n_mtp_layers:
            raise UsageError(f"--layers {layers} exceeds the preset's {args.n_layers} layers")
        args = args.replace(n_layers=layers, compress_ratios=ratios, n_hash_layers=min(args.n_hash_layers, layers))
    if experts is not None:
        if experts < args.n_activated_experts:
            raise UsageError(f"--experts must be at least {args.n_activated_experts}")
        args = args.replace(n_routed_experts=experts)
    path = write_random_checkpoint(args, out, seed=seed, overwrite=force)
    typer.echo(str(path))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; turn known failures into one line on stderr and an exit code."""
    try:
        app(args=argv, standalone_mode=False)
    except DsvError as err:
        _fail(err.one_line(), err.exit_code)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        _fail("interrupted", 130)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    except MemoryError:
        _fail("out of memory", 1, "use a smaller model, fewer layers, or more swap")


def _fail(message: str, code: int, hint: str = "") -> None:
    text = f"{message} ({hint})" if hint else message
    print(f"dsv4: error: {text}", file=sys.stderr)
    sys.exit(code)
