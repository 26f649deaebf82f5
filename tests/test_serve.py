"""`dsv4 serve` end to end: the real server on 127.0.0.1 with the demo model, driven by the official
`openai` and `anthropic` clients (and raw HTTP for the malformed requests)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import openai
import pexpect
import pytest

from dsv4cli.chat.encoding import DSML, EOS, THINK_END
from dsv4cli.engine.engine import Engine
from dsv4cli.runtime.open import open_model
from tests.servekit import EndlessEngine, HeldEngine, ScriptedEngine, start_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOOL_CALL = (f'Let me check.\n\n<{DSML}tool_calls>\n<{DSML}invoke name="get_weather">\n'
             f'<{DSML}parameter name="location" string="true">Paris, "France"</{DSML}parameter>\n'
             f'<{DSML}parameter name="days" string="false">3</{DSML}parameter>\n'
             f'</{DSML}invoke>\n</{DSML}tool_calls>{EOS}')
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["location"]}}}
QUESTION = [{"role": "user", "content": "What is 487 + 356?"}]


@pytest.fixture(scope="module")
def demo():
    with open_model(None) as opened:
        yield opened


@pytest.fixture(scope="module")
def server(demo):
    api = start_server(Engine(demo.model, max_context=2048, prompt_cache_bytes=1 << 28), demo.tokenizer)
    yield api
    api.stop()


def openai_client(api, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                         **kwargs)


def anthropic_client(api, **kwargs) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=api.url, api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def scripted(demo, reply: str, **kwargs):
    engine = ScriptedEngine(demo.tokenizer, reply)
    return engine, start_server(engine, demo.tokenizer, max_tokens=400, **kwargs)


# ------------------------------------------------------------------------------------- OpenAI chat
def test_chat_completion_returns_the_answer_and_its_reasoning(server):
    reply = openai_client(server).chat.completions.create(model="demo", messages=QUESTION)
    message = reply.choices[0].message
    assert "843" in message.content and message.reasoning_content  # DeepSeek's field, in think modes
    assert reply.choices[0].finish_reason == "stop" and reply.model == "demo"
    assert reply.usage.completion_tokens > 0 and reply.usage.completion_tokens_details.reasoning_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


@pytest.mark.parametrize("switch", [{"thinking": {"type": "disabled"}},
                                    {"chat_template_kwargs": {"thinking": False}},
                                    {"reasoning_effort": "none"}])
def test_non_think_requests_get_no_reasoning(server, switch):
    reply = openai_client(server).chat.completions.create(model="demo", messages=QUESTION, extra_body=switch)
    message = reply.choices[0].message
    assert message.content and getattr(message, "reasoning_content", None) is None


def test_the_request_fields_select_the_three_modes():
    from dsv4cli.chat.encoding import ThinkMode
    from dsv4cli.serve.fields import Fields
    from dsv4cli.serve.openai_api import chat_mode

    high, maxi, non = ThinkMode.THINK_HIGH, ThinkMode.THINK_MAX, ThinkMode.NON_THINK
    cases = [({}, high), ({"thinking": {"type": "enabled"}}, high), ({"reasoning_effort": "max"}, maxi),
             ({"thinking": {"type": "enabled"}, "reasoning_effort": "max"}, maxi),
             ({"thinking": {"type": "disabled"}, "reasoning_effort": "max"}, non),
             ({"chat_template_kwargs": {"thinking": True, "reasoning_effort": "max"}}, maxi),
             ({"chat_template_kwargs": {"enable_thinking": False}}, non), ({"reasoning_effort": "low"}, high)]
    for body, mode in cases:
        assert chat_mode(Fields(body), high) is mode, body
    assert chat_mode(Fields({}), non) is non and chat_mode(Fields({"thinking": {"type": "enabled"}}), non) is high


def test_streaming_gives_the_same_reply_in_deltas_with_usage(server):
    client = openai_client(server)
    whole = client.chat.completions.create(model="demo", messages=QUESTION).choices[0].message
    content, reasoning, finish, usage = [], [], None, None
    for chunk in client.chat.completions.create(model="demo", messages=QUESTION, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            finish = choice.finish_reason or finish
    assert "".join(content) == whole.content and "".join(reasoning) == whole.reasoning_content
    assert finish == "stop" and usage is not None and usage.completion_tokens > 0
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1  # the same prompt, just before


def test_the_next_turn_of_a_conversation_reuses_the_cached_prompt(server):
    client = openai_client(server)
    first = client.chat.completions.create(model="demo", messages=QUESTION).choices[0].message
    other = [{"role": "user", "content": "What is 12 + 30?"}]
    client.chat.completions.create(model="demo", messages=other)  # another conversation in between
    turn = [*QUESTION, {"role": "assistant", "content": first.content, "reasoning_content": first.reasoning_content},
            {"role": "user", "content": "What is 843 + 1?"}]
    usage = client.chat.completions.create(model="demo", messages=turn).usage
    assert usage.prompt_tokens_details.cached_tokens >= 10  # the first turn's prompt, past the other conversation


def test_stop_sequences_max_tokens_and_seeded_sampling(server):
    client = openai_client(server)
    plain = client.chat.completions.create(model="demo", messages=QUESTION, extra_body={"thinking": {
        "type": "disabled"}}).choices[0].message.content
    cut = client.chat.completions.create(model="demo", messages=QUESTION, stop=["+"],
                                         extra_body={"thinking": {"type": "disabled"}}).choices[0]
    assert "+" in plain and cut.message.content == plain[:plain.index("+")] and cut.finish_reason == "stop"
    short = client.chat.completions.create(model="demo", messages=QUESTION, max_completion_tokens=3).choices[0]
    assert short.finish_reason == "length"
    a, b = (client.chat.completions.create(model="demo", messages=QUESTION, temperature=1.0, seed=7)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


def test_two_concurrent_clients_get_their_own_answers(server):
    client = openai_client(server)
    questions = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in ((487, 356), (12, 30))]
    alone = [client.chat.completions.create(model="demo", messages=q).choices[0].message.content for q in questions]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda q: client.chat.completions.create(
            model="demo", messages=q).choices[0].message.content, questions))
    assert together == alone and "843" in alone[0] and "42" in alone[1]


def test_models_health_and_raw_completions(server):
    client = openai_client(server)
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert client.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    reply = client.completions.create(model="demo", prompt="12 + 30 =", max_tokens=5)
    assert reply.choices[0].text and reply.usage.completion_tokens <= 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="demo", prompt="12 + 30 =", max_tokens=5, stream=True) if c.choices)
    assert streamed == reply.choices[0].text
    status, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["cached_prefixes"] > 0


# ------------------------------------------------------------------------------------------ tools
def test_a_tool_call_round_trip_keeps_the_arguments_exactly(demo):
    engine, api = scripted(demo, TOOL_CALL)
    try:
        client = openai_client(api)
        asked = [{"role": "user", "content": "Weather in Paris?"}]
        reply = client.chat.completions.create(model="demo", messages=asked, tools=[WEATHER_TOOL],
                                               extra_body={"thinking": {"type": "disabled"}})
        choice = reply.choices[0]
        call = choice.message.tool_calls[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        assert json.loads(call.function.arguments) == {"location": 'Paris, "France"', "days": 3}
        assert "## Tools" in demo.tokenizer.decode(engine.prompts[-1]) and '"get_weather"' in demo.tokenizer.decode(
            engine.prompts[-1])
        streamed = {}
        for chunk in client.chat.completions.create(model="demo", messages=asked, tools=[WEATHER_TOOL], stream=True,
                                                    extra_body={"thinking": {"type": "disabled"}}):
            for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                entry = streamed.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
        assert streamed == {0: {"name": "get_weather", "arguments": call.function.arguments}}
        engine.reply = f"It is sunny.{EOS}"
        history = [*asked, choice.message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
        final = client.chat.completions.create(model="demo", messages=history, tools=[WEATHER_TOOL],
                                               extra_body={"thinking": {"type": "disabled"}})
        assert final.choices[0].message.content == "It is sunny."
        prompt = demo.tokenizer.decode(engine.prompts[-1])
        assert (f'<{DSML}parameter name="location" string="true">Paris, "France"</{DSML}parameter>\n'
                f'<{DSML}parameter name="days" string="false">3</{DSML}parameter>') in prompt
        assert "<tool_result>sunny, 21 C</tool_result>" in prompt
    finally:
        api.stop()


def test_reasoning_is_passed_back_on_tool_call_turns(demo):
    engine, api = scripted(demo, f"The weather tool knows.{THINK_END}{TOOL_CALL}")
    try:
        client = openai_client(api)
        asked = [{"role": "user", "content": "Weather in Paris?"}]
        message = client.chat.completions.create(model="demo", messages=asked, tools=[WEATHER_TOOL]).choices[0].message
        assert message.reasoning_content == "The weather tool knows." and message.tool_calls
        engine.reply = f"Done.{THINK_END}Sunny.{EOS}"
        client.chat.completions.create(model="demo", messages=[*asked, message.model_dump(exclude_none=True), {
            "role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "sunny"}], tools=[WEATHER_TOOL])
        assert f"The weather tool knows.{THINK_END}Let me check." in demo.tokenizer.decode(engine.prompts[-1])
    finally:
        api.stop()


# -------------------------------------------------------------------------- one engine, many clients
def test_a_client_that_disconnects_mid_stream_stops_the_generation(demo):
    endless = EndlessEngine(Engine(demo.model, max_context=2048))
    api = start_server(endless, demo.tokenizer, max_tokens=1500)
    try:
        stream = openai_client(api).chat.completions.create(
            model="demo", messages=QUESTION, stream=True, max_tokens=1500, extra_body={"thinking": {
                "type": "disabled"}})
        received = 0
        for _ in stream:
            received += 1
            if received == 8:
                break
        stream.close()
        deadline = time.monotonic() + 20
        while not api.worker.records and time.monotonic() < deadline:
            time.sleep(0.05)
        record = api.worker.records[-1]
        assert record.finish == "cancelled" and endless.generated < received + 10
    finally:
        api.stop()


def test_a_full_queue_answers_429_with_retry_after(demo):
    held = HeldEngine()
    api = start_server(held, demo.tokenizer, queue_size=1)
    try:
        client = openai_client(api)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.chat.completions.create, model="demo", messages=QUESTION)
            assert held.started.wait(10)
            second = pool.submit(client.chat.completions.create, model="demo", messages=QUESTION)
            deadline = time.monotonic() + 10
            while api.worker.queued < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(model="demo", messages=QUESTION)
            assert int(caught.value.response.headers["retry-after"]) >= 1
            assert caught.value.body["code"] == "queue_full"
            held.release.set()
            first.result(timeout=10)
            second.result(timeout=10)
    finally:
        held.release.set()
        api.stop()


def test_a_request_past_the_timeout_gets_504_and_frees_the_engine(demo):
    held = HeldEngine()
    api = start_server(held, demo.tokenizer, timeout=0.5)
    try:
        status, body = raw(api, "POST", "/v1/chat/completions", {"messages": QUESTION})
        assert status == 504 and "timeout" in body["error"]["message"]
        deadline = time.monotonic() + 5
        while api.worker.running is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert api.worker.running is None  # the generation was cancelled, not left running
    finally:
        api.stop()


def test_an_api_key_is_required_when_set(demo):
    api = start_server(ScriptedEngine(demo.tokenizer, f"hi{EOS}"), demo.tokenizer, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai_client(api, api_key="wrong").chat.completions.create(model="demo", messages=QUESTION)
        reply = openai_client(api, api_key="s3cret").chat.completions.create(
            model="demo", messages=QUESTION, extra_body={"thinking": {"type": "disabled"}})
        assert reply.choices[0].message.content == "hi"
        with pytest.raises(anthropic.AuthenticationError):
            anthropic_client(api, api_key="nope").messages.create(model="demo", max_tokens=8, messages=QUESTION)
        assert anthropic_client(api, api_key="s3cret").messages.create(
            model="demo", max_tokens=8, messages=QUESTION).content[0].text == "hi"
        assert raw(api, "GET", "/health")[0] == 200  # health needs no key
    finally:
        api.stop()


# ---------------------------------------------------------------------------------------- Anthropic
def test_anthropic_messages_with_and_without_thinking(server):
    client = anthropic_client(server)
    plain = client.messages.create(model="demo", max_tokens=64, messages=QUESTION)
    assert [b.type for b in plain.content] == ["text"] and plain.content[0].text
    assert plain.stop_reason == "end_turn" and plain.usage.output_tokens > 0
    thought = client.messages.create(model="demo", max_tokens=64, messages=QUESTION,
                                     thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in thought.content] == ["thinking", "text"] and thought.content[0].thinking
    assert "843" in thought.content[1].text
    with client.messages.stream(model="demo", max_tokens=64, messages=QUESTION,
                                thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == thought.content[1].text == final.content[1].text
    assert final.content[0].thinking == thought.content[0].thinking and final.stop_reason == "end_turn"
    short = client.messages.create(model="demo", max_tokens=2, messages=QUESTION)
    assert short.stop_reason == "max_tokens"
    stopped = client.messages.create(model="demo", max_tokens=64, messages=QUESTION, stop_sequences=["+"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "+"
    assert client.messages.count_tokens(model="demo", messages=QUESTION).input_tokens > 5


def test_anthropic_tool_use_and_tool_result(demo):
    engine, api = scripted(demo, TOOL_CALL)
    try:
        client = anthropic_client(api)
        tools = [{"name": "get_weather", "description": "Weather forecast",
                  "input_schema": WEATHER_TOOL["function"]["parameters"]}]
        asked = [{"role": "user", "content": "Weather in Paris?"}]
        reply = client.messages.create(model="demo", max_tokens=200, messages=asked, tools=tools)
        use = reply.content[-1]
        assert reply.stop_reason == "tool_use" and use.type == "tool_use" and use.name == "get_weather"
        assert use.input == {"location": 'Paris, "France"', "days": 3}
        with client.messages.stream(model="demo", max_tokens=200, messages=asked, tools=tools) as stream:
            streamed = stream.get_final_message()
        assert streamed.content[-1].input == use.input and streamed.stop_reason == "tool_use"
        engine.reply = f"Sunny.{EOS}"
        final = client.messages.create(model="demo", max_tokens=50, tools=tools, messages=[
            *asked, {"role": "assistant", "content": [b.model_dump() for b in reply.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}])
        assert final.content[0].text == "Sunny."
        prompt = demo.tokenizer.decode(engine.prompts[-1])
        assert f'name="location" string="true">Paris, "France"</{DSML}parameter>' in prompt
        assert "<tool_result>sunny</tool_result>" in prompt
    finally:
        api.stop()


# -------------------------------------------------------------------------------------- bad input
def raw(api, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one plain HTTP request; `body` bytes are sent as they are."""
    host, port = api.sock.getsockname()[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    payload = body if isinstance(body, bytes | type(None)) else json.dumps(body).encode()
    connection.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, json.loads(data) if data else {}


CHAT = "/v1/chat/completions"
MALFORMED = [
    (CHAT, b"{not json"), (CHAT, b""), (CHAT, b"[]"), (CHAT, b'"text"'), (CHAT, b"\xff\xfe"),
    (CHAT, b'{"messages": NaN}'), (CHAT, b"[" * 100000), (CHAT, {}), (CHAT, {"messages": []}),
    (CHAT, {"messages": "hi"}), (CHAT, {"messages": [1]}), (CHAT, {"messages": [{"content": "x"}]}),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}), (CHAT, {"messages": [{"role": "user", "content": 5}]}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}),
    (CHAT, {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]}),
    (CHAT, {"messages": [{"role": "assistant", "tool_calls": "x"}]}),
    (CHAT, {"model": "gpt-4", "messages": QUESTION}), (CHAT, {"model": 7, "messages": QUESTION}),
    (CHAT, {"messages": QUESTION, "temperature": "hot"}), (CHAT, {"messages": QUESTION, "temperature": -1}),
    (CHAT, {"messages": QUESTION, "temperature": 5}), (CHAT, {"messages": QUESTION, "top_p": 0}),
    (CHAT, {"messages": QUESTION, "top_p": 1.5}), (CHAT, {"messages": QUESTION, "max_tokens": 0}),
    (CHAT, {"messages": QUESTION, "max_tokens": "ten"}), (CHAT, {"messages": QUESTION, "max_tokens": 1.5}),
    (CHAT, {"messages": QUESTION, "max_completion_tokens": -3}), (CHAT, {"messages": QUESTION, "n": 2}),
    (CHAT, {"messages": QUESTION, "seed": "x"}), (CHAT, {"messages": QUESTION, "stream": "yes"}),
    (CHAT, {"messages": QUESTION, "stop": ""}), (CHAT, {"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}),
    (CHAT, {"messages": QUESTION, "stop": [1]}), (CHAT, {"messages": QUESTION, "logprobs": True}),
    (CHAT, {"messages": QUESTION, "frequency_penalty": 1}), (CHAT, {"messages": QUESTION, "logit_bias": {"5": 1}}),
    (CHAT, {"messages": QUESTION, "tools": "x"}), (CHAT, {"messages": QUESTION, "tools": [{"type": "web"}]}),
    (CHAT, {"messages": QUESTION, "tools": [{"type": "function", "function": {}}]}),
    (CHAT, {"messages": QUESTION, "tool_choice": "required", "tools": [WEATHER_TOOL]}),
    (CHAT, {"messages": QUESTION, "thinking": {"type": "sometimes"}}), (CHAT, {"messages": QUESTION, "thinking": 1}),
    (CHAT, {"messages": QUESTION, "reasoning_effort": "extreme"}),
    (CHAT, {"messages": QUESTION, "chat_template_kwargs": {"thinking": "yes"}}),
    (CHAT, {"messages": QUESTION, "stream_options": {"include_usage": 1}}),
    (CHAT, {"messages": QUESTION, "response_format": {"type": "xml"}}),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 3000}]}),
    ("/v1/completions", {"prompt": ""}), ("/v1/completions", {"prompt": 5}), ("/v1/completions", {"prompt": [-1]}),
    ("/v1/completions", {"prompt": [10 ** 9]}), ("/v1/completions", {"prompt": ["a", "b"]}),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}), ("/v1/completions", {"prompt": "x", "echo": "no"}),
    ("/v1/messages", {"messages": QUESTION}), ("/v1/messages", {"max_tokens": 10}),
    ("/v1/messages", {"max_tokens": 10, "messages": [{"role": "system", "content": "x"}]}),
    ("/v1/messages", {"max_tokens": 10, "messages": [{"role": "user", "content": [{"type": "image"}]}]}),
    ("/v1/messages", {"max_tokens": 10, "messages": QUESTION, "thinking": {"type": "enabled"}}),
    ("/v1/messages", {"max_tokens": 10, "messages": QUESTION, "tools": [{"description": "no name"}]}),
    ("/v1/messages", {"max_tokens": 10, "messages": QUESTION, "tool_choice": {"type": "any"}}),
    ("/v1/messages", {"max_tokens": 10, "messages": QUESTION, "stop_sequences": "x"}),
    ("/v1/messages", {"max_tokens": 10, "messages": QUESTION, "model": "claude-opus"}),
    ("/v1/messages", b"{]"),
]


