"""DeepSeek-V4 chat encoding and model-output parsing (spec section 4).

`encode_messages` turns an OpenAI-style message list into the prompt string the model was
trained on; its output is byte-for-byte what the official `encoding_dsv4.py` produces (spec
4.2-4.5). `parse_completion` turns generated text back into an assistant message (spec 4.6)
without ever raising: malformed output is recovered as far as possible and flagged.
`StreamingOutputParser` does the same incrementally, token by token, routing each text delta
to the "reasoning" or "content" channel and holding back raw DSML tool-call markup.
"""

from __future__ import annotations

import copy
import enum
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------------------------------
# Special strings (spec 4.1)
# ---------------------------------------------------------------------------------------------

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"

TASK_TOKENS: dict[str, str] = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

# DSML tool-call markup (spec 4.4).
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAMETER_OPEN = f"<{DSML}parameter"
PARAMETER_CLOSE = f"</{DSML}parameter>"
# What separates an answer from its tool-call block in model output (spec 4.6).
TOOL_CALLS_START = f"\n\n<{DSML}tool_calls"
_TOOL_CALLS_TAG = f"<{DSML}tool_calls"

REASONING_EFFORT_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

RESPONSE_FORMAT_HEADER = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
)

_TOOLS_HEADER = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools "
    f'by writing a "{TOOL_CALLS_OPEN}" block like the following:\n\n'
    f"{TOOL_CALLS_OPEN}\n"
    f'{INVOKE_OPEN} name="$TOOL_NAME">\n'
    f'{PARAMETER_OPEN} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_CLOSE}\n'
    "...\n"
    f"{INVOKE_CLOSE}\n"
    f'{INVOKE_OPEN} name="$TOOL_NAME2">\n'
    "...\n"
    f"{INVOKE_CLOSE}\n"
    f"{TOOL_CALLS_CLOSE}\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types '
    '(numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete "
    f"reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
_TOOLS_FOOTER = (
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)

THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")

# Recommended minimum context window for Think Max (model card, spec section 5).
MIN_CONTEXT_THINK_MAX = 384 * 1024

_USER_LIKE_ROLES = ("user", "developer")
# Roles `drop_thinking` never removes, even before the last user turn (spec 4.3).
_ALWAYS_KEPT_ROLES = ("user", "system", "tool", "latest_reminder", "direct_search_results")
# Only these roles may follow a message for it to get its generation prompt / task token.
_TRANSITION_ROLES = ("assistant", "latest_reminder")


# ---------------------------------------------------------------------------------------------
# Reasoning modes
# ---------------------------------------------------------------------------------------------


class ThinkMode(enum.Enum):
    """The three reasoning modes of the model card (spec section 5)."""

    NON_THINK = "non-think"
    THINK_HIGH = "think-high"
    THINK_MAX = "think-max"

    @property
    def thinking_mode(self) -> str:
        """The `thinking_mode` argument of `encode_messages`: "chat" or "thinking"."""
        return "chat" if self is ThinkMode.NON_THINK else "thinking"

    @property
    def reasoning_effort(self) -> str | None:
        """The `reasoning_effort` argument of `encode_messages`: None, "high" or "max"."""
        return {ThinkMode.NON_THINK: None, ThinkMode.THINK_HIGH: "high", ThinkMode.THINK_MAX: "max"}[self]

    def encode_kwargs(self) -> dict[str, Any]:
        """Keyword arguments selecting this mode in `encode_messages`."""
        return {"thinking_mode": self.thinking_mode, "reasoning_effort": self.reasoning_effort}

    @classmethod
    def parse(cls, value: str | ThinkMode) -> ThinkMode:
        """Parse "non-think|think-high|think-max" (and none/nothink/chat, high/think, max)."""
        if isinstance(value, ThinkMode):
            return value
        key = str(value).strip().lower().replace("_", "-").replace(" ", "-")
        mode = _THINK_MODE_ALIASES.get(key)
        if mode is None:
            raise ValueError(
                f"unknown reasoning mode {value!r}; expected one of non-think, think-high, think-max"
            )
        return mode


_THINK_MODE_ALIASES: dict[str, ThinkMode] = {
    "non-think": ThinkMode.NON_THINK,
    "nonthink": ThinkMode.NON_THINK,
    "nothink": ThinkMode.NON_THINK,
    "no-think": ThinkMode.NON_THINK,
    "none": ThinkMode.NON_THINK,
    "chat": ThinkMode.NON_THINK,
    "think-high": ThinkMode.THINK_HIGH,
    "high": ThinkMode.THINK_HIGH,
    "think": ThinkMode.THINK_HIGH,
    "thinking": ThinkMode.THINK_HIGH,
    "think-max": ThinkMode.THINK_MAX,
    "max": ThinkMode.THINK_MAX,
}


