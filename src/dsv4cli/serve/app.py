"""The HTTP API: FastAPI routes for OpenAI's, DeepSeek's and Anthropic's clients over one `Worker`.

Every failure a request can cause is an error object with a 4xx status in its dialect's shape (Anthropic's
for /v1/messages, OpenAI's elsewhere); a bug in the server is a 500 with one line, and the server keeps
serving. One log line per request (logger "dsv4.serve"): status, tokens, cached tokens, tok/s, finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from dsv4cli.chat.encoding import encode_messages, prompt_opens_reasoning
from dsv4cli.chat.tokenizer import Tokenizer
from dsv4cli.engine.events import TurnResult
from dsv4cli.serve import anthropic_api, openai_api
from dsv4cli.serve.errors import ApiError, invalid
from dsv4cli.serve.requests import ChatRequest, ServeDefaults
from dsv4cli.serve.worker import Job, Ticket, Worker

log = logging.getLogger("dsv4.serve")
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")


@dataclass(frozen=True)
class ServeConfig:
    defaults: ServeDefaults
    api_key: str | None = None  # None: no authentication
    timeout: float = 3600.0  # seconds a request may take, queueing included
    max_body_bytes: int = 32 * 1024 * 1024


class _ClientGone(Exception):
    """The client disconnected before its reply was complete."""


class EventStream(StreamingResponse):
    """An SSE response that calls `on_close` as soon as the client disconnects (and when it ends), so the
    generation behind it stops after the current token instead of running to its limit."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self.on_close()


def sse(data: Any, event: str | None = None) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"