@pytest.mark.parametrize("path,body", MALFORMED, ids=[f"{i}" for i in range(len(MALFORMED))])
def test_malformed_requests_get_4xx_error_objects(server, path, body):
    status, reply = raw(server, "POST", path, body)
    assert 400 <= status < 500, reply
    if path == "/v1/messages":
        assert reply["type"] == "error" and reply["error"]["message"]
    else:
        assert reply["error"]["message"] and reply["error"]["type"]


def test_other_bad_requests_and_the_server_answers_afterwards(server):
    assert len(MALFORMED) >= 50
    assert raw(server, "GET", "/v1/nothing")[0] == 404
    assert raw(server, "GET", CHAT)[0] == 405
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * (2 << 20) + b'"}]}'
    status, reply = raw(server, "POST", CHAT, big)
    assert status == 413 and "limit" in reply["error"]["message"]
    status, reply = raw(server, "POST", CHAT, {"messages": [{"role": "user", "content": "word " * 3000}]})
    assert reply["error"]["code"] == "context_length_exceeded"
    status, reply = raw(server, "POST", CHAT, {"model": "gpt-4", "messages": QUESTION})
    assert status == 404 and reply["error"]["code"] == "model_not_found"
    reply = openai_client(server).chat.completions.create(model="demo", messages=QUESTION)
    assert "843" in reply.choices[0].message.content


