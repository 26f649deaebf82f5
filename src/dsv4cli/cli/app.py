"""The `dsv4` command line: parses flags, calls one service function per command, maps errors to exit codes."""

from __future__ import annotations

import os
import sys

import typer

from dsv4cli import __version__
from dsv4cli.errors import DsvError

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


def _register_commands() -> None:
    """Commands that live in their own modules."""
    from dsv4cli.cli import alias as cli_alias
    from dsv4cli.cli import bench as cli_bench
    from dsv4cli.cli import chat as cli_chat
    from dsv4cli.cli import convert as cli_convert
    from dsv4cli.cli import hub as cli_hub
    from dsv4cli.cli import info as cli_info
    from dsv4cli.cli import logs as cli_logs
    from dsv4cli.cli import plan as cli_plan
    from dsv4cli.cli import quantize as cli_quantize
    from dsv4cli.cli import serve as cli_serve

    cli_info.register(app)
    cli_chat.register(app)
    cli_hub.register(app)
    cli_convert.register(app)
    cli_bench.register(app)
    cli_plan.register(app)
    cli_quantize.register(app)
    cli_logs.register(app)
    cli_alias.register(app)
    cli_serve.register(app)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; turn every failure into one line on stderr and an exit code.

    Exit codes: 0 ok, 1 a problem met while working, 2 a command line that cannot work (see
    `errors`), 130 interrupted. An unexpected exception is a dsv4 bug: one line says so, and
    DSV4_DEBUG=1 shows its traceback."""
    try:
        from dsv4cli.cli.help import tidy

        # as app() does, with the help tidied; click returns typer.Exit's code instead of raising
        code = tidy(typer.main.get_command(app))(args=argv, prog_name="dsv4", standalone_mode=False)
    except DsvError as err:
        from dsv4cli.cli.options import FLAG_NAMES

        _fail(err.one_line(FLAG_NAMES), err.exit_code)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except ClickException as err:
        message = _click_message(err)
        if not message:  # `dsv4` alone: click has printed the help
            sys.exit(err.exit_code)
        _fail(message, err.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        _fail("interrupted", 130)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    except MemoryError:
        _fail("out of memory", 1, "use a smaller model, fewer layers, or more swap")
    except OSError as err:
        from dsv4cli.fsutil import describe_os_error

        _fail(describe_os_error(err), 1, "check the path, its permissions and the free disk space")
    except Exception as err:
        if type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA), without importing torch here
            _fail("the GPU ran out of memory", 1, "lower --gpu-memory or --ctx, or free the GPU (see nvidia-smi)")
        if os.environ.get("DSV4_DEBUG"):
            raise
        _fail(f"internal error: {type(err).__name__}: {_first_line(err)}", 1,
              "this is a bug in dsv4; run again with DSV4_DEBUG=1 for the traceback and report it")
    if isinstance(code, int) and code:
        sys.exit(code)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


def _click_message(err) -> str:
    """A click usage error as one line, pointing to the command's --help."""
    message = " ".join(err.format_message().split())
    context = getattr(err, "ctx", None)
    if message and context is not None:
        return f"{message} (see '{context.command_path} --help')"
    return message


def _fail(message: str, code: int, hint: str = "") -> None:
    text = f"{message} ({hint})" if hint else message
    print(f"dsv4: error: {text}", file=sys.stderr)
    sys.exit(code)
