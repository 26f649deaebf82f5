"""`dsv4 chat`: flags checked first (no torch yet), then the model opened and the REPL or one prompt run."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import typer

from dsv4cli.chat.encoding import ThinkMode
from dsv4cli.cli.options import (
    FLAG_NAMES,
    ApiKey,
    ApiModel,
    ApiUrl,
    CpuMemory,
    Device,
    GpuMemory,
    RoutingCounts,
    SavedPlan,
)
from dsv4cli.errors import DsvError, UsageError, render
from dsv4cli.runtime.resolve import WITH_WEIGHTS

DEFAULT_MAX_TOKENS = 8192  # tokens per reply without --max-tokens
DEMO_MAX_TOKENS = 256  # ... on the built-in demo, which rambles past that


def register(app: typer.Typer) -> None:
    """Add the `chat` command to `app`."""
    app.command(name="chat")(chat)


MODES = [mode.value for mode in ThinkMode]
SAMPLING_FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "min_p": "--min-p",
                  "seed": "--seed"}
NOT_UTF8_HINT = "pass UTF-8 text; convert other encodings first, e.g. with iconv -f latin1 -t utf-8"


def chat(
    model: str | None = typer.Argument(None, help=f"MODEL: {WITH_WEIGHTS}. Omit it for the built-in demo model."),
    prompt: str | None = typer.Option(None, "-p", "--prompt", help="One-shot prompt (stdin, if piped, comes first)."),
    prompt_file: Path | None = typer.Option(None, "-f", "--file", help="One-shot prompt read from a UTF-8 file "
                                            "(instead of -p)."),
    mode: str | None = typer.Option(None, "--mode", show_default=False,
                                    help="Reasoning mode: non-think, think-high (default), think-max."),
    nothink: bool = typer.Option(False, "--nothink", help="Shortcut for --mode non-think."),
    think_max: bool = typer.Option(False, "--think-max", help="Shortcut for --mode think-max."),
    system: str | None = typer.Option(None, "--system", "-s", help="System prompt."),
    system_file: Path | None = typer.Option(None, "--system-file", help="System prompt read from a UTF-8 file."),
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop sequence: the answer ends before it (repeatable, "
                                                               "up to 4; the thinking trace is not searched)."),
    threads: int | None = typer.Option(None, "--threads", "-t", help="CPU threads for torch and the native kernels "
                                       "(default: torch's)."),
    temperature: float | None = typer.Option(None, help="Sampling temperature (0 = greedy). Default: the model's "
                                             "generation_config.json (DeepSeek: 1.0; the demo: 0.5)."),
    top_p: float | None = typer.Option(None, "--top-p", help="Nucleus sampling threshold (default: as temperature)."),
    top_k: int = typer.Option(0, "--top-k", help="Keep only the k most likely tokens (0 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability."),
    seed: int | None = typer.Option(None, help="Random seed for reproducible sampling."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", "-n", help="Most tokens to generate per reply "
                                     f"(default: {DEFAULT_MAX_TOKENS}; the demo: {DEMO_MAX_TOKENS})."),
    ctx: int = typer.Option(16384, "--ctx", help="Context size in tokens."),
    reasoning_budget: int | None = typer.Option(None, "--reasoning-budget",
                                                help="Force </think> after this many thinking tokens."),
    show_thinking: bool = typer.Option(False, "--show-thinking", help="One-shot: copy the thinking trace to stderr."),
    thinking_view: str = typer.Option("collapse", "--thinking", help="REPL: collapse, keep or hide the trace."),
    as_json: bool = typer.Option(False, "--json", help="One-shot: print one JSON object (content, reasoning, usage)."),
    no_markdown: bool = typer.Option(False, "--no-markdown", help="REPL: print the answer as plain text."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="One-shot: print the stats line to stderr."),
    resume: bool = typer.Option(False, "--continue", "-c", help="Go on with the last logged conversation (its "
                                                               "MODEL unless one is given; see dsv4 logs)."),
    no_log: bool = typer.Option(False, "--no-log", help="Do not keep this conversation in the log "
                                                        "($XDG_STATE_HOME/dsv4/logs)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No banner or notices on stderr (warnings and errors "
                                                            "still show)."),
    no_history: bool = typer.Option(False, "--no-history", help="REPL: do not read or write the history file."),
    draft: int | None = typer.Option(None, "--draft", show_default=False,
                                     help="Speculative decoding: draft N tokens (0-3) per step with the "
                                     "checkpoint's MTP layer; same greedy output, same sampling distribution. "
                                     "Default: 1 when the model runs on the CPU alone, else 0 "
                                     "(docs/performance.md)."),
    no_draft: bool = typer.Option(False, "--no-draft", help="Plain decoding, without drafts."),
    api: ApiUrl = None,
    api_key: ApiKey = None,
    api_model: ApiModel = None,
    device: Device = None,
    gpu_memory: GpuMemory = None,
    cpu_memory: CpuMemory = None,
    plan: SavedPlan = None,
    counts: RoutingCounts = None,
) -> None:
    """Chat with a model: a REPL on a terminal, one-shot with -p or piped stdin.

    Text from -p, --system and stdin must be UTF-8. One-shot exit status: 0 (a reply cut at the token
    limit is still 0, with a warning), 1 on errors and when the limit ends the reply inside the thinking
    trace before any answer (with --json: 0 and a warning, the object says stopped_in_reasoning),
    2 for bad flags, 130 when interrupted.
    """
    think = _chat_mode(mode, nothink, think_max)
    if thinking_view not in ("collapse", "keep", "hide"):
        raise UsageError(f"--thinking must be collapse, keep or hide, not {thinking_view!r}")
    _check_limits(ctx, max_tokens, reasoning_budget)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    auto = _check_draft(draft, no_draft)
    if quiet and verbose:
        raise UsageError("--quiet and --verbose contradict each other", "give one of them")
    from dsv4cli.chat.logs import find_log, log_extra, new_log_path

    resumed = find_log(None) if resume else None
    if resumed is not None and model is None:
        model = resumed.model
    log = None if no_log else (resumed.path if resumed is not None else new_log_path())
    log_fields = log_extra(model or "demo")
    from dsv4cli.chat.stops import check_stops

    try:
        stops = check_stops(stop or ())
    except ValueError as err:
        raise UsageError(f"--stop: {err}") from None
    prompt = _one_of(_flag_text(prompt, "-p", "give the prompt's text, or pipe it on stdin"), "-p",
                     _file_text(prompt_file, "-f"), "-f")
    system = _one_of(_flag_text(system, "--system", "give the system prompt's text, or leave --system out"),
                     "--system", _file_text(system_file, "--system-file"), "--system-file")
    sampling = _sampling_flags(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    text = _one_shot_text(prompt)
    asked = _Asked(think, system, sampling, temperature, top_p, max_tokens, reasoning_budget, stops)
    view = _View(thinking_view, no_markdown, no_history, as_json, show_thinking, verbose, quiet)
    interactive = text is None
    if interactive and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("no prompt", "pass -p TEXT or pipe text on stdin; the REPL needs a terminal")
    if api is not None or api_model is not None:
        _refuse_local_flags(api, model, draft=draft, threads=threads, device=device, gpu_memory=gpu_memory,
                            cpu_memory=cpu_memory, plan=plan, counts=counts)
        given = tuple(name for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k or None),
                                               ("min_p", min_p or None), ("seed", seed)) if value is not None)
        raise typer.Exit(_converse_remote(api, api_key, api_model, text, asked, given, view,
                                          _Log(log, log_fields, resumed)))
    from dsv4cli.runtime.open import open_model  # torch loads here, after the flag checks
    from dsv4cli.runtime.options import PlacementOptions

    placement = PlacementOptions(device=device, gpu_memory=gpu_memory, cpu_memory=cpu_memory, plan=plan,
                                 counts=counts)
    from dsv4cli.chat.service import loads_mtp
    from dsv4cli.runtime.threads import thread_count

    with thread_count(threads), open_model(model, placement=placement, context=ctx,
                                           with_mtp=loads_mtp(draft, auto, placement)) as opened:
        from dsv4cli.chat.service import resolve_draft

        draft = resolve_draft(opened, draft, auto)
        raise typer.Exit(_converse(opened, text, asked, view, ctx, draft, _Log(log, log_fields, resumed)))


@dataclasses.dataclass(frozen=True)
class _View:
    """How the conversation is shown: the REPL's and one-shot's display flags."""

    thinking: str = "collapse"
    no_markdown: bool = False
    no_history: bool = False
    as_json: bool = False
    show_thinking: bool = False
    verbose: bool = False
    quiet: bool = False


@dataclasses.dataclass(frozen=True)
class _Asked:
    """What the flags ask of every reply: mode, system prompt, sampling (temperature / top_p None: the model's
    defaults), limits and stop sequences."""

    mode: ThinkMode
    system: str | None
    sampling: object
    temperature: float | None
    top_p: float | None
    max_tokens: int | None
    reasoning_budget: int | None
    stops: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Log:
    """The conversation log: where this chat is logged (None: --no-log), what the log keeps beside the
    transcript, and the logged conversation it continues (-c), if any."""

    path: Path | None
    extra: dict
    resumed: object = None


def _converse(opened, text: str | None, asked: _Asked, view: _View, ctx: int, draft: int, log: _Log) -> int:
    """The REPL (text None) or one prompt on an opened model; returns the exit status."""
    from dsv4cli.chat.service import new_session, sampling_defaults
    from dsv4cli.chat.session import ChatSettings
    from dsv4cli.engine.engine import ContextTooLarge
    from dsv4cli.errors import OutOfMemory

    notices = [render(notice, FLAG_NAMES) for notice in opened.notices]
    default_temperature, default_top_p = sampling_defaults(opened)
    sampling = dataclasses.replace(asked.sampling, top_p=default_top_p if asked.top_p is None else asked.top_p,
                                   temperature=default_temperature if asked.temperature is None else asked.temperature)
    placed = opened.placement.summary()
    settings = ChatSettings(mode=asked.mode, system=asked.system, sampling=sampling,
                            max_tokens=asked.max_tokens if asked.max_tokens is not None
                            else DEMO_MAX_TOKENS if opened.is_demo else DEFAULT_MAX_TOKENS,
                            reasoning_budget=asked.reasoning_budget if asked.reasoning_budget is not None else
                            (64 if opened.is_demo else None), stop=asked.stops)
    try:
        session = new_session(opened, settings, ctx, draft)
    except ContextTooLarge as err:
        raise OutOfMemory(err.message, "lower --ctx") from None
    session.log_path, session.log_extra = log.path, log.extra
    return _talk(session, text, view, log.resumed, label=opened.label, model_name=opened.ref.name, notices=notices,
                 placed=placed, demo_notice=opened.is_demo)


def _talk(session, text: str | None, view: _View, resumed, *, label: str, model_name: str, notices: list[str],
          placed: str = "", demo_notice: bool = False) -> int:
    """The REPL (text None) or one prompt on a session, local or remote; returns the exit status."""
    from dsv4cli.ui.render import make_renderer

    if resumed is not None:  # its messages and system prompt; mode and sampling as the flags say
        settings = session.settings
        session.load(resumed.path)
        session.settings = dataclasses.replace(session.settings, mode=settings.mode, sampling=settings.sampling,
                                               system=settings.system if settings.system is not None
                                               else session.settings.system)
    quiet = view.quiet
    if text is None:
        from dsv4cli.ui.repl import run_repl

        renderer = make_renderer("tty", thinking=view.thinking, markdown=not view.no_markdown)
        for notice in notices:
            renderer.warning(notice)
        if placed and not quiet:
            renderer.notice(placed)
        if resumed is not None and not quiet:
            renderer.notice(f"continuing conversation {resumed.id} ({len(session.messages)} messages)")
        return run_repl(session, renderer, banner=None if quiet else label, use_history=not view.no_history)
    sampling = dataclasses.asdict(session.settings.sampling)
    given = getattr(session, "sampling_given", None)  # remote: the server's defaults for the rest
    request = {"model": model_name, "sampling": sampling if given is None else {k: sampling[k] for k in given}}
    renderer = make_renderer("json", request=request) if view.as_json else make_renderer(
        "plain", show_thinking=view.show_thinking, verbose=view.verbose)
    think_max_warning = session.think_max_warning()
    for warning in [*notices, think_max_warning and f"{think_max_warning} (raise --ctx)"]:
        if warning:
            renderer.warning(warning)
    if demo_notice and not (view.as_json or quiet):
        renderer.notice(f"using the {label}")
    if placed and not (view.as_json or quiet):
        renderer.notice(placed)
    return _one_shot(session, text, renderer, view.as_json)


def _check_draft(draft: int | None, no_draft: bool) -> bool:
    """Check --draft / --no-draft (chat and serve); True when neither is given (the default draft length)."""
    from dsv4cli.engine.speculative import MAX_DRAFT

    if draft is not None and not 0 <= draft <= MAX_DRAFT:
        raise UsageError(f"--draft must be 0 to {MAX_DRAFT}, got {draft}",
                         f"draft 1 to {MAX_DRAFT} tokens per step, or 0 to turn drafting off")
    if draft and no_draft:
        raise UsageError(f"--draft {draft} and --no-draft contradict each other", "give one of them")
    return draft is None and not no_draft


def _refuse_local_flags(api: str | None, model: str | None, **flags) -> None:
    """--api runs the model elsewhere: MODEL and the flags of a local model contradict it."""
    if api is None:
        raise UsageError("--model names a model on a server", "give the server with --api URL, or MODEL for a "
                                                               "local model")
    if model is not None:
        raise UsageError(f"MODEL ({model}) and --api are alternatives", "drop MODEL to chat with the server, or "
                                                                        "--api to run it here")
    given = [name for name, value in flags.items() if value]
    if given:
        names = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UsageError(f"{names} set how a local model runs; with --api the server runs it", f"drop {names}")


def _converse_remote(api: str, api_key: str | None, api_model: str | None, text: str | None, asked: _Asked,
                     given: tuple[str, ...], view: _View, log: _Log) -> int:
    """The REPL or one prompt against a remote server (`chat.remote`)."""
    from dsv4cli.chat.remote import RemoteChatSession, connect
    from dsv4cli.chat.session import ChatSettings

    endpoint = connect(api, api_key, api_model)
    settings = ChatSettings(mode=asked.mode, system=asked.system, sampling=asked.sampling,
                            max_tokens=asked.max_tokens if asked.max_tokens is not None else DEFAULT_MAX_TOKENS,
                            reasoning_budget=asked.reasoning_budget, stop=asked.stops)
    session = RemoteChatSession(endpoint, settings, sampling_given=given)
    session.log_path = log.path
    session.log_extra = {"api": endpoint.base_url, "api_model": endpoint.model}  # no local MODEL to reopen
    return _talk(session, text, view, log.resumed, label=f"{endpoint.model} at {endpoint.base_url}",
                 model_name=endpoint.model, notices=[])


def _chat_mode(mode: str | None, nothink: bool, think_max: bool) -> ThinkMode:
    """The ThinkMode that --mode, --nothink and --think-max choose (think-high when none is given); any two
    that choose different modes are refused alike."""
    picks: dict[str, ThinkMode] = {}
    if mode is not None:
        try:
            picks[f"--mode {mode}"] = ThinkMode.parse(mode)
        except ValueError:
            raise UsageError(f"unknown mode {mode!r}", f"choose one of: {', '.join(MODES)}") from None
    if nothink:
        picks["--nothink"] = ThinkMode.NON_THINK
    if think_max:
        picks["--think-max"] = ThinkMode.THINK_MAX
    if len(set(picks.values())) > 1:
        raise UsageError(f"{' and '.join(picks)} contradict each other", "give one reasoning mode")
    return next(iter(picks.values()), ThinkMode.THINK_HIGH)


def _check_limits(ctx: int, max_tokens: int | None, reasoning_budget: int | None) -> None:
    """Refuse a context below 16 tokens, a non-positive token limit and a negative reasoning budget."""
    if ctx < 16:
        raise UsageError(f"--ctx must be at least 16 tokens, got {ctx}")
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {max_tokens}", "leave it out for the default")
    if reasoning_budget is not None and reasoning_budget < 0:
        raise UsageError(f"--reasoning-budget must be at least 0, got {reasoning_budget}",
                         "0 answers without thinking; leave it out for no budget")


def _sampling_flags(**values):
    """SamplingParams from the flags (temperature and top_p None: 1.0 until the model's defaults are known)."""
    from dsv4cli.engine.sampling import InvalidSamplingParam, SamplingParams

    given = {**values, "temperature": values["temperature"] if values["temperature"] is not None else 1.0,
             "top_p": values["top_p"] if values["top_p"] is not None else 1.0}
    try:
        return SamplingParams(**given)
    except InvalidSamplingParam as err:
        raise UsageError(f"{SAMPLING_FLAGS[err.param]} {err.requirement}, got {err.value}") from None


def _flag_text(text: str | None, flag: str, hint: str) -> str | None:
    """A text flag's value, refused when blank or not UTF-8 (argv carries invalid bytes as lone surrogates)."""
    if text is None:
        return None
    text = _valid_utf8(text, flag)
    if not text.strip():
        raise UsageError(f"{flag} is empty", hint)
    return text


def _file_text(path: Path | None, flag: str) -> str | None:
    """The UTF-8 text of a file flag's file (None without the flag); UsageError when it cannot be read,
    is not UTF-8 or is blank."""
    if path is None:
        return None
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {flag} {path}: {exc.strerror or exc}", "give a readable file") from None
    text = _decode_utf8(raw, f"{flag} {path}")
    if not text.strip():
        raise UsageError(f"{flag} {path} is empty", "put the text in the file, or leave the flag out")
    return text


def _one_of(first: str | None, first_flag: str, second: str | None, second_flag: str) -> str | None:
    """The text one of two alternative flags gave; UsageError when both were given."""
    if first is not None and second is not None:
        raise UsageError(f"{first_flag} and {second_flag} are alternatives", "give the text one way")
    return first if first is not None else second


def _valid_utf8(text: str, where: str) -> str:
    """`text` when it holds no lone surrogates, else UsageError naming the first invalid byte."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as err:
        raw = text.encode("utf-8", "surrogateescape") if _only_escaped_bytes(text) else None
        if raw is None:
            raise UsageError(f"{where} is not valid Unicode text (lone surrogate at character {err.start})",
                             NOT_UTF8_HINT) from None
        return _decode_utf8(raw, where)


def _only_escaped_bytes(text: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def _decode_utf8(data: bytes, where: str) -> str:
    """`data` as UTF-8 (a leading byte-order mark dropped); UsageError naming the first invalid byte."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise UsageError(f"{where} is not valid UTF-8: byte 0x{data[err.start]:02x} at offset {err.start}",
                         NOT_UTF8_HINT) from None