# ------------------------------------------------------------------------- the commands themselves
DSV4 = Path(sys.executable).with_name("dsv4")


def test_chat_api_one_shot_against_the_server(server, tmp_path):
    env = {**os.environ, "NO_COLOR": "1"}
    done = subprocess.run([str(DSV4), "chat", "--api", server.url, "-p", "What is 487 + 356?", "--json"],
                          capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert "843" in reply["content"] and reply["reasoning"] and reply["usage"]["prompt_tokens"] > 0
    assert reply["mode"] == "think-high" and reply["model"] == "demo"
    assert "Traceback" not in done.stderr


def test_chat_api_plain_one_shot_and_its_refusals(server, capsys, monkeypatch):
    import io

    from tests.conftest import run_cli

    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # nothing piped
    code, out, err = run_cli(capsys, "chat", "--api", server.url + "/v1", "--nothink", "-p", "What is 12 + 30?")
    assert code == 0 and out.strip(), err
    for argv, message in ((["--api", "http://127.0.0.1:9", "-p", "x"], "cannot reach http://127.0.0.1:9/v1"),
                          (["--api", server.url, "--model", "gpt-4", "-p", "x"], "serves no model 'gpt-4'"),
                          (["demo", "--api", server.url, "-p", "x"], "MODEL (demo) and --api are alternatives"),
                          (["--api", server.url, "--threads", "2", "-p", "x"], "--threads set how a local model"),
                          (["--api", "ftp://x", "-p", "x"], "is not an http:// or https:// URL"),
                          (["--model", "demo", "-p", "x"], "--model names a model on a server")):
        code, _, err = run_cli(capsys, "chat", *argv)
        assert code != 0 and message in err and "Traceback" not in err and err.count("\n") == 1


def test_remote_modes_use_each_servers_dialect():
    from dsv4cli.chat.encoding import ThinkMode
    from dsv4cli.chat.remote import DEEPSEEK, TEMPLATE_KWARGS, RemoteEndpoint

    deepseek = RemoteEndpoint("http://x/v1", None, "m", DEEPSEEK)
    assert deepseek.mode_fields(ThinkMode.THINK_MAX) == {"thinking": {"type": "enabled"}, "reasoning_effort": "max"}
    assert deepseek.mode_fields(ThinkMode.NON_THINK) == {"thinking": {"type": "disabled"}}
    sglang = RemoteEndpoint("http://x/v1", None, "m", TEMPLATE_KWARGS)
    assert sglang.mode_fields(ThinkMode.THINK_HIGH) == {"chat_template_kwargs": {"thinking": True,
                                                                                 "reasoning_effort": "high"}}
    assert sglang.mode_fields(ThinkMode.NON_THINK) == {"chat_template_kwargs": {"thinking": False}}


@pytest.mark.timeout(180)
def test_chat_api_repl_in_a_terminal(server, tmp_path):
    from tests.test_repl import Terminal

    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(str(DSV4), ["chat", "--api", server.url, "--max-tokens", "60"], env=env,
                          dimensions=(24, 100), encoding="utf-8", codec_errors="replace", timeout=30)
    term = Terminal(child)
    try:
        term.expect(f"demo at {server.url}/v1", timeout=60)
        term.expect("think-high>")
        term.command("What is 487 + 356?", "843", timeout=60)
        term.expect("tok/s", timeout=60)  # the stats line under the reply
        term.expect("think-high>")
        term.command("/nothink", "non-think>")
        term.command("What is 12 + 30?", "tok/s", timeout=60)
        term.expect("non-think>")  # the prompt is up again: Ctrl-D is a key, not the tty's EOF
        child.sendeof()
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_serve_command_starts_serves_and_stops_on_ctrl_c(tmp_path):
    child = subprocess.Popen([str(DSV4), "serve", "--port", "0"], stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL)
    try:
        banner = child.stderr.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+)", banner)
        assert url, banner
        reply = openai.OpenAI(base_url=url[1] + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="demo", messages=QUESTION, max_tokens=60)
        assert "843" in reply.choices[0].message.content
        assert "POST /v1/chat/completions 200" in child.stderr.readline()  # the request's log line
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=30) == 0 and "stopped" in child.stderr.read()
    finally:
        child.kill()