# ---------------------------------------------------------------------------------------------
# Encoding: small helpers
# ---------------------------------------------------------------------------------------------


def _to_json(value: Any) -> str:
    """JSON text as the model saw it: non-ASCII kept verbatim (spec 4.4)."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"value is not JSON-serialisable: {err}") from err


def _text(value: Any) -> str:
    """Render a field the way `str.format` would (None becomes "None", as upstream does)."""
    return f"{value}"


def _require_message(msg: Any) -> dict[str, Any]:
    if not isinstance(msg, dict):
        raise ValueError(f"each message must be a dict, got {type(msg).__name__}: {msg!r}")
    return msg


def _tool_functions(msg: dict[str, Any]) -> list[Any]:
    """The `function` objects of a message's OpenAI-style `tools` list (empty if none)."""
    tools = msg.get("tools")
    if not tools:
        return []
    try:
        return [tool["function"] for tool in tools]
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(f"tools must be a list of {{'type': 'function', 'function': ...}}: {tools!r}") from err


def _call_specs(msg: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(name, arguments) of each OpenAI-style tool call of a message (empty if none)."""
    calls = msg.get("tool_calls")
    if not calls:
        return []
    try:
        return [(call["function"]["name"], call["function"]["arguments"]) for call in calls]
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(
            f"tool_calls entries need function.name and function.arguments: {calls!r}"
        ) from err


def _call_id(call: Any) -> Any:
    """The id used to order tool results: `id`, else `function.id`, else "".

    Any hashable id works, as upstream; a non-empty unhashable one (a list, a dict) raises
    ValueError where upstream fails with TypeError.
    """
    if not isinstance(call, dict):
        raise ValueError(f"tool call must be a dict, got {call!r}")
    ident = call.get("id")
    if not ident:
        function = call.get("function", {})
        if not isinstance(function, dict):
            raise ValueError(f"tool call function must be a dict, got {function!r}")
        ident = function.get("id", "")
    if ident and not _is_hashable(ident):
        raise ValueError(f"tool call id must be a string or another hashable value, got {ident!r}")
    return ident


def _is_hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _iter_calls(calls: Any) -> Iterable[Any]:
    """A message's `tool_calls` as an iterable; ValueError if it is not one (upstream: TypeError)."""
    try:
        return iter(calls)
    except TypeError as err:
        raise ValueError(f"tool_calls must be a list of tool calls, got {calls!r}") from err


def _last_user_index(msgs: Sequence[dict[str, Any]]) -> int:
    """Index of the last `user`/`developer` message, or -1 (spec 4.3)."""
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i].get("role") in _USER_LIKE_ROLES:
            return i
    return -1


# ---------------------------------------------------------------------------------------------
# Encoding: preprocessing (spec 4.2 `tool`, 4.3)
# ---------------------------------------------------------------------------------------------


def _merge_tool_results(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """Fold `tool` messages (and consecutive user texts) into user turns with content blocks.

    A tool result starts a new user turn or extends the user turn just before it; a user text
    extends the previous user turn unless that one carries a `task`. Inputs are deep-copied.
    """
    merged: list[dict[str, Any]] = []
    for original in messages:
        msg = copy.deepcopy(_require_message(original))
        role = msg.get("role")
        previous_is_user = bool(merged) and merged[-1].get("role") == "user"
        if role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": msg.get("tool_call_id", ""),
                "content": msg.get("content", ""),
            }
            if previous_is_user:
                merged[-1]["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": msg.get("content", "")}
            if previous_is_user and merged[-1].get("task") is None:
                merged[-1]["content_blocks"].append(block)
            else:
                turn = {"role": "user", "content": msg.get("content", ""), "content_blocks": [block]}
                turn.update({key: msg[key] for key in ("task", "wo_eos", "mask") if key in msg})
                merged.append(turn)
        else:
            merged.append(msg)
    return merged


