"""Anthropic's Messages API (`POST /v1/messages`): requests parsed into `ChatRequest`, and the reply as a
message with thinking, text and tool_use blocks, or as Anthropic's stream of events.

`thinking: {"type": "enabled", "budget_tokens": N}` selects think-high with that reasoning budget (think-max
with `output_config.effort: "max"`); without it the reply has no thinking, as in Anthropic's API.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from dsv4cli.chat.encoding import ThinkMode
from dsv4cli.engine.events import TurnResult
from dsv4cli.serve.errors import invalid
from dsv4cli.serve.fields import Fields
from dsv4cli.serve.requests import ChatRequest, ServeDefaults, requested_model, sampling_from, text_of, with_tools


# ------------------------------------------------------------------------------------------- requests
def parse_messages(data: Any, defaults: ServeDefaults) -> ChatRequest:
    body = Fields(data)
    model = requested_model(body, defaults)
    max_tokens = body.integer("max_tokens", minimum=1, required=True)
    raw = body.array("messages", required=True)
    if not raw:
        raise invalid("'messages' must hold at least one message", "messages")
    messages: list[dict[str, Any]] = []
    system = body.any("system")
    if system is not None:
        text = text_of(system, "system")
        if text:
            messages.append({"role": "system", "content": text})
    for i, message in enumerate(raw):
        messages += _message(message, f"messages[{i}]")
    tools = _tools(body)
    mode, budget = _mode(body)
    stops = body.array("stop_sequences", [])
    if not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise invalid("'stop_sequences' must be an array of up to 4 non-empty strings", "stop_sequences")
    sampling = sampling_from(body, defaults)
    body.object("metadata")
    return ChatRequest(model=model, messages=with_tools(messages, tools), mode=mode, sampling=sampling,
                       max_tokens=max_tokens, stop=tuple(stops), reasoning_budget=budget,
                       stream=body.boolean("stream", False), has_tools=bool(tools))


def _mode(body: Fields) -> tuple[ThinkMode, int | None]:
    thinking = body.object("thinking")
    effort = Fields(body.object("output_config", {}), "output_config").string("effort")
    if thinking is None:
        return ThinkMode.NON_THINK, None
    fields = Fields(thinking, "thinking")
    kind = fields.string("type", required=True, nullable=False)
    if kind == "disabled":
        return ThinkMode.NON_THINK, None
    if kind not in ("enabled", "adaptive"):
        raise invalid(f"'thinking.type' must be enabled, adaptive or disabled, got {kind!r}", "thinking.type")
    budget = fields.integer("budget_tokens", minimum=1, required=kind == "enabled")
    return (ThinkMode.THINK_MAX if effort == "max" else ThinkMode.THINK_HIGH), budget


def _message(data: Any, where: str) -> list[dict[str, Any]]:
    """One Anthropic message as the encoder's messages: a user turn's tool results become `tool` messages."""
    message = Fields(data, where)
    role = message.string("role", required=True, nullable=False)
    if role not in ("user", "assistant"):
        raise invalid(f"'{where}.role' must be user or assistant, got {role!r}", f"{where}.role")
    content = message.any("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise invalid(f"'{where}.content' must be a string or an array of content blocks", f"{where}.content")
    texts, reasoning, calls, results = [], [], [], []
    for j, data_block in enumerate(content):
        block = Fields(data_block, f"{where}.content[{j}]")
        kind = block.string("type", required=True, nullable=False)
        if kind == "text":
            texts.append(block.string("text", required=True, nullable=False))
        elif kind == "thinking" and role == "assistant":
            reasoning.append(block.string("thinking", "", nullable=True))
        elif kind == "redacted_thinking" and role == "assistant":
            continue
        elif kind == "tool_use" and role == "assistant":
            arguments = block.object("input", {})
            calls.append({"id": block.string("id", required=True, nullable=False), "type": "function",
                          "function": {"name": block.string("name", required=True, nullable=False),
                                       "arguments": json.dumps(arguments, ensure_ascii=False)}})
        elif kind == "tool_result" and role == "user":
            result = text_of(block.any("content"), block.name("content"))
            if block.boolean("is_error", False):
                result = f"Error: {result}"
            results.append({"role": "tool", "tool_call_id": block.string("tool_use_id", required=True,
                                                                         nullable=False), "content": result})
        else:
            raise invalid(f"'{block.name('type')}' {kind!r} is not supported in a {role} message "
                          "(this model reads text, tool_use and tool_result blocks)", block.name("type"))
    if role == "user":
        return results + ([{"role": "user", "content": "".join(texts)}] if texts or not results else [])
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if reasoning:
        out["reasoning_content"] = "".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return [out]


def _tools(body: Fields) -> list[dict[str, Any]] | None:
    checked = []
    for i, data in enumerate(body.array("tools", [])):
        tool = Fields(data, f"tools[{i}]")
        kind = tool.string("type")
        if kind not in (None, "custom"):
            raise invalid(f"'tools[{i}].type' {kind!r} is a server tool this server does not have", f"tools[{i}].type")
        function = {"name": tool.string("name", required=True, nullable=False)}
        description = tool.string("description")
        if description is not None:
            function["description"] = description
        function["parameters"] = tool.object("input_schema", {"type": "object", "properties": {}})
        checked.append({"type": "function", "function": function})
    choice = body.object("tool_choice")
    kind = Fields(choice, "tool_choice").string("type", required=True, nullable=False) if choice else "auto"
    if kind == "none":
        return None
    if kind != "auto":
        raise invalid("'tool_choice.type' must be auto or none: this server cannot force a tool call",
                      "tool_choice.type")
    return checked or None


# ------------------------------------------------------------------------------------------ responses
def stop_reason(result: TurnResult) -> str:
    if result.tool_calls:
        return "tool_use"
    if result.stats.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if result.stop_sequence is not None else "end_turn"


def usage(result: TurnResult) -> dict[str, Any]:
    stats = result.stats
    return {"input_tokens": stats.prompt_tokens - stats.cached_tokens, "output_tokens": stats.generated_tokens,
            "cache_read_input_tokens": stats.cached_tokens, "cache_creation_input_tokens": 0}


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    try:
        arguments = json.loads(call["function"]["arguments"])
    except ValueError:
        arguments = None
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call["function"]["name"],
            "input": arguments if isinstance(arguments, dict) else {}}


def message_response(result: TurnResult, request: ChatRequest) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if request.mode is not ThinkMode.NON_THINK and result.reasoning:
        content.append({"type": "thinking", "thinking": result.reasoning, "signature": ""})
    if result.content or not result.tool_calls:
        content.append({"type": "text", "text": result.content})
    content += [_tool_use(call) for call in result.tool_calls]
    return {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": request.model,
            "content": content, "stop_reason": stop_reason(result), "stop_sequence": result.stop_sequence,
            "usage": usage(result)}


class MessageEvents:
    """Anthropic's stream events for one message, as (event name, data) pairs."""

    def __init__(self, request: ChatRequest, prompt_tokens: int):
        self.request = request
        self.prompt_tokens = prompt_tokens
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self._index = -1
        self._open: str | None = None  # the type of the open content block

    def start(self) -> list[tuple[str, dict[str, Any]]]:
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.request.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0}}
        return [("message_start", {"type": "message_start", "message": message})]

    def _switch(self, kind: str, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        events = self._close()
        self._index += 1
        self._open = kind
        return [*events, ("content_block_start", {"type": "content_block_start", "index": self._index,
                                                  "content_block": block})]

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if self._open is None:
            return []
        events = []
        if self._open == "thinking":
            events.append(("content_block_delta", {"type": "content_block_delta", "index": self._index,
                                                   "delta": {"type": "signature_delta", "signature": ""}}))
        self._open = None
        return [*events, ("content_block_stop", {"type": "content_block_stop", "index": self._index})]

    def delta(self, channel: str, text: str) -> list[tuple[str, dict[str, Any]]]:
        kind = "thinking" if channel == "reasoning" else "text"
        events = []
        if self._open != kind:
            block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {
                "type": "text", "text": ""}
            events = self._switch(kind, block)
        delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" else {
            "type": "text_delta", "text": text}
        return [*events, ("content_block_delta", {"type": "content_block_delta", "index": self._index,
                                                  "delta": delta})]

    def end(self, result: TurnResult) -> list[tuple[str, dict[str, Any]]]:
        events = []
        if self._index < 0 and not result.tool_calls:
            events += self._switch("text", {"type": "text", "text": ""})
        for call in result.tool_calls:
            block = _tool_use(call)
            events += self._switch("tool_use", {**block, "input": {}})
            events.append(("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}}))
        events += self._close()
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": stop_reason(result),
                                                   "stop_sequence": result.stop_sequence},
                                         "usage": {"output_tokens": result.stats.generated_tokens,
                                                   "cache_read_input_tokens": result.stats.cached_tokens}}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events