def test_serve_refuses_an_open_host_without_a_key_and_a_taken_port(capsys):
    from tests.conftest import run_cli

    code, _, err = run_cli(capsys, "serve", "--host", "0.0.0.0")
    assert code == 2 and "no API key is set" in err and "--api-key" in err and "--no-auth" in err
    code, _, err = run_cli(capsys, "serve", "--api-key", "k", "--no-auth")
    assert code == 2 and "contradict" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, _, err = run_cli(capsys, "serve", "--port", str(port))
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}: it is already in use" in err
    for argv, message in ((["--queue", "-1"], "--queue must be at least 0"), (["--timeout", "0"], "--timeout"),
                          (["--cache-memory", "lots"], "invalid size"), (["--name", " "], "--name is empty"),
                          (["--draft", "4"], "--draft must be 0 to 3"),
                          (["--draft", "1", "--no-draft"], "contradict each other")):
        code, _, err = run_cli(capsys, "serve", *argv)
        assert code == 2 and message in err


def test_bench_api_measures_the_server_in_the_bench_report(server, capsys):
    from tests.conftest import run_cli

    code, out, err = run_cli(capsys, "bench", "--api", server.url, "-p", "32", "-n", "6", "-r", "2", "-o", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == "demo" and [r["label"] for r in report["results"]] == ["pp32", "tg6"]
    assert all(r["tokens_per_second"] > 0 and len(r["samples_tokens_per_second"]) == 2 for r in report["results"])
    assert server.worker.records[-1].generated_tokens == 6  # ignore_eos: run to the limit
    code, out, _ = run_cli(capsys, "bench", "--api", server.url, "-p", "16", "-n", "0", "-r", "1")
    assert code == 0 and re.search(r"\| demo +\| +pp16 \|", out) and "TTFT ms" in out
    code, _, err = run_cli(capsys, "bench", "demo", "--api", server.url)
    assert code == 2 and "MODEL set what runs here" in err