def _order_tool_results(messages: Sequence[Any]) -> list[Any]:
    """Reorder each user turn's tool results by the call order of the latest tool-calling turn.

    Text blocks keep their slots; results with unknown ids sort as if they were call 0.
    Returns a new list; messages whose blocks move are shallow-copied.
    """
    call_order: dict[Any, int] = {}
    ordered: list[Any] = []
    for msg in messages:
        _require_message(msg)
        role = msg.get("role")
        if role == "assistant" and msg.get("tool_calls"):
            call_order = {}
            for position, call in enumerate(_iter_calls(msg["tool_calls"])):
                ident = _call_id(call)
                if ident:
                    call_order[ident] = position
        elif role == "user" and msg.get("content_blocks"):
            msg = _with_sorted_results(msg, call_order)
        ordered.append(msg)
    return ordered


def _with_sorted_results(msg: dict[str, Any], call_order: dict[Any, int]) -> dict[str, Any]:
    blocks = msg["content_blocks"]
    for block in blocks:
        if not isinstance(block, dict):
            raise ValueError(f"content block must be a dict, got {block!r}")
    results = [b for b in blocks if b.get("type") == "tool_result"]
    if len(results) < 2 or not call_order:
        return msg
    try:
        queue = iter(sorted(results, key=lambda b: call_order.get(b.get("tool_use_id", ""), 0)))
    except TypeError as err:
        raise ValueError(f"tool_call_id values must be hashable: {err}") from err
    new_blocks = [next(queue) if b.get("type") == "tool_result" else b for b in blocks]
    return {**msg, "content_blocks": new_blocks}


