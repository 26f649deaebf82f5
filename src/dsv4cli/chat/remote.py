"""A chat session against a remote OpenAI-compatible server: `dsv4 serve`, SGLang or vLLM serving V4, or
DeepSeek's own API. The same session (history, modes, transcripts, the renderers) as a local chat; only the
turn itself goes over HTTP, streamed, with the thinking trace read from `reasoning_content`.

Each server takes the mode in its own dialect: DeepSeek's API (and dsv4 serve) read `thinking` and
`reasoning_effort`; vLLM and SGLang read `chat_template_kwargs`. The dialect is told by the URL and the
`owned_by` of the server's models.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from dsv4cli.chat.encoding import ThinkMode
from dsv4cli.chat.session import ChatSession, ChatSettings, for_prompt
from dsv4cli.engine.events import GenerationStats, TurnResult
from dsv4cli.engine.sampling import SamplingParams
from dsv4cli.errors import DsvError, UsageError

DEEPSEEK, TEMPLATE_KWARGS = "deepseek", "chat-template-kwargs"
V4_CONTEXT = 1_048_576  # the model card's context, for servers that do not report theirs
_CONNECT_HINT = "check the URL, and that the server is running (e.g. `dsv4 serve`)"


class RemoteError(DsvError):
    """The server could not be reached, refused the request, or answered something unreadable."""


@dataclass
class RemoteEndpoint:
    """The server side of a remote session: where it is, how to talk to it, and what it serves. It stands
    where a local session has its engine (`max_context`, `reset`)."""

    base_url: str  # ending in /v1
    api_key: str | None
    model: str
    dialect: str
    max_context: int = V4_CONTEXT
    timeout: float = 600.0

    def reset(self) -> None:
        """Nothing to forget here: the server's prompt cache keys on the prompt itself."""

    def request(self, method: str, path: str, body: dict[str, Any] | None = None):
        """The open HTTP response; RemoteError for an unreachable server or an error status."""
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body, ensure_ascii=False).encode("utf-8") if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            raise RemoteError(f"{self.base_url} answered {err.code}: {_error_message(err)}",
                              "give the server's key with {opt:api_key}" if err.code == 401 else "") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise RemoteError(f"cannot reach {self.base_url}: {reason}", _CONNECT_HINT) from None

    def mode_fields(self, mode: ThinkMode) -> dict[str, Any]:
        """The request fields that select `mode` on this server."""
        thinking = mode is not ThinkMode.NON_THINK
        effort = "max" if mode is ThinkMode.THINK_MAX else "high"
        if self.dialect == TEMPLATE_KWARGS:
            kwargs: dict[str, Any] = {"thinking": thinking}
            if thinking:
                kwargs["reasoning_effort"] = effort
            return {"chat_template_kwargs": kwargs}
        fields: dict[str, Any] = {"thinking": {"type": "enabled" if thinking else "disabled"}}
        if thinking:
            fields["reasoning_effort"] = effort
        return fields


def connect(url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0
            ) -> RemoteEndpoint:
    """The endpoint at `url` (a server root or its /v1), its model (the first it lists unless `model` is
    given) and its dialect; RemoteError when it cannot be reached or serves no such model."""
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise UsageError(f"{url!r} is not an http:// or https:// URL", "give the server's address, e.g. "
                                                                         "http://127.0.0.1:8000")
    if not base.endswith("/v1"):
        base += "/v1"
    endpoint = RemoteEndpoint(base, api_key, model or "", DEEPSEEK, timeout=timeout)
    with endpoint.request("GET", "/models") as response:
        listing = _read_json(response, base)
    entries = [m for m in listing.get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str)] if (
        isinstance(listing, dict)) else []
    names = [m["id"] for m in entries]
    if model is None:
        if not names:
            raise RemoteError(f"{base}/models lists no models", "name one with {opt:api_model}")
        model = names[0]
    elif names and model not in names:
        raise UsageError(f"{base} serves no model {model!r}; it serves {', '.join(names)}")
    entry = next((m for m in entries if m["id"] == model), {})
    owner = str(entry.get("owned_by", "")).lower()
    endpoint.model = model
    endpoint.dialect = TEMPLATE_KWARGS if owner in ("vllm", "sglang") else DEEPSEEK
    context = entry.get("max_model_len") or entry.get("context_length")
    if isinstance(context, int) and context > 1:
        endpoint.max_context = context
    return endpoint


