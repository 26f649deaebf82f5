"""OpenAI's Chat Completions and Completions APIs, in DeepSeek's dialect: parsing the requests into
`ChatRequest` / `CompletionRequest`, and shaping the results and stream chunks as OpenAI's client reads them.

DeepSeek's API returns the thinking trace as `reasoning_content` beside `content` (in messages and in stream
deltas), and takes `thinking: {"type": "enabled"|"disabled"}` and `reasoning_effort`; vLLM and SGLang take
the same switches in `chat_template_kwargs`. They select the three modes (spec section 5).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from dsv4cli.chat.encoding import ThinkMode
from dsv4cli.engine.events import GenerationStats, TurnResult
from dsv4cli.serve.errors import invalid
from dsv4cli.serve.fields import Fields
from dsv4cli.serve.requests import (
    ChatRequest,
    CompletionRequest,
    ServeDefaults,
    requested_model,
    sampling_from,
    text_of,
    token_limit,
    with_tools,
)

#: reasoning_effort values: OpenAI's and DeepSeek's names, and what each selects
_EFFORTS = {"none": None, "minimal": ThinkMode.THINK_HIGH, "low": ThinkMode.THINK_HIGH,
            "medium": ThinkMode.THINK_HIGH, "high": ThinkMode.THINK_HIGH, "max": ThinkMode.THINK_MAX,
            "xhigh": ThinkMode.THINK_MAX}


# ------------------------------------------------------------------------------------------- requests
def parse_chat(data: Any, defaults: ServeDefaults) -> ChatRequest:
    """A /v1/chat/completions body as a ChatRequest; ApiError (400/404) for anything it cannot serve."""
    body = Fields(data)
    model = requested_model(body, defaults)
    _refuse_unsupported(body)
    raw = body.array("messages", required=True)
    if not raw:
        raise invalid("'messages' must hold at least one message", "messages")
    messages = [_message(m, f"messages[{i}]") for i, m in enumerate(raw)]
    tools = _tools(body)
    response_format = _response_format(body)
    stream = body.boolean("stream", False)
    options = body.object("stream_options", {})
    include_usage = Fields(options, "stream_options").boolean("include_usage", False)
    return ChatRequest(model=model, messages=with_tools(messages, tools, response_format),
                       mode=chat_mode(body, defaults.mode), sampling=sampling_from(body, defaults),
                       max_tokens=token_limit(body, defaults, "max_completion_tokens", "max_tokens"),
                       stop=body.stop_list("stop"), reasoning_budget=defaults.reasoning_budget, stream=stream,
                       include_usage=include_usage, has_tools=bool(tools))


def parse_completion(data: Any, defaults: ServeDefaults) -> CompletionRequest:
    """A /v1/completions body as a CompletionRequest."""
    body = Fields(data)
    model = requested_model(body, defaults)
    _refuse_unsupported(body)
    if body.any("suffix") is not None:
        raise invalid("'suffix' is not supported (no fill-in-the-middle)", "suffix")
    prompt = body.any("prompt", None)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise invalid("'prompt' must be a string, or an array of token ids (one prompt per request)", "prompt")
    elif not isinstance(prompt, str) or not prompt:
        raise invalid("'prompt' must be a non-empty string (one prompt per request)", "prompt")
    options = body.object("stream_options", {})
    return CompletionRequest(model=model, prompt=prompt, sampling=sampling_from(body, defaults),
                             max_tokens=token_limit(body, defaults, "max_tokens"), stop=body.stop_list("stop"),
                             stream=body.boolean("stream", False),
                             include_usage=Fields(options, "stream_options").boolean("include_usage", False),
                             echo=body.boolean("echo", False), ignore_eos=body.boolean("ignore_eos", False))


def chat_mode(body: Fields, default: ThinkMode) -> ThinkMode:
    """The mode `thinking`, `reasoning_effort` and `chat_template_kwargs` select (the server's when none)."""
    kwargs = Fields(body.object("chat_template_kwargs", {}), "chat_template_kwargs")
    enabled = None
    thinking = body.object("thinking")
    if thinking is not None:
        kind = Fields(thinking, "thinking").string("type", required=True, nullable=False)
        if kind not in ("enabled", "disabled", "adaptive"):
            raise invalid(f"'thinking.type' must be 'enabled' or 'disabled', got {kind!r}", "thinking.type")
        enabled = kind != "disabled"
    for key in ("thinking", "enable_thinking"):
        if enabled is None:
            enabled = kwargs.boolean(key)
    effort_key = "reasoning_effort" if "reasoning_effort" in body.data else None
    effort = body.string("reasoning_effort") if effort_key else kwargs.string("reasoning_effort")
    chosen = None
    if effort is not None:
        if effort not in _EFFORTS:
            raise invalid(f"'reasoning_effort' must be one of {', '.join(_EFFORTS)}, got {effort!r}",
                          "reasoning_effort")
        chosen = _EFFORTS[effort]
        if enabled is None:
            enabled = chosen is not None
    if enabled is None:
        return default
    if not enabled:
        return ThinkMode.NON_THINK
    if chosen is not None:
        return chosen
    return default if default is not ThinkMode.NON_THINK else ThinkMode.THINK_HIGH


def _refuse_unsupported(body: Fields) -> None:
    """400 for options that would change the answer's meaning and that this server does not implement."""
    body.integer("n", 1, minimum=1, maximum=1)
    if body.any("logprobs") not in (None, False, 0):
        raise invalid("'logprobs' is not supported", "logprobs")
    if body.any("top_logprobs") not in (None, 0):
        raise invalid("'top_logprobs' is not supported", "top_logprobs")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.number(key, 0.0, minimum=-2.0, maximum=2.0) != 0.0:
            raise invalid(f"'{key}' is not supported; leave it out or set it to 0", key)
    if body.any("logit_bias") not in (None, {}):
        raise invalid("'logit_bias' is not supported", "logit_bias")
    body.boolean("parallel_tool_calls")
    body.string("user")


def _message(data: Any, where: str) -> dict[str, Any]:
    message = Fields(data, where)
    role = message.string("role", required=True, nullable=False)
    content = message.any("content")
    if role in ("system", "developer"):  # OpenAI's newer name for the system message
        return {"role": "system", "content": text_of(content, f"{where}.content")}
    if role == "user":
        return {"role": "user", "content": text_of(content, f"{where}.content")}
    if role == "tool":
        return {"role": "tool", "tool_call_id": message.string("tool_call_id", required=True, nullable=False),
                "content": text_of(content, f"{where}.content")}
    if role != "assistant":
        raise invalid(f"'{where}.role' must be system, developer, user, assistant or tool, got {role!r}",
                      f"{where}.role")
    out: dict[str, Any] = {"role": "assistant", "content": text_of(content, f"{where}.content")}
    reasoning = message.string("reasoning_content")
    if reasoning:
        out["reasoning_content"] = reasoning
    calls = message.array("tool_calls", [])
    if calls:
        out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)]
    return out