def _drop_stale_turns(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply `drop_thinking` (spec 4.3) to a merged message list.

    Before the last user/developer turn: assistants lose `reasoning_content`, and every role
    other than user/system/tool/latest_reminder/direct_search_results is removed.
    """
    last_user = _last_user_index(messages)
    kept: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if i >= last_user or role in _ALWAYS_KEPT_ROLES:
            kept.append(msg)
        elif role == "assistant":
            kept.append({k: v for k, v in msg.items() if k != "reasoning_content"})
    return kept


# ---------------------------------------------------------------------------------------------
# Encoding: rendering one turn (spec 4.2, 4.4, 4.5)
# ---------------------------------------------------------------------------------------------


def render_tools(functions: Sequence[Any]) -> str:
    """The "## Tools" section listing one JSON schema per line (spec 4.4)."""
    return _TOOLS_HEADER + "\n".join(_to_json(f) for f in functions) + _TOOLS_FOOTER


def _instructions_suffix(msg: dict[str, Any]) -> str:
    """Tools and response-format sections appended to system/developer text (spec 4.2)."""
    suffix = ""
    functions = _tool_functions(msg)
    if functions:
        suffix += "\n\n" + render_tools(functions)
    if msg.get("response_format"):
        suffix += "\n\n" + RESPONSE_FORMAT_HEADER + _to_json(msg["response_format"])
    return suffix


def _render_system(msg: dict[str, Any]) -> str:
    """System text goes raw after BOS: there is no system token (spec 4.1)."""
    return _text(msg.get("content") or "") + _instructions_suffix(msg)


def _render_developer(msg: dict[str, Any]) -> str:
    content = msg.get("content")
    if not content or not isinstance(content, str):
        raise ValueError(f"a developer message needs non-empty string content: {msg!r}")
    return USER + content + _instructions_suffix(msg)


def _render_tool_result(content: Any) -> str:
    if isinstance(content, list):
        pieces = []
        for part in content:
            if not isinstance(part, dict):
                raise ValueError(f"tool result parts must be dicts, got {part!r}")
            if part.get("type") == "text":
                pieces.append(_require_str(part.get("text", ""), "tool result text"))
            else:
                pieces.append(f"[Unsupported {part.get('type')}]")
        content = "\n\n".join(pieces)
    return f"<tool_result>{content}</tool_result>"


def _require_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}: {value!r}")
    return value


def _render_user(msg: dict[str, Any]) -> str:
    """User text and tool results, joined by blank lines (spec 4.2)."""
    blocks = msg.get("content_blocks")
    if not blocks:
        return USER + _text(msg.get("content") or "")
    pieces = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            pieces.append(_require_str(block.get("text", ""), "user message content"))
        elif kind == "tool_result":
            pieces.append(_render_tool_result(block.get("content", "")))
        else:
            pieces.append(f"[Unsupported {kind}]")
    return USER + "\n\n".join(pieces)


def _render_parameters(arguments: Any) -> str:
    """DSML parameter lines for a call's JSON `arguments` (spec 4.4).

    Arguments that are not a JSON string become a single `arguments` parameter.
    """
    try:
        parsed = json.loads(arguments)
    except Exception:
        parsed = {"arguments": arguments}
    if not isinstance(parsed, dict):
        raise ValueError(f"tool call arguments must be a JSON object, got {arguments!r}")
    lines = []
    for key, value in parsed.items():
        is_string = isinstance(value, str)
        rendered = value if is_string else _to_json(value)
        flag = "true" if is_string else "false"
        lines.append(f'{PARAMETER_OPEN} name="{key}" string="{flag}">{rendered}{PARAMETER_CLOSE}')
    return "\n".join(lines)


def render_tool_calls(calls: Sequence[tuple[Any, Any]]) -> str:
    """The DSML block for (name, arguments-JSON) pairs, with its leading blank line (spec 4.4)."""
    invokes = [
        f'{INVOKE_OPEN} name="{name}">\n{_render_parameters(arguments)}\n{INVOKE_CLOSE}'
        for name, arguments in calls
    ]
    return "\n\n" + TOOL_CALLS_OPEN + "\n" + "\n".join(invokes) + "\n" + TOOL_CALLS_CLOSE


def _render_assistant(msg: dict[str, Any], calls: list[tuple[Any, Any]], show_reasoning: bool) -> str:
    """`{reasoning</think>}{content}{tool calls}{EOS}`; no `<think>` here (spec 4.2)."""
    reasoning = _text(msg.get("reasoning_content") or "") + THINK_END if show_reasoning else ""
    tool_block = render_tool_calls(calls) if calls else ""
    end = "" if msg.get("wo_eos", False) else EOS
    return reasoning + _text(msg.get("content") or "") + tool_block + end


@dataclass(frozen=True)
class _RenderOptions:
    thinking: bool
    keep_all_reasoning: bool
    reasoning_effort: str | None


def _render_turn(messages: Sequence[dict[str, Any]], index: int, opts: _RenderOptions) -> str:
    """One message plus what follows it: generation prompt or task token (spec 4.2, 4.5)."""
    msg = messages[index]
    role = msg.get("role")
    last_user = _last_user_index(messages)
    _tool_functions(msg)  # upstream validates these on every rendered message
    calls = _call_specs(msg)

    out = REASONING_EFFORT_MAX_PREFIX if index == 0 and opts.thinking and opts.reasoning_effort == "max" else ""
    if role == "system":
        out += _render_system(msg)
    elif role == "developer":
        out += _render_developer(msg)
    elif role == "user":
        out += _render_user(msg)
    elif role == "latest_reminder":
        out += LATEST_REMINDER + _text(msg.get("content"))
    elif role == "assistant":
        follows_task = index > 0 and messages[index - 1].get("task") is not None
        show = opts.thinking and not follows_task and (opts.keep_all_reasoning or index > last_user)
        out += _render_assistant(msg, calls, show)
    else:
        raise ValueError(f"unknown message role {role!r} (tool messages are merged into user turns)")
    return out + _transition(messages, index, last_user, opts)


def _transition(messages: Sequence[dict[str, Any]], index: int, last_user: int, opts: _RenderOptions) -> str:
    """Task token, or `<｜Assistant｜>` + `<think>`/`</think>` after a user turn (spec 4.2, 4.5)."""
    if index + 1 < len(messages) and messages[index + 1].get("role") not in _TRANSITION_ROLES:
        return ""
    msg = messages[index]
    task = msg.get("task")
    if task is not None:
        if not isinstance(task, str) or task not in TASK_TOKENS:
            raise ValueError(f"invalid task {task!r}; valid tasks are {sorted(TASK_TOKENS)}")
        if task != "action":
            return TASK_TOKENS[task]
        return ASSISTANT + (THINK_START if opts.thinking else THINK_END) + TASK_TOKENS["action"]
    if msg.get("role") in _USER_LIKE_ROLES:
        opens_reasoning = opts.thinking and (opts.keep_all_reasoning or index >= last_user)
        return ASSISTANT + (THINK_START if opens_reasoning else THINK_END)
    return ""


# ---------------------------------------------------------------------------------------------
# Encoding: entry point
# ---------------------------------------------------------------------------------------------


def encode_messages(
    messages: Sequence[dict[str, Any]],
    thinking_mode: str,
    context: Sequence[dict[str, Any]] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
    reasoning_effort: str | None = None,
) -> str:
    """Encode a conversation into the DeepSeek-V4 prompt string (spec 4.2-4.5).

    `thinking_mode` is "chat" or "thinking"; `reasoning_effort` is None, "high" (same output as
    None) or "max" (adds the Think-Max preamble at the very start, thinking mode only).
    `context` holds earlier messages whose encoding is already in the KV cache: only `messages`
    are rendered, but they are rendered as if preceded by `context` (no BOS then).
    `drop_thinking` removes reasoning of turns before the last user turn; it is ignored when any
    message defines `tools`. Raises ValueError for inputs the official encoder rejects.
    """
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be None, 'high' or 'max', got {reasoning_effort!r}")
    if messages is None:
        raise ValueError("messages must be a list of dicts, got None")
    earlier = [_require_message(m) for m in (context or [])]

    # Tool results are ordered with the whole history in view, context included.
    current = _order_tool_results(earlier + _merge_tool_results(messages))[len(earlier) :]
    earlier = _order_tool_results(_merge_tool_results(earlier))
    history = earlier + current

    thinking = thinking_mode == "thinking"
    drop = bool(drop_thinking) and not any(m.get("tools") for m in history)
    if thinking and drop:
        history = _drop_stale_turns(history)
        first = len(_drop_stale_turns(earlier))
    else:
        first = len(earlier)

    opts = _RenderOptions(thinking=thinking, keep_all_reasoning=not drop, reasoning_effort=reasoning_effort)
    prompt = BOS if add_default_bos_token and not earlier else ""
    return prompt + "".join(_render_turn(history, i, opts) for i in range(first, len(history)))


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether generation starts inside a reasoning block (the prompt ends with `<think>`)."""
    return prompt.endswith(THINK_START)


# ---------------------------------------------------------------------------------------------
# Parsing model output (spec 4.6)
# ---------------------------------------------------------------------------------------------


@dataclass
class ParsedMessage:
    """An assistant message recovered from model output.

    `tool_calls` are OpenAI-style `{"type": "function", "function": {"name", "arguments"}}`
    with `arguments` a JSON string. `malformed` is True when the output broke the format;
    `problems` then says how, in words.
    """

    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    malformed: bool = False
    problems: list[str] = field(default_factory=list)

    def to_message(self) -> dict[str, Any]:
        """The assistant message dict, ready to append to a conversation."""
        return {
            "role": "assistant",
            "content": self.content,
            "reasoning_content": self.reasoning_content,
            "tool_calls": copy.deepcopy(self.tool_calls),
        }


_LEAK_CHECKED_TOKENS = (BOS, EOS, THINK_START, THINK_END, DSML)
_INVOKE_HEADER = re.compile(r'\s*name="(.*?)">\n\n?', re.DOTALL)
_PARAMETER = re.compile(r' name="(.*?)" string="(true|false)">(.*?)<\n?', re.DOTALL)
_LOOSE_NAME = re.compile(r'name="([^"]*)"')
_LOOSE_PARAMETER = re.compile(r'\s*name="(.*?)"(?:\s+string="([^"]*)")?\s*>(.*?)<?\n?', re.DOTALL)
_PARAMETER_END = f"/{DSML}parameter"
_INVOKE_END = f"</{DSML}invoke"


def _snippet(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _resolve_thinking(thinking_mode: Any) -> bool:
    if isinstance(thinking_mode, ThinkMode):
        return thinking_mode is not ThinkMode.NON_THINK
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    return thinking_mode == "thinking"


def _find_tool_block(text: str) -> tuple[int, int, bool] | None:
    """Locate the first tool-call block: (start of answer tail, start of tag, blank line before)."""
    tag = text.find(_TOOL_CALLS_TAG)
    if tag < 0:
        return None
    if text.endswith("\n\n", 0, tag):
        return tag - 2, tag, True
    return tag, tag, False


def _leak_problems(text: str, where: str) -> list[str]:
    return [f"special token {tok} leaked into the {where}" for tok in _LEAK_CHECKED_TOKENS if tok in text]


class _Cursor:
    """A read position in a string with 'read until the nearest of these markers'."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    @property
    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def rest(self) -> str:
        return self.text[self.pos :]

    def read_until(self, *markers: str) -> tuple[str, str | None]:
        """Text up to the nearest marker (consumed too) and that marker; rest and None if absent."""
        best_at, best = len(self.text), None
        for marker in markers:
            at = self.text.find(marker, self.pos)
            if 0 <= at < best_at:
                best_at, best = at, marker
        chunk = self.text[self.pos : best_at]
        self.pos = best_at + (len(best) if best else 0)
        return chunk, best


def _parse_parameter(chunk: str, problems: list[str]) -> tuple[str, str, bool] | None:
    """(name, raw value, is_string) of one `<｜DSML｜parameter…<` chunk, recovering if loose."""
    strict = _PARAMETER.fullmatch(chunk)
    if strict:
        return strict.group(1), strict.group(3), strict.group(2) == "true"
    problems.append(f"malformed tool-call parameter {_snippet(chunk)}")
    loose = _LOOSE_PARAMETER.fullmatch(chunk)
    if not loose:
        return None
    name, flag, value = loose.group(1), loose.group(2), loose.group(3)
    is_string = flag == "true" or (flag != "false" and not _is_json(value))
    return name, value, is_string


def _arguments_json(params: list[tuple[str, str, bool]], call_name: str, problems: list[str]) -> str:
    """The JSON `arguments` string: string values quoted, others inserted as written (spec 4.6)."""
    pieces = []
    for name, value, is_string in params:
        if not is_string and not _is_json(value):
            problems.append(f"parameter {name!r} of {call_name!r} is marked non-string but is not JSON")
            is_string = True
        pieces.append(f"{_to_json(name)}: {_to_json(value) if is_string else value}")
    return "{" + ", ".join(pieces) + "}"


def _parse_invoke(cursor: _Cursor, problems: list[str]) -> dict[str, Any] | None:
    """One `<｜DSML｜invoke …>` … `</｜DSML｜invoke` (opening tag already consumed)."""
    header, stop = cursor.read_until(PARAMETER_OPEN, _INVOKE_END)
    strict = _INVOKE_HEADER.fullmatch(header)
    if strict:
        name: str | None = strict.group(1)
    else:
        problems.append(f"malformed invoke tag {_snippet(header)}")
        loose = _LOOSE_NAME.search(header)
        name = loose.group(1) if loose else None
    params: list[tuple[str, str, bool]] = []
    seen: set[str] = set()
    while stop == PARAMETER_OPEN:
        chunk, param_stop = cursor.read_until(_PARAMETER_END)
        param = _parse_parameter(chunk, problems)
        if param is not None and param[0] in seen:
            problems.append(f"duplicate parameter {param[0]!r} in call to {name!r} (kept the first)")
        elif param is not None:
            seen.add(param[0])
            params.append(param)
        if param_stop is None:
            stop = None
            break
        separator, stop = cursor.read_until(PARAMETER_OPEN, _INVOKE_END)
        if separator != ">\n":
            problems.append(f"unexpected text {_snippet(separator)} after a tool-call parameter")
    if stop is None:
        problems.append(f"tool call {name!r} is truncated (no closing invoke tag)")
    if name is None:
        problems.append("skipped a tool call without a name")
        return None
    return {"type": "function", "function": {"name": name, "arguments": _arguments_json(params, name, problems)}}


def _parse_tool_block(body: str, problems: list[str]) -> tuple[list[dict[str, Any]], str, bool]:
    """Tool calls from the text after `<｜DSML｜tool_calls` (spec 4.4 grammar, tolerant).

    Returns the calls, the text after the closing tag and whether there was one.
    """
    cursor = _Cursor(body)
    calls: list[dict[str, Any]] = []
    while not cursor.at_end:
        gap, stop = cursor.read_until(INVOKE_OPEN, TOOL_CALLS_CLOSE)
        if gap != ">\n":
            problems.append(f"unexpected text {_snippet(gap)} between tool-call tags")
        if stop == TOOL_CALLS_CLOSE:
            return calls, cursor.rest(), True
        if stop is None:
            break
        call = _parse_invoke(cursor, problems)
        if call is not None:
            calls.append(call)
    problems.append("tool-call block is not closed (output truncated?)")
    return calls, cursor.rest(), False


def _parse_tool_section(body: str, eos_ends: bool) -> tuple[list[dict[str, Any]], list[str], str]:
    """Calls, problems and the text after EOS, from the text after a tool-call tag.

    With `eos_ends`, an EOS in a block that closes after it is argument text, as upstream
    reads it; a block that never closes ends at its first EOS, where generation stopped.
    """
    problems: list[str] = []
    calls, rest, closed = _parse_tool_block(body, problems)
    if eos_ends and not closed and EOS in body:
        body, _, after_eos = body.partition(EOS)
        problems = []
        calls, _, _ = _parse_tool_block(body, problems)
        return calls, problems, after_eos
    after_eos = ""
    if eos_ends:
        rest, _, after_eos = rest.partition(EOS)
    if rest:
        problems.append(f"unexpected text {_snippet(rest)} after the tool-call block")
    return calls, problems, after_eos


def _parse_answer(text: str, eos_ends: bool) -> tuple[str, list[dict[str, Any]], list[str], str]:
    """Split the post-reasoning text into content, tool calls, problems and the text after EOS.

    With `eos_ends` (a whole completion), EOS ends the message unless it lies inside a
    tool-call block; otherwise (a token stream, where the EOS token ended it) it is text.
    """
    found = _find_tool_block(text)
    end = text.find(EOS) if eos_ends else -1
    if end >= 0 and (found is None or end < found[0]):
        return text[:end], [], [], text[end + len(EOS) :]
    if found is None:
        return text, [], [], ""
    content_end, tag, blank_line = found
    problems = [] if blank_line else ["tool-call block is not preceded by a blank line"]
    calls, block_problems, after_eos = _parse_tool_section(text[tag + len(_TOOL_CALLS_TAG) :], eos_ends)
    return text[:content_end], calls, problems + block_problems, after_eos


_MISSING_THINK_END = "missing </think>: the reasoning never finished"
_TOOLS_IN_REASONING = "tool-call block started before </think>"


def _split_reasoning(text: str) -> tuple[str, str, list[str]]:
    """Reasoning up to `</think>`, and the rest (spec 4.6).

    A tool-call block also ends the reasoning (upstream stops there too, then rejects the
    output; we recover the calls), and so does EOS, which then starts the rest.
    """
    block = _find_tool_block(text)
    ends = [(text.find(THINK_END), THINK_END), (block[0] if block else -1, _TOOL_CALLS_TAG), (text.find(EOS), EOS)]
    found = [(at, marker) for at, marker in ends if at >= 0]
    if not found:
        return text, "", [_MISSING_THINK_END]
    at, marker = min(found)
    if marker == THINK_END:
        return text[:at], text[at + len(THINK_END) :], []
    return text[:at], text[at:], [_TOOLS_IN_REASONING if marker == _TOOL_CALLS_TAG else _MISSING_THINK_END]


def _trailing_problems(trailing: str) -> list[str]:
    return [f"text after the end-of-sentence token: {_snippet(trailing)}"] if trailing else []


def _finalize(
    reasoning: str, answer: str, problems: list[str], *, eos_ends: bool = False, trailing: str = ""
) -> ParsedMessage:
    """The message from split-off reasoning and answer text; `trailing` followed an EOS token."""
    content, calls, answer_problems, after_eos = _parse_answer(answer, eos_ends)
    problems = [
        *problems,
        *answer_problems,
        *_trailing_problems(after_eos or trailing),
        *_leak_problems(reasoning, "reasoning"),
        *_leak_problems(content, "content"),
    ]
    return ParsedMessage(
        content=content,
        reasoning_content=reasoning,
        tool_calls=calls,
        malformed=bool(problems),
        problems=problems,
    )


def _as_text(value: Any) -> str:
    """Model text as a string: None is empty, anything else not a string is `str()`-ed."""
    if isinstance(value, str):
        return value
    return "" if value is None else str(value)


def parse_completion(text: str, thinking_mode: str | ThinkMode) -> ParsedMessage:
    """Parse the text generated after a prompt into an assistant message (spec 4.6).

    `text` may end with EOS or not; EOS ends the message, except inside a tool-call block,
    where upstream reads it as argument text. Never raises on any string: on output the
    official parser accepts it returns the same content, reasoning and tool calls; otherwise
    it recovers what it can and sets `malformed` with human-readable `problems`. A tool-call
    block cut short is flagged even where the official parser accepts it.
    """
    thinking = _resolve_thinking(thinking_mode)
    text = _as_text(text)
    reasoning, answer, problems = _split_reasoning(text) if thinking else ("", text, [])
    return _finalize(reasoning, answer, problems, eos_ends=True)


# ---------------------------------------------------------------------------------------------
# Streaming (spec 4.6, incremental)
# ---------------------------------------------------------------------------------------------

REASONING_CHANNEL = "reasoning"
CONTENT_CHANNEL = "content"


@dataclass(frozen=True)
class OutputDelta:
    """A piece of generated text and the channel it belongs to ("reasoning" or "content")."""

    channel: str
    text: str


def _partial_tag_length(text: str) -> int:
    """Length of the longest suffix of `text` that could still grow into a tool-call tag."""
    longest = 0
    for tag in (TOOL_CALLS_START, _TOOL_CALLS_TAG):
        for size in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:size]):
                longest = size
                break
    return longest


class _TagWatch:
    """Holds back streamed text while it could still grow into a DSML tool-call tag."""

    def __init__(self) -> None:
        self.held = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """(text now known not to start a tool-call block, the block's text if one began)."""
        self.held += text
        found = _find_tool_block(self.held)
        if found is not None:
            safe, block = self.held[: found[0]], self.held[found[0] :]
            self.held = ""
            return safe, block
        cut = len(self.held) - _partial_tag_length(self.held)
        safe, self.held = self.held[:cut], self.held[cut:]
        return safe, None

    def take(self) -> str:
        """Everything held back: the stream or the reasoning ended."""
        held, self.held = self.held, ""
        return held


class StreamingOutputParser:
    """Route streamed tokens to the reasoning or content channel (spec 4.6).

    Reasoning switches to content exactly when the `think_end_id` token arrives and the
    `eos_id` token ends the message; both ids come from the tokenizer. After the reasoning a
    `</think>` token is text like any other (it may sit in a tool-call argument). Text that
    might be the start of a DSML tool-call block is held back until it is known not to be one;
    a real block is never emitted (its calls come from `finish()`), and one that starts inside
    the reasoning ends it. `finish()` returns what `parse_completion` returns for the same text.
    """

    def __init__(self, think_end_id: int, eos_id: int, thinking: bool) -> None:
        self.think_end_id = think_end_id
        self.eos_id = eos_id
        self.thinking = bool(thinking)
        self._channel = REASONING_CHANNEL if self.thinking else CONTENT_CHANNEL
        self._reasoning: list[str] = []
        self._answer: list[str] = []
        self._watch = _TagWatch()
        self._in_tool_block = False
        self._reasoning_problem = _MISSING_THINK_END if self.thinking else ""
        self._done = False
        self._trailing = ""

    @property
    def channel(self) -> str:
        """The channel the next ordinary text delta would go to."""
        return self._channel

    @property
    def done(self) -> bool:
        """True once the EOS token has arrived."""
        return self._done

    @property
    def in_tool_calls(self) -> bool:
        """True once a DSML tool-call block has started (a UI may show "calling tools…")."""
        return self._in_tool_block

    def feed(self, token_id: int, text_delta: str) -> list[OutputDelta]:
        """Consume one generated token and its decoded text; return the deltas now showable.

        A special token stands for its own text whether the detokenizer gave it or skipped it;
        text the detokenizer gives before it (a pending character) comes first.
        """
        text = _as_text(text_delta)
        marker = self._special_text(token_id)
        before = text.removesuffix(marker) if marker else text
        if self._done:
            self._trailing += before + marker
            return []
        deltas = self._route(before)
        if marker == EOS:
            self._done = True
            return deltas + self.flush()
        if marker == THINK_END and self._channel == REASONING_CHANNEL:
            return deltas + self._end_reasoning()
        return deltas + self._route(marker) if marker else deltas

    def _special_text(self, token_id: int) -> str:
        if token_id == self.eos_id:
            return EOS
        return THINK_END if token_id == self.think_end_id else ""

    def _route(self, text: str) -> list[OutputDelta]:
        """Send ordinary text to the current channel, holding back what may start a tool-call block."""
        if self._in_tool_block:
            self._answer.append(text)
            return []
        safe, block = self._watch.push(text)
        deltas = self._emit(safe)
        if block is not None:
            self._start_tool_block(block)
        return deltas

    def _emit(self, text: str) -> list[OutputDelta]:
        if not text:
            return []
        (self._reasoning if self._channel == REASONING_CHANNEL else self._answer).append(text)
        return [OutputDelta(self._channel, text)]

    def _start_tool_block(self, block: str) -> None:
        """The rest of the message is a tool-call block; inside the reasoning, it ends it (flagged)."""
        if self._channel == REASONING_CHANNEL:
            self._channel = CONTENT_CHANNEL
            self._reasoning_problem = _TOOLS_IN_REASONING
        self._in_tool_block = True
        self._answer.append(block)

    def _end_reasoning(self) -> list[OutputDelta]:
        deltas = self._emit(self._watch.take())
        self._channel = CONTENT_CHANNEL
        self._reasoning_problem = ""
        return deltas

    def flush(self) -> list[OutputDelta]:
        """Release held-back text (end of stream); called automatically on EOS."""
        return self._emit(self._watch.take())

    def finish(self) -> ParsedMessage:
        """The whole message: reasoning, content, parsed tool calls and any problems."""
        self.flush()
        problems = [self._reasoning_problem] if self._reasoning_problem else []
        return _finalize("".join(self._reasoning), "".join(self._answer), problems, trailing=self._trailing)
