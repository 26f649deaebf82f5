"""Model-output parsing: the streaming parser, `parse_completion` and the official parser agree.

Regression tests for specific defects, then a seeded differential test: adversarial completions
are fed to `StreamingOutputParser` in random-sized pieces (down to one character at a time) and
compared with `parse_completion` and, where it accepts them, the official parser.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from dsv4cli.chat import encoding as E
from dsv4cli.chat.encoding import EOS, THINK_END, OutputDelta, ParsedMessage, StreamingOutputParser, parse_completion
from tests.test_encoding import EOS_ID, ORACLE, THINK_END_ID, _mutate, _oracle_parse, needs_oracle

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _block(*calls: tuple[str, dict[str, Any]]) -> str:
    """The DSML tool-call block (with its leading blank line) for (name, arguments) pairs."""
    return E.render_tool_calls([(name, json.dumps(args, ensure_ascii=False)) for name, args in calls])


def _tokens(rng: random.Random, text: str, max_piece: int, special_text: bool = True) -> list[tuple[int, str]]:
    """Fake tokens: every `</think>` and a final EOS are special tokens, the rest random pieces.

    An EOS text anywhere else is spelled out in ordinary pieces (a real EOS token would have
    stopped generation). `special_text=False` mimics a detokenizer that skips special tokens.
    """
    body, final_eos = (text[: -len(EOS)], True) if text.endswith(EOS) else (text, False)
    tokens: list[tuple[int, str]] = []
    for k, part in enumerate(body.split(THINK_END)):
        if k:
            tokens.append((THINK_END_ID, THINK_END if special_text else ""))
        i = 0
        while i < len(part):
            size = rng.randint(1, max_piece)
            tokens.append((rng.randint(10, 100000), part[i : i + size]))
            i += size
    if final_eos:
        tokens.append((EOS_ID, EOS if special_text else ""))
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


def _assert_deltas_match(deltas: list[OutputDelta], final: ParsedMessage) -> None:
    """What was shown is exactly the final reasoning and content, reasoning first."""
    assert _joined(deltas, "reasoning") == final.reasoning_content
    assert _joined(deltas, "content") == final.content
    channels = [d.channel for d in deltas]
    assert channels == sorted(channels, key=lambda c: c != "reasoning")
    assert all(d.text for d in deltas)


def _fields(parsed: ParsedMessage) -> dict[str, Any]:
    return {"content": parsed.content, "reasoning_content": parsed.reasoning_content, "tool_calls": parsed.tool_calls}


def _official_fields(official: dict[str, Any]) -> dict[str, Any]:
    return {key: official[key] for key in ("content", "reasoning_content", "tool_calls")}


def _stream_text(text: str, mode: str, seed: int = 0, max_piece: int = 1) -> ParsedMessage:
    return _stream(_tokens(random.Random(seed), text, max_piece), thinking=mode == "thinking")[1]


# ---------------------------------------------------------------------------------------------
# Defect regressions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("special_text", [True, False])
def test_stream_keeps_think_end_inside_tool_arguments(special_text: bool) -> None:
    text = "plan</think>ok" + _block(("f", {"s": "x</think>y", "n": [THINK_END]})) + EOS
    deltas, final = _stream(_tokens(random.Random(1), text, 3, special_text), thinking=True)
    assert not final.malformed, final.problems
    assert final.tool_calls[0]["function"]["arguments"] == '{"s": "x</think>y", "n": ["</think>"]}'
    assert final == parse_completion(text, "thinking")
    _assert_deltas_match(deltas, final)
    if ORACLE is not None:
        assert _fields(final) == _official_fields(ORACLE.parse_message_from_completion_text(text, "thinking"))


def test_stream_keeps_think_end_in_the_answer_like_parse_completion() -> None:
    text = f"hi{THINK_END} there{EOS}"
    for mode in ("chat", "thinking"):
        full = ("r" + THINK_END + text) if mode == "thinking" else text
        deltas, final = _stream(_tokens(random.Random(2), full, 2), thinking=mode == "thinking")
        assert final == parse_completion(full, mode)
        assert final.content == f"hi{THINK_END} there" and final.malformed
        _assert_deltas_match(deltas, final)


@pytest.mark.parametrize("blank_line", [True, False])
def test_tool_call_inside_unclosed_reasoning_is_recovered_by_both_parsers(blank_line: bool) -> None:
    block = _block(("get_weather", {"city": "Paris"}))
    text = "hmm, let me check" + (block if blank_line else block[2:]) + EOS
    parsed = parse_completion(text, "thinking")
    for max_piece in (1, 4, 1000):
        deltas, streamed = _stream(_tokens(random.Random(max_piece), text, max_piece), thinking=True)
        assert streamed == parsed
        _assert_deltas_match(deltas, streamed)
        assert all(E.DSML not in d.text for d in deltas), "raw DSML must never be shown"
    assert parsed.reasoning_content == "hmm, let me check" and parsed.content == ""
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["get_weather"]
    assert parsed.malformed and any("before </think>" in p for p in parsed.problems)
    if ORACLE is not None:
        assert _oracle_parse(text, "thinking") is None  # upstream rejects it; we recover and flag


def test_stream_tool_call_in_reasoning_then_think_end() -> None:
    text = "r" + _block(("f", {"a": 1})) + THINK_END + "late" + EOS
    assert _stream_text(text, "thinking") == parse_completion(text, "thinking")
    assert parse_completion(text, "thinking").malformed


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_eos_text_inside_tool_arguments_is_argument_text(mode: str) -> None:
    args = {"s": f"a{EOS}b", EOS: [EOS]}
    text = ("r</think>" if mode == "thinking" else "") + "ok" + _block((f"f{EOS}", args)) + EOS
    parsed = parse_completion(text, mode)
    assert not parsed.malformed, parsed.problems
    assert json.loads(parsed.tool_calls[0]["function"]["arguments"]) == args
    assert parsed.tool_calls[0]["function"]["name"] == f"f{EOS}"
    assert _stream_text(text, mode, max_piece=5) == parsed
    assert parse_completion(text.removesuffix(EOS), mode) == parsed
    if ORACLE is not None:
        assert _fields(parsed) == _official_fields(ORACLE.parse_message_from_completion_text(text, mode))


def test_eos_ends_an_unclosed_tool_block() -> None:
    """Generation that stops inside a block: the text ends with EOS, the stream with the EOS token."""
    block = _block(("f", {"s": "abc", "t": "d"}))
    cut = block[: block.index("abc") + 3]
    for text in (cut + EOS, cut + EOS + "junk"):
        parsed = parse_completion(text, "chat")
        assert json.loads(parsed.tool_calls[0]["function"]["arguments"]) == {"s": "abc"}
        assert parsed.malformed
        tokens = [(5, cut), (EOS_ID, EOS), *([(6, "junk")] if text.endswith("junk") else [])]
        assert _stream(tokens, thinking=False)[1] == parsed


def test_eos_after_a_closed_tool_block_ends_the_message() -> None:
    text = "ok" + _block(("f", {})) + EOS + "junk"
    parsed = parse_completion(text, "chat")
    assert parsed.tool_calls and parsed.malformed
    assert parsed.problems == ["text after the end-of-sentence token: 'junk'"]
    assert _stream([(5, text[: -len(EOS + "junk")]), (EOS_ID, EOS), (6, "junk")], thinking=False)[1] == parsed


def test_eos_token_text_with_pending_prefix_is_not_lost() -> None:
    parser = StreamingOutputParser(think_end_id=THINK_END_ID, eos_id=EOS_ID, thinking=True)
    shown = parser.feed(5, "a") + parser.feed(THINK_END_ID, "\ufffd" + THINK_END)
    shown += parser.feed(6, "b") + parser.feed(EOS_ID, "\ufffd" + EOS)
    assert shown == [OutputDelta("reasoning", "a"), OutputDelta("reasoning", "\ufffd"),
                     OutputDelta("content", "b"), OutputDelta("content", "\ufffd")]
    assert parser.finish() == parse_completion(f"a\ufffd{THINK_END}b\ufffd{EOS}", "thinking")


# ---------------------------------------------------------------------------------------------
# Tool-call ids (encoder)
# ---------------------------------------------------------------------------------------------


def _with_call_id(call_id: Any, where: str = "id") -> list[dict[str, Any]]:
    call: dict[str, Any] = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    if where == "id":
        call["id"] = call_id
    else:
        call["function"]["id"] = call_id
    return [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
        {"role": "tool", "tool_call_id": "b", "content": "B"},
    ]


@pytest.mark.parametrize("call_id", [["x"], {"k": 1}, {1, 2}, ("t", ["nested"])])
@pytest.mark.parametrize("where", ["id", "function.id"])
def test_unhashable_tool_call_id_raises_value_error(call_id: Any, where: str) -> None:
    for mode in ("chat", "thinking"):
        with pytest.raises(ValueError, match="tool call id"):
            E.encode_messages(_with_call_id(call_id, where), mode)
    if ORACLE is not None:
        with pytest.raises(TypeError):  # upstream fails too, with a TypeError
            ORACLE.encode_messages(_with_call_id(call_id, where), "chat")


@pytest.mark.parametrize("tool_calls", [5, True, 2.5])
def test_non_iterable_tool_calls_raise_value_error(tool_calls: Any) -> None:
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": tool_calls}]
    with pytest.raises(ValueError, match="tool_calls"):
        E.encode_messages(msgs, "chat")
    if ORACLE is not None:
        with pytest.raises(TypeError):
            ORACLE.encode_messages(msgs, "chat")


@needs_oracle
@pytest.mark.parametrize("call_id", [7, ("t", 1), "", [], 0])
def test_hashable_or_empty_non_string_ids_encode_like_upstream(call_id: Any) -> None:
    for mode in ("chat", "thinking"):
        assert E.encode_messages(_with_call_id(call_id), mode) == ORACLE.encode_messages(_with_call_id(call_id), mode)


# ---------------------------------------------------------------------------------------------
# Differential test: streaming == parse_completion == official parser
# ---------------------------------------------------------------------------------------------

ADVERSARIAL = [
    THINK_END, E.THINK_START, EOS, E.BOS, E.DSML, E.TOOL_CALLS_OPEN, E.TOOL_CALLS_CLOSE, E.TOOL_CALLS_START,
    E.INVOKE_OPEN, E.INVOKE_CLOSE, E.PARAMETER_OPEN, E.PARAMETER_CLOSE, f"/{E.DSML}parameter", f"</{E.DSML}invoke",
    ' name="k" string="true">', "\n\n", "\n", ">\n", '"', "'", "<", ">", "\\", "{", "}", "é", "😀", "你好", " ",
]
PLAIN = ["hello", "x", "line\nline", "  ", "ünï", "2 < 3", "a<", "\n\n", '"q"', "😀", "{}", "[1]"]


def _adversarial_text(rng: random.Random, hostile: float, max_pieces: int = 5) -> str:
    pool = [ADVERSARIAL, PLAIN]
    return "".join(rng.choice(pool[rng.random() >= hostile]) for _ in range(rng.randint(0, max_pieces)))


def _argument_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.random()
    if kind < 0.55:
        return _adversarial_text(rng, hostile=0.6)
    if kind < 0.7 and depth < 2:
        return [_argument_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind < 0.8 and depth < 2:
        return {_adversarial_text(rng, 0.3, 2): _argument_value(rng, depth + 1) for _ in range(rng.randint(0, 2))}
    return rng.choice([0, -3, 2.5, True, False, None])


def _random_block(rng: random.Random) -> str:
    calls = []
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(["f", "get_weather", "天气", "a b"]) if rng.random() < 0.8 else _adversarial_text(rng, 0.5, 2)
        keys = [rng.choice(["s", "query", "键", "n"]) if rng.random() < 0.8 else _adversarial_text(rng, 0.3, 2)]
        keys += [f"k{i}" for i in range(rng.randint(0, 3))]
        calls.append((name, {key: _argument_value(rng) for key in keys}))
    return _block(*calls)


def _random_completion(rng: random.Random) -> tuple[str, str]:
    """(completion text, thinking mode): mostly well-formed, with adversarial strings everywhere."""
    mode = rng.choice(["thinking", "chat"])
    text = ""
    if mode == "thinking":
        text += _adversarial_text(rng, hostile=0.1) + (THINK_END if rng.random() < 0.9 else "")
    text += _adversarial_text(rng, hostile=0.1)
    if rng.random() < 0.65:
        text += _random_block(rng)
    if rng.random() < 0.1:
        text = text[: rng.randint(0, len(text))]
    if rng.random() < 0.15:
        text = _mutate(rng, text)
    if rng.random() < 0.9:
        text += EOS
    if rng.random() < 0.05:
        text += _adversarial_text(rng, hostile=0.5, max_pieces=2)
    return text, mode


def _check_case(rng: random.Random, text: str, mode: str) -> bool:
    """Compare the three parsers on one completion; True when the official parser accepted it."""
    official = _oracle_parse(text if text.endswith(EOS) else text + EOS, mode)
    parsed = parse_completion(text, mode)
    assert parsed.malformed == bool(parsed.problems)
    for max_piece in (1, rng.randint(2, 8), 10_000):
        deltas, streamed = _stream(_tokens(rng, text, max_piece, special_text=rng.random() < 0.7), mode == "thinking")
        _assert_deltas_match(deltas, streamed)
        assert streamed.malformed == bool(streamed.problems)
        if official is None:
            assert parsed.malformed and streamed.malformed, text
        if official is not None or EOS not in text.removesuffix(EOS):
            # Only an EOS spelled out in ordinary tokens (text to the stream, the end of the
            # message to parse_completion) may make them differ, and only on rejected output.
            assert streamed == parsed, text
    if official is None:
        return False
    if parsed.malformed:
        # Accepted upstream, flagged here: a non-JSON value in a string="false" parameter.
        assert all("not JSON" in p for p in parsed.problems), (text, parsed.problems)
        assert (parsed.content, parsed.reasoning_content) == (official["content"], official["reasoning_content"])
    else:
        assert _fields(parsed) == _official_fields(official), text
    return True


@needs_oracle
def test_stream_parse_completion_and_official_parser_agree() -> None:
    rng = random.Random(4242)
    accepted = rejected = 0
    for _ in range(600):
        text, mode = _random_completion(rng)
        if _check_case(rng, text, mode):
            accepted += 1
        else:
            rejected += 1
    assert accepted > 250 and rejected > 100, (accepted, rejected)


@needs_oracle
def test_official_parser_accepts_adversarial_arguments() -> None:
    """The generator really exercises `</think>`, EOS and DSML fragments inside accepted tool calls."""
    rng = random.Random(4242)
    seen = {THINK_END: 0, EOS: 0, E.DSML: 0}
    for _ in range(700):
        text, mode = _random_completion(rng)
        official = _oracle_parse(text if text.endswith(EOS) else text + EOS, mode)
        for call in official["tool_calls"] if official else []:
            for marker in seen:
                seen[marker] += marker in call["function"]["arguments"]
    assert min(seen.values()) > 20, seen


def test_streaming_never_raises_on_hostile_token_streams() -> None:
    rng = random.Random(77)
    for _ in range(400):
        thinking = rng.random() < 0.5
        parser = StreamingOutputParser(think_end_id=THINK_END_ID, eos_id=EOS_ID, thinking=thinking)
        for _ in range(rng.randint(0, 30)):
            token_id = rng.choice([THINK_END_ID, EOS_ID, 128825, 5])
            parser.feed(token_id, rng.choice([*ADVERSARIAL, "", None, 3]))  # type: ignore[arg-type]
        final = parser.finish()
        assert final.malformed == bool(final.problems)