def create_app(worker: Worker, tokenizer: Tokenizer, config: ServeConfig) -> FastAPI:
    """The application; the caller starts `worker` (and stops it at shutdown)."""
    app = FastAPI(title="dsv4", docs_url=None, redoc_url=None, openapi_url=None)
    defaults = config.defaults
    app.state.worker = worker

    def error_response(err: ApiError, path: str) -> JSONResponse:
        body = err.anthropic_body() if path in ANTHROPIC_PATHS else err.openai_body()
        return JSONResponse(body, status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(ApiError(exc.status_code, message), request.url.path)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        bearer = request.headers.get("authorization") or ""
        if bearer.lower().startswith("bearer "):
            given = given or bearer[7:].strip()
        if not hmac.compare_digest(given.encode(), config.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send it as 'Authorization: Bearer KEY' or 'x-api-key')",
                           code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise ApiError(413, f"the request body of {int(declared):,} bytes is larger than the server's limit of "
                                f"{config.max_body_bytes:,}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise ApiError(413, f"the request body is larger than the server's limit of "
                                    f"{config.max_body_bytes:,} bytes")
        try:
            return json.loads(bytes(body).decode("utf-8"), parse_constant=_no_constants)
        except UnicodeDecodeError as err:
            raise invalid(f"the request body is not UTF-8 (byte offset {err.start})") from None
        except (ValueError, RecursionError) as err:
            reason = "it is empty" if not body else str(err) if isinstance(err, ValueError) else "it nests too deep"
            raise invalid(f"the request body is not valid JSON: {reason}") from None

    def route(handler, public: bool = False):
        """Authorization (unless `public`), errors as error objects (a bug too: one line, no traceback to the
        client), and the request's log line."""
        async def wrapped(request: Request) -> Response:
            started = time.monotonic()
            try:
                if not public:
                    authorize(request)
                return await handler(request, started)
            except ApiError as err:
                _log_request(request, err.status, started, note=err.message)
                return error_response(err, request.url.path)
            except Exception as err:
                log.exception("internal error on %s", request.url.path)
                _log_request(request, 500, started, note=f"{type(err).__name__}: {err}")
                return error_response(ApiError(500, f"internal server error: {type(err).__name__}"), request.url.path)
        wrapped.__name__ = handler.__name__
        return wrapped

    def check_context(ids: list[int]) -> None:
        if len(ids) >= defaults.context:
            raise invalid(f"the prompt has {len(ids):,} tokens; this server's context is {defaults.context:,} tokens",
                          "messages", code="context_length_exceeded")

    async def chat_job(chat: ChatRequest) -> Job:
        def encode() -> tuple[str, list[int]]:
            try:
                prompt = encode_messages(chat.messages, **chat.mode.encode_kwargs())
            except (ValueError, TypeError) as err:
                raise invalid(f"the messages cannot be encoded: {err}", "messages") from None
            return prompt, tokenizer.encode(prompt)

        prompt, ids = await asyncio.to_thread(encode)
        check_context(ids)
        return Job(ids, chat.sampling, chat.max_tokens, chat=True, thinking=prompt_opens_reasoning(prompt),
                   reasoning_budget=chat.reasoning_budget, stop=chat.stop)

    def submit(job: Job) -> Ticket:
        ticket = Ticket(job, asyncio.get_running_loop())
        worker.submit(ticket)
        return ticket

    async def pieces(ticket: Ticket, started: float, request: Request | None) -> AsyncIterator[tuple[str, Any]]:
        """The ticket's items until "done"; an ApiError on failure or timeout. With `request` (a reply that
        is not streamed), a client that disconnects cancels it."""
        deadline = started + config.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                ticket.cancel.set()
                raise ApiError(504, f"the request took longer than the server's timeout of {config.timeout:g} s")
            try:
                kind, value = await ticket.get(min(remaining, 0.25) if request is not None else remaining)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    ticket.cancel.set()
                    raise _ClientGone() from None
                continue
            if kind == "error":
                raise value
            yield kind, value
            if kind == "done":
                return

    async def reply(ticket: Ticket, started: float, request: Request, shape: Callable[[TurnResult], Any]
                    ) -> Response:
        """The whole reply as one JSON body, `shape(result)`; nothing (499) when the client left first."""
        try:
            async for kind, value in pieces(ticket, started, request):
                if kind == "done":
                    _log_request(request, 200, started, value)
                    return JSONResponse(shape(value))
        except _ClientGone:
            _log_request(request, 499, started, note="client disconnected")
            return Response(status_code=499)
        raise ApiError(500, "the generation ended without a result")

    def streamed(request: Request, ticket: Ticket, started: float, shape) -> EventStream:
        """Stream the reply as SSE events in `shape`'s dialect (its `start()`, `delta(channel, text)` and
        `end(result)` give (event name or None, data) pairs); errors become a final error event."""
        async def body() -> AsyncIterator[str]:
            status, result = 200, None
            try:
                for name, data in shape.start():
                    yield sse(data, name)
                async for kind, value in pieces(ticket, started, None):
                    if kind == "done":
                        result = value
                    for name, data in shape.end(value) if kind == "done" else shape.delta(kind, value):
                        yield sse(data, name)
            except ApiError as err:
                status = err.status
                anthropic = request.url.path in ANTHROPIC_PATHS
                yield sse(err.anthropic_body(), "error") if anthropic else sse(err.openai_body())
                if not anthropic:
                    yield sse("[DONE]")
            finally:
                _log_request(request, status if result is not None or status != 200 else 499, started, result)

        return EventStream(body(), ticket.cancel.set)

    # ------------------------------------------------------------------------------------- routes
    async def chat_completions(request: Request, started: float) -> Response:
        chat = openai_api.parse_chat(await read_json(request), defaults)
        ticket = submit(await chat_job(chat))
        if not chat.stream:
            return await reply(ticket, started, request, lambda result: openai_api.chat_response(result, chat))
        return streamed(request, ticket, started, openai_api.ChatChunks(chat))

    async def completions(request: Request, started: float) -> Response:
        req = openai_api.parse_completion(await read_json(request), defaults)
        if isinstance(req.prompt, str):
            ids = await asyncio.to_thread(tokenizer.encode, req.prompt)
        else:
            ids = req.prompt
            if max(ids) >= tokenizer.vocab_size:
                raise invalid(f"'prompt' holds token id {max(ids)}; the vocabulary has {tokenizer.vocab_size}",
                              "prompt")
        if not ids:
            raise invalid("'prompt' encodes to no tokens", "prompt")
        check_context(ids)
        echoed = (req.prompt if isinstance(req.prompt, str) else tokenizer.decode(ids)) if req.echo else ""
        ticket = submit(Job(ids, req.sampling, req.max_tokens, chat=False, stop=req.stop, ignore_eos=req.ignore_eos))
        if not req.stream:
            return await reply(ticket, started, request,
                               lambda result: openai_api.completion_response(result, req, echoed))
        return streamed(request, ticket, started, openai_api.CompletionChunks(req, echoed))

    async def messages(request: Request, started: float) -> Response:
        chat = anthropic_api.parse_messages(await read_json(request), defaults)
        job = await chat_job(chat)
        ticket = submit(job)
        if not chat.stream:
            return await reply(ticket, started, request, lambda result: anthropic_api.message_response(result, chat))
        return streamed(request, ticket, started, anthropic_api.MessageEvents(chat, len(job.prompt_ids)))

    async def count_tokens(request: Request, started: float) -> Response:
        data = await read_json(request)
        if isinstance(data, dict) and "max_tokens" not in data:
            data = {**data, "max_tokens": 1}
        job = await chat_job(anthropic_api.parse_messages(data, defaults))
        return JSONResponse({"input_tokens": len(job.prompt_ids)})

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "dsv4",
                "max_model_len": defaults.context}

    async def models(request: Request, started: float) -> Response:
        return JSONResponse({"object": "list", "data": [model_card(name) for name in defaults.model_names]})

    async def model(request: Request, started: float) -> Response:
        name = request.path_params["name"]
        if name not in defaults.model_names:
            raise ApiError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return JSONResponse(model_card(name))

    async def health(request: Request, started: float) -> Response:
        engine = worker.engine
        return JSONResponse({"status": "ok", "model": defaults.model, "context": defaults.context,
                             "queued": worker.queued, "running": worker.running is not None,
                             "cached_prefixes": getattr(engine, "cached_prefixes", 0),
                             "prompt_cache_bytes": getattr(engine, "prompt_cache_used_bytes", 0)})

    app.add_api_route("/v1/chat/completions", route(chat_completions), methods=["POST"])
    app.add_api_route("/v1/completions", route(completions), methods=["POST"])
    app.add_api_route("/v1/messages", route(messages), methods=["POST"])
    app.add_api_route("/v1/messages/count_tokens", route(count_tokens), methods=["POST"])
    app.add_api_route("/v1/models", route(models), methods=["GET"])
    app.add_api_route("/v1/models/{name:path}", route(model), methods=["GET"])
    app.add_api_route("/health", route(health, public=True), methods=["GET"])
    return app


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _log_request(request: Request, status: int, started: float, result: TurnResult | None = None,
                 note: str = "") -> None:
    """One line per request: what it cost, or why it failed."""
    seconds = time.monotonic() - started
    line = f"{request.method} {request.url.path} {status} {seconds:.2f}s"
    if result is not None:
        stats = result.stats
        line += (f" prompt={stats.prompt_tokens} cached={stats.cached_tokens} gen={stats.generated_tokens} "
                 f"{stats.decode_tokens_per_second:.1f} tok/s finish={stats.finish_reason}")
    if note:
        line += f" ({note})"
    log.info(line)