class RemoteChatSession(ChatSession):
    """A ChatSession whose turns run on a remote server. `sampling_given`: the sampling fields the user set
    (the others are the server's)."""

    def __init__(self, endpoint: RemoteEndpoint, settings: ChatSettings | None = None,
                 sampling_given: tuple[str, ...] = ()):
        super().__init__(endpoint, None, settings)
        self.sampling_given = sampling_given

    def _run_turn(self, renderer, cancel: threading.Event | None, sampling: SamplingParams) -> TurnResult:
        endpoint: RemoteEndpoint = self.engine
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        body: dict[str, Any] = {"model": endpoint.model, "messages": system + for_prompt(self.messages),
                                "stream": True, "stream_options": {"include_usage": True},
                                "max_tokens": self.settings.max_tokens, **endpoint.mode_fields(self.settings.mode)}
        body.update({name: getattr(sampling, name) for name in self.sampling_given})
        if self.settings.stop:
            body["stop"] = list(self.settings.stop)
        started = time.perf_counter()
        stats = GenerationStats(finish_reason="stop")
        content, reasoning, calls = [], [], {}
        first = None
        with endpoint.request("POST", "/chat/completions", body) as response:
            for chunk in _events(response, endpoint.base_url):
                if cancel is not None and cancel.is_set():
                    stats.finish_reason = "cancelled"
                    break
                if chunk.get("usage"):
                    _read_usage(chunk["usage"], stats)
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    for channel, out, show in (("reasoning_content", reasoning, renderer.reasoning),
                                               ("content", content, renderer.content)):
                        text = delta.get(channel)
                        if isinstance(text, str) and text:
                            first = first or time.perf_counter()
                            out.append(text)
                            show(text)
                    for call in delta.get("tool_calls") or []:
                        _merge_call(calls, call)
                    if choice.get("finish_reason"):
                        stats.finish_reason = "length" if choice["finish_reason"] == "length" else "stop"
        ended = time.perf_counter()
        stats.time_to_first_token = (first or ended) - started
        stats.prefill_seconds = stats.time_to_first_token
        stats.decode_seconds = ended - (first or ended)
        tool_calls = [{"type": "function", "function": calls[i]} for i in sorted(calls)]
        return TurnResult(content="".join(content), reasoning="".join(reasoning), tool_calls=tool_calls,
                          interrupted=stats.finish_reason == "cancelled", stats=stats,
                          stopped_in_reasoning=bool(reasoning) and not content and stats.finish_reason == "length")


def _merge_call(calls: dict[int, dict[str, str]], delta: dict[str, Any]) -> None:
    """Add one streamed tool-call delta (OpenAI sends the name once and the arguments in pieces)."""
    index = delta.get("index", 0)
    function = delta.get("function") or {}
    entry = calls.setdefault(index if isinstance(index, int) else 0, {"name": "", "arguments": ""})
    entry["name"] += function.get("name") or ""
    entry["arguments"] += function.get("arguments") or ""


def _read_usage(usage: dict[str, Any], stats: GenerationStats) -> None:
    stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    stats.generated_tokens = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    stats.cached_tokens = int(details.get("cached_tokens") or usage.get("prompt_cache_hit_tokens") or 0)
    stats.reasoning_tokens = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)


def _events(response, where: str):
    """The JSON objects of an SSE stream, until `[DONE]`; RemoteError for an error event or unreadable data."""
    for raw in response:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise RemoteError(f"{where} sent a stream event that is not JSON: {data[:80]!r}") from None
        if isinstance(event, dict) and "error" in event:
            error = event["error"]
            raise RemoteError(f"{where} failed: {error.get('message') if isinstance(error, dict) else error}")
        if isinstance(event, dict):
            yield event


def _read_json(response, where: str) -> Any:
    try:
        return json.loads(response.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise RemoteError(f"{where} did not answer JSON", "is it an OpenAI-compatible server?") from None


def _error_message(err: urllib.error.HTTPError) -> str:
    """The message of an OpenAI- or Anthropic-style error body, else the status text."""
    try:
        body = json.loads(err.read().decode("utf-8"))
        error = body.get("error")
        return str(error.get("message") if isinstance(error, dict) else error or err.reason)
    except (ValueError, UnicodeDecodeError, AttributeError, OSError):
        return str(err.reason)