def _tool_call(data: Any, where: str) -> dict[str, Any]:
    call = Fields(data, where)
    function = Fields(call.object("function") or {}, f"{where}.function")
    name = function.string("name", required=True, nullable=False)
    arguments = function.string("arguments", required=True, nullable=False)
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    ident = call.string("id")
    if ident:
        out["id"] = ident
    return out


def _tools(body: Fields) -> list[dict[str, Any]] | None:
    tools = body.array("tools", [])
    checked = []
    for i, data in enumerate(tools):
        tool = Fields(data, f"tools[{i}]")
        kind = tool.string("type", "function")
        if kind != "function":
            raise invalid(f"'tools[{i}].type' must be 'function', got {kind!r}", f"tools[{i}].type")
        function = Fields(tool.object("function") or {}, f"tools[{i}].function")
        function.string("name", required=True, nullable=False)
        function.string("description")
        function.object("parameters")
        checked.append({"type": "function", "function": function.data})
    choice = body.any("tool_choice")
    if choice in (None, "auto"):
        return checked or None
    if choice == "none":
        return None
    raise invalid("'tool_choice' must be 'auto' or 'none': this server cannot force a tool call", "tool_choice")


def _response_format(body: Fields) -> dict[str, Any] | None:
    fmt = body.object("response_format")
    if fmt is None:
        return None
    kind = Fields(fmt, "response_format").string("type", required=True, nullable=False)
    if kind == "text":
        return None
    if kind == "json_schema":
        return Fields(fmt, "response_format").object("json_schema") or fmt
    if kind == "json_object":
        return {"type": "json_object"}
    raise invalid(f"'response_format.type' must be text, json_object or json_schema, got {kind!r}",
                  "response_format.type")


