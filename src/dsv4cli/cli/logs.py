"""`dsv4 logs`: the logged conversations (chat/logs.py) as a table, or one of them in full.

Call `register(app)` to add the command to the dsv4 typer app (idempotent).
"""

from __future__ import annotations

import json

import typer

LOGS_HELP = "\n\n".join([
    "List the logged conversations, newest first, or show one of them.",
    "Every `dsv4 chat` (one-shot or REPL) is kept in $XDG_STATE_HOME/dsv4/logs unless run with --no-log; "
    "`dsv4 chat -c` goes on with the newest. ID is a conversation's id from the list, or `last`.",
])


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def logs(
    log_id: str | None = typer.Argument(None, metavar="ID", help="A conversation to show (`last`: the newest)."),
    count: int = typer.Option(20, "-n", "--count", help="Conversations to list."),
    as_json: bool = typer.Option(False, "--json", help="Print the list, or the conversation, as JSON."),
    thinking: bool = typer.Option(False, "--thinking", help="Show the thinking traces too."),
) -> None:
    from dsv4cli.chat.logs import find_log, list_logs
    from dsv4cli.errors import UsageError

    if count < 1:
        raise UsageError(f"-n must be at least 1, got {count}")
    if log_id is None:
        entries = list_logs()[:count]
        if as_json:
            typer.echo(json.dumps([{"id": e.id, "modified": e.when, "model": e.model, "turns": e.turns,
                                    "first_prompt": e.first_prompt, "path": str(e.path)} for e in entries], indent=2))
            return
        if not entries:
            typer.echo("no logged conversations yet", err=True)
            return
        width = max(len(e.id) for e in entries)
        for e in entries:
            model = (e.model or "?").rsplit("/", 1)[-1]
            typer.echo(f"{e.id:<{width}}  {e.when}  {model:<14}  {e.turns:>3} turns  {_one_line(e.first_prompt, 50)}")
        return
    entry = find_log(None if log_id == "last" else log_id)
    if as_json:
        typer.echo(entry.path.read_text(encoding="utf-8").rstrip("\n"))
        return
    data = json.loads(entry.path.read_text(encoding="utf-8"))
    typer.echo(f"# {entry.id} · {entry.model or '?'} · {entry.when}")
    if data.get("system"):
        typer.echo(f"\n## system\n{data['system']}")
    for message in data["messages"]:
        role = message.get("role", "?")
        if thinking and message.get("reasoning_content"):
            typer.echo(f"\n## {role} (thinking)\n{message['reasoning_content']}")
        suffix = " (interrupted)" if message.get("interrupted") else ""
        typer.echo(f"\n## {role}{suffix}\n{message.get('content', '')}")


def register(app: typer.Typer) -> None:
    """Add the `logs` command to `app` (once)."""
    if not any(command.name == "logs" for command in app.registered_commands):
        app.command(name="logs", help=LOGS_HELP)(logs)
