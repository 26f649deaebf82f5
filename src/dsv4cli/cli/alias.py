"""`dsv4 alias set|rm|list`: user names for models (hub/registry.py), taken by every MODEL argument.

Call `register(app)` to add the command group to the dsv4 typer app (idempotent).
"""

from __future__ import annotations

import typer

ALIAS_HELP = "\n\n".join([
    "Name models: `dsv4 alias set q3 ~/models/flash-q3`, then `dsv4 chat q3`.",
    "An alias stands for a checkpoint directory, a downloaded model's name or `demo`, wherever a MODEL is "
    "given. A directory or file of that name in the current directory still wins.",
])

alias_app = typer.Typer(help=ALIAS_HELP, no_args_is_help=True)


@alias_app.command("set")
def set_command(
    name: str = typer.Argument(..., help="The alias."),
    model: str = typer.Argument(..., help="What it stands for: a checkpoint directory, a downloaded model, `demo`."),
) -> None:
    """Make NAME stand for MODEL (replacing what it stood for)."""
    from dsv4cli.hub.registry import set_alias
    from dsv4cli.runtime.resolve import DIRECTORY, resolve_model

    ref = resolve_model(model, weights=True, aliases=False)  # a typo fails now, not at the next chat
    target = str(ref.path.absolute()) if ref.kind == DIRECTORY else model
    set_alias(name, target)
    typer.echo(f"{name} -> {target}")


@alias_app.command("rm")
def rm_command(name: str = typer.Argument(..., help="The alias to remove.")) -> None:
    """Remove an alias (the model it named is not touched)."""
    from dsv4cli.hub.registry import remove_alias

    remove_alias(name)
    typer.echo(f"removed the alias {name}")


@alias_app.command("list")
def list_command() -> None:
    """The aliases and what they stand for."""
    from dsv4cli.hub.registry import aliases

    names = aliases()
    if not names:
        typer.echo("no aliases (dsv4 alias set NAME MODEL makes one)", err=True)
    width = max((len(n) for n in names), default=0)
    for name, target in names.items():
        typer.echo(f"{name:<{width}}  {target}")


def register(app: typer.Typer) -> None:
    """Add the `alias` group to `app` (once)."""
    if not any(group.name == "alias" for group in app.registered_groups):
        app.add_typer(alias_app, name="alias")
