"""How `--help` shows the options: click's conventions, not typer's type placeholders.

typer labels every option with its Python type (`<bool>` beside a plain flag, `<list[str]>` beside a
repeatable option) and writes required arguments as `{model}`. `tidy(command)` walks the click command
tree once, before it runs: flags get no value label, repeatable options read `<str>...`, and arguments
are `MODEL` when required and `[MODEL]` when not. (Defaults: typer shows each non-None default; options
whose default is None say in their help what happens without them.)
"""

from __future__ import annotations

import re
from typing import Any


def _is_group(command: Any) -> bool:
    return isinstance(getattr(command, "commands", None), dict)


def tidy(command: Any) -> Any:
    """Tidy the help of `command` and all its subcommands in place; returns it."""
    for param in getattr(command, "params", []):
        if param.param_type_name == "argument":
            param.metavar = name = param.metavar or param.name.upper()
            usage = (name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else "")
            param._usage_display_name = lambda usage=usage: usage  # typer's own writes {name}
        elif getattr(param, "is_flag", False):
            param.metavar = ""
        elif getattr(param, "multiple", False) and param.metavar is None:
            element = re.fullmatch(r"list\[(\w+)\]", param.bare_type()) if hasattr(param, "bare_type") else None
            param.metavar = f"<{element[1] if element else 'text'}>..."
    make_help_option = command.get_help_option  # click makes -h/--help on demand, outside `params`

    def help_option(ctx: Any) -> Any:
        option = make_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    if _is_group(command):
        for sub in command.commands.values():
            tidy(sub)
    return command