def _read_stdin() -> str:
    """All of piped stdin, decoded strictly as UTF-8 (not by the locale's error handler)."""
    raw = getattr(sys.stdin, "buffer", None)
    return _decode_utf8(raw.read(), "stdin") if raw is not None else _valid_utf8(sys.stdin.read(), "stdin")


def _one_shot_text(prompt: str | None) -> str | None:
    """Piped stdin, then -p text (joined by a blank line); None means interactive."""
    piped = None if sys.stdin.isatty() else _read_stdin()
    parts = [p for p in (piped.strip() if piped else None, prompt) if p]
    if piped is not None and not parts:
        raise UsageError("empty prompt on stdin", "pipe some text or pass -p TEXT")
    return "\n\n".join(parts) if parts else None


def _one_shot(session, text: str, renderer, as_json: bool) -> int:
    """Answer `text`; the exit status (see `chat`), with a warning or an error when the token limit cut the reply."""
    from dsv4cli.chat.service import run_prompt
    from dsv4cli.engine.engine import ContextFull

    try:
        result = run_prompt(session, text, renderer)
    except ContextFull as err:
        raise UsageError(err.message, f"raise --ctx above {err.prompt_tokens:,}, leaving room for the reply") from None
    if result.interrupted:
        return 130
    cut = _cut_off(result, session.engine.max_context)
    if cut is None:
        return 0
    message, hint = cut
    if result.stopped_in_reasoning and not as_json:
        raise DsvError(message, hint)  # stdout got nothing: a script must see the failure
    renderer.warning(f"{message} ({hint})")
    return 0


def _cut_off(result, context: int) -> tuple[str, str] | None:
    """(message, hint) when the token limit or the full context ended the reply, else None."""
    stats = result.stats
    if stats.finish_reason != "length":
        return None
    context_full = stats.prompt_tokens + stats.generated_tokens >= context
    if result.stopped_in_reasoning:
        raise_limit = "raise --ctx" if context_full else "raise --max-tokens, set a lower --reasoning-budget"
        return (f"the reply stopped after {stats.generated_tokens:,} tokens inside the thinking trace, before any "
                "answer", f"{raise_limit}, or use --mode non-think")
    if context_full:
        return f"the answer was cut off: the {context:,}-token context is full", "raise --ctx"
    return f"the answer was cut off at the {stats.generated_tokens:,}-token limit", "raise --max-tokens"
