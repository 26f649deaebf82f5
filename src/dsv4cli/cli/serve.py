"""`dsv4 serve`: flags checked and the port bound first (no torch yet), then the model opened and the API
served until Ctrl-C (docs/serve.md)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import typer

from dsv4cli.cli.chat import (
    DEFAULT_MAX_TOKENS,
    DEMO_MAX_TOKENS,
    _chat_mode,
    _check_draft,
    _check_limits,
    _sampling_flags,
)
from dsv4cli.cli.options import FLAG_NAMES, CpuMemory, Device, GpuMemory, RoutingCounts, SavedPlan
from dsv4cli.errors import OutOfMemory, UsageError, render
from dsv4cli.runtime.resolve import WITH_WEIGHTS

SERVE_HELP = "\n\n".join([
    "Serve a model over HTTP to OpenAI, DeepSeek and Anthropic API clients (coding agents, editors, scripts).",
    "Endpoints: POST /v1/chat/completions, /v1/completions, /v1/messages (Anthropic); GET /v1/models, /health. "
    "One loaded model answers the requests one at a time from a FIFO queue (429 when it is full); the prompt "
    "cache keeps the prefixes of several conversations. See docs/serve.md.",
    "It listens on 127.0.0.1:8000. Another --host needs --api-key (or DSV4_API_KEY), or --no-auth.",
])


def register(app: typer.Typer) -> None:
    app.command(name="serve", help=SERVE_HELP)(serve)


def serve(
    model: str | None = typer.Argument(None, help=f"MODEL: {WITH_WEIGHTS}. Omit it for the built-in demo model."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="DSV4_API_KEY", show_envvar=False,
                                       help="Key clients must send (Authorization: Bearer KEY or x-api-key); "
                                            "default: $DSV4_API_KEY."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve a non-loopback --host without a key."),
    names: list[str] | None = typer.Option(None, "--name", help="Model name clients give (repeatable; default: "
                                                                "MODEL's name)."),
    mode: str | None = typer.Option(None, "--mode", show_default=False,
                                    help="Mode for requests that choose none: non-think, think-high (default), "
                                         "think-max."),
    temperature: float | None = typer.Option(None, help="Default temperature (default: the model's "
                                                        "generation_config.json)."),
    top_p: float | None = typer.Option(None, "--top-p", help="Default nucleus sampling threshold."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", "-n", help="Default reply limit in tokens "
                                          f"(default: {DEFAULT_MAX_TOKENS}; the demo: {DEMO_MAX_TOKENS})."),
    reasoning_budget: int | None = typer.Option(None, "--reasoning-budget",
                                                help="Force </think> after this many thinking tokens."),
    ctx: int = typer.Option(16384, "--ctx", help="Context size in tokens."),
    threads: int | None = typer.Option(None, "--threads", "-t", help="CPU threads for torch and the native kernels "
                                       "(default: torch's)."),
    draft: int | None = typer.Option(None, "--draft", show_default=False,
                                     help="Speculative decoding with the MTP layer: N draft tokens (0-3) per step. "
                                     "Default: 1 when the model runs on the CPU alone, else 0."),
    no_draft: bool = typer.Option(False, "--no-draft", help="Plain decoding, without drafts."),
    queue_size: int = typer.Option(16, "--queue", help="Requests that may wait; more get 429."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Seconds a request may take, waiting included."),
    cache_memory: str = typer.Option("2GB", "--cache-memory", help="Memory for cached prompt prefixes (0: "
                                                                   "only the live conversation)."),
    max_body: str = typer.Option("32MB", "--max-body", help="Largest request body."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No request log on stderr."),
    device: Device = None,
    gpu_memory: GpuMemory = None,
    cpu_memory: CpuMemory = None,
    plan: SavedPlan = None,
    counts: RoutingCounts = None,
) -> None:
    """Serve MODEL over HTTP (OpenAI and Anthropic APIs)."""
    from dsv4cli.units import parse_size

    think = _chat_mode(mode, False, False)
    _check_limits(ctx, max_tokens, reasoning_budget)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    auto = _check_draft(draft, no_draft)
    if queue_size < 0:
        raise UsageError(f"--queue must be at least 0, got {queue_size}")
    if not timeout > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {timeout}")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0 to 65535, got {port}")
    names = [n.strip() for n in names or []]
    if any(not n for n in names):
        raise UsageError("--name is empty", "give the model name clients send")
    cache_bytes = 0 if cache_memory.strip() == "0" else parse_size(cache_memory)
    body_bytes = parse_size(max_body)
    sampling = _sampling_flags(temperature=temperature, top_p=top_p, top_k=0, min_p=0.0, seed=None)
    from dsv4cli.serve.server import bind, is_loopback

    key = api_key or None
    if not is_loopback(host) and key is None and not no_auth:
        raise UsageError(f"--host {host} accepts connections from other machines, and no API key is set",
                         "give --api-key KEY (or set DSV4_API_KEY), or --no-auth to serve without one")
    if key is not None and no_auth:
        raise UsageError("--api-key and --no-auth contradict each other", "give one of them")
    sock = bind(host, port)  # before the model loads: a taken port fails in a second, not after minutes
    try:
        _serve_on(sock, model, key, names, think, sampling, temperature, top_p, max_tokens, reasoning_budget, ctx,
                  threads, draft, auto, queue_size, timeout, cache_bytes, body_bytes, quiet,
                  host, no_auth,
                  dict(device=device, gpu_memory=gpu_memory, cpu_memory=cpu_memory, plan=plan, counts=counts))
    finally:
        sock.close()


def _serve_on(sock, model, key, names, think, sampling, temperature, top_p, max_tokens, reasoning_budget, ctx,
              threads, draft, auto_draft, queue_size, timeout, cache_bytes, body_bytes, quiet, host, no_auth,
              placed) -> None:
    import dataclasses

    from dsv4cli.chat.service import loads_mtp, resolve_draft, sampling_defaults
    from dsv4cli.engine.engine import ContextTooLarge, Engine
    from dsv4cli.runtime.open import open_model
    from dsv4cli.runtime.options import PlacementOptions
    from dsv4cli.runtime.threads import thread_count
    from dsv4cli.serve.app import ServeConfig
    from dsv4cli.serve.requests import ServeDefaults
    from dsv4cli.serve.server import ApiServer, address_of
    from dsv4cli.serve.worker import Worker

    placement = PlacementOptions(**placed)
    with thread_count(threads), open_model(model, placement=placement, context=ctx,
                                           with_mtp=loads_mtp(draft, auto_draft, placement)) as opened:
        draft = resolve_draft(opened, draft, auto_draft)
        default_temperature, default_top_p = sampling_defaults(opened)
        sampling = dataclasses.replace(sampling, temperature=default_temperature if temperature is None
                                       else temperature, top_p=default_top_p if top_p is None else top_p)
        defaults = ServeDefaults(
            model_names=tuple(names or [opened.ref.name]), mode=think, sampling=sampling,
            max_tokens=max_tokens or (DEMO_MAX_TOKENS if opened.is_demo else DEFAULT_MAX_TOKENS),
            reasoning_budget=reasoning_budget if reasoning_budget is not None else (64 if opened.is_demo else None),
            context=ctx)
        try:
            engine = Engine(opened.model, max_context=ctx, draft=draft, prompt_cache_bytes=cache_bytes)
        except ContextTooLarge as err:
            raise OutOfMemory(err.message, "lower --ctx") from None
        _log_to_stderr(quiet)
        for notice in opened.notices:
            typer.echo(f"warning: {render(notice, FLAG_NAMES)}", err=True)
        if no_auth and not quiet:
            typer.echo(f"warning: serving {host} without an API key: anyone who reaches it can use it", err=True)
        server = ApiServer(Worker(engine, opened.tokenizer, queue_size), opened.tokenizer,
                           ServeConfig(defaults, api_key=key, timeout=timeout, max_body_bytes=body_bytes), sock)
        url = address_of(sock)
        typer.echo(f"dsv4 serve: {opened.label} as {', '.join(repr(n) for n in defaults.model_names)} on {url} "
                   f"(OpenAI: {url}/v1, Anthropic: {url}/v1/messages; Ctrl-C stops)", err=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
        typer.echo("dsv4 serve: stopped", err=True)


def _log_to_stderr(quiet: bool) -> None:
    """The request log: one timestamped line per request on stderr (warnings only with --quiet)."""
    logger = logging.getLogger("dsv4.serve")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.propagate = False
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