# ------------------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(stats: GenerationStats) -> dict[str, Any]:
    """OpenAI's usage object, with DeepSeek's cached and reasoning token counts."""
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": stats.reasoning_tokens}}


def finish_reason(result: TurnResult) -> str:
    if result.tool_calls:
        return "tool_calls"
    return "length" if result.stats.finish_reason == "length" else "stop"


def tool_calls(result: TurnResult) -> list[dict[str, Any]]:
    """The reply's calls as OpenAI writes them, each with a new id."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
            for c in result.tool_calls]


def chat_response(result: TurnResult, request: ChatRequest) -> dict[str, Any]:
    calls = tool_calls(result)
    message: dict[str, Any] = {"role": "assistant", "content": result.content or (None if calls else "")}
    if request.mode is not ThinkMode.NON_THINK:
        message["reasoning_content"] = result.reasoning
    if calls:
        message["tool_calls"] = calls
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": request.model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(result)}],
            "usage": usage(result.stats)}


Frames = list[tuple[None, Any]]  # SSE events without a name: OpenAI's stream


class ChatChunks:
    """The chunks of one streamed chat completion (`chat.completion.chunk`), in order, ending in [DONE]."""

    def __init__(self, request: ChatRequest):
        self.request = request
        self.id = new_id("chatcmpl")
        self.created = int(time.time())

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.request.model, "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def start(self) -> Frames:
        return [(None, self._chunk({"role": "assistant", "content": ""}))]

    def delta(self, channel: str, text: str) -> Frames:
        return [(None, self._chunk({"reasoning_content" if channel == "reasoning" else "content": text}))]

    def end(self, result: TurnResult) -> Frames:
        """The tool calls (whole, one per delta), the finish reason and, when asked for, the usage."""
        chunks = [self._chunk({"tool_calls": [{"index": i, **call}]}) for i, call in enumerate(tool_calls(result))]
        chunks.append(self._chunk({}, finish_reason(result)))
        return _closing(chunks, self.request.include_usage, {**self._chunk({}), "choices": []}, result)


def _closing(chunks: list[dict[str, Any]], include_usage: bool, empty: dict[str, Any], result: TurnResult) -> Frames:
    """The last chunks of an OpenAI stream: `chunks`, the usage chunk when asked for, then [DONE]."""
    if include_usage:
        chunks.append({**empty, "usage": usage(result.stats)})
    return [(None, chunk) for chunk in [*chunks, "[DONE]"]]


def completion_response(result: TurnResult, request: CompletionRequest, echoed: str) -> dict[str, Any]:
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": request.model,
            "choices": [{"index": 0, "text": echoed + result.content, "logprobs": None,
                         "finish_reason": "length" if result.stats.finish_reason == "length" else "stop"}],
            "usage": usage(result.stats)}


class CompletionChunks:
    """The chunks of one streamed completion: the echoed prompt (if asked for), the text, the finish."""

    def __init__(self, request: CompletionRequest, echoed: str = ""):
        self.request = request
        self.echoed = echoed
        self.id = new_id("cmpl")
        self.created = int(time.time())

    def _text(self, text: str, finish: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.request.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    def start(self) -> Frames:
        return [(None, self._text(self.echoed))] if self.echoed else []

    def delta(self, channel: str, text: str) -> Frames:
        return [(None, self._text(text))] if channel == "content" else []

    def end(self, result: TurnResult) -> Frames:
        finish = self._text("", "length" if result.stats.finish_reason == "length" else "stop")
        return _closing([finish], self.request.include_usage, {**self._text(""), "choices": []}, result)
