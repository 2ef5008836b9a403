"""The Anthropic-style Messages API (POST /v1/messages) on real servers, through the official `anthropic`
SDK: text, system prompts, stop sequences, max_tokens, tool_use round trips (Qwen2.5-Coder), thinking
blocks (SmolLM2 behind a template that opens `<think>`), usage and Anthropic-shaped errors.

The SDK (2.x) has no temperature/top_k parameters of its own: they go in extra_body, as users send them."""
from __future__ import annotations

import json

import anthropic
import jsonschema
import pytest
import requests
from tests.e2e.test_qwen_tools import TOOLS

GREEDY = {"temperature": 0}
ASK = [{"role": "user", "content": "What is the capital of France?"}]


def _client(server, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key=kw.pop("api_key", server.api_key or "x"),
                               max_retries=0, timeout=300, **kw)


def _blocks(message) -> list[dict]:
    """The content blocks without the tool_use ids (fresh per response)."""
    return [{k: v for k, v in b.model_dump(exclude_none=True).items() if k != "id"} for b in message.content]


def _text(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def _streamed(client, **kw):
    """(final message, event types) of `client.messages.stream(...)`."""
    with client.messages.stream(**kw) as stream:
        types = [event.type for event in stream]
        return stream.get_final_message(), types


def _raw_events(server, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) of a raw SSE response, checking that every data's type names its event."""
    r = requests.post(f"{server.base_url}/v1/messages", json={**body, "stream": True}, stream=True, timeout=300,
                      headers=server.headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events, name = [], None
    for line in r.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: "):])
            assert data["type"] == name
            events.append((name, data))
    return events


def _assert_anthropic_error(r, status: int, *needles: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    for needle in needles:
        assert needle in body["error"]["message"], (needle, body)
    return body["error"]


# ------------------------------------------------------------------------------ text
def test_text_stream_equals_non_stream(smollm2_server):
    client = _client(smollm2_server)
    kw = dict(model="my-model", max_tokens=12, messages=ASK, extra_body=GREEDY)
    m = client.messages.create(**kw)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == "my-model"
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    assert 0 < m.usage.output_tokens <= 12 and m.usage.cache_creation_input_tokens == 0
    final, types = _streamed(client, **kw)
    assert _blocks(final) == _blocks(m)
    assert (final.stop_reason, final.stop_sequence, final.usage.output_tokens) == (
        m.stop_reason, m.stop_sequence, m.usage.output_tokens)
    assert (final.usage.input_tokens + final.usage.cache_read_input_tokens
            == m.usage.input_tokens + m.usage.cache_read_input_tokens)
    assert types[0] == "message_start" and types[-1] == "message_stop" and "message_delta" in types
    # the raw event sequence, as Anthropic sends it
    events = _raw_events(smollm2_server, {"model": "m", "max_tokens": 12, "messages": ASK, **GREEDY})
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == m.content[0].text
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": m.stop_reason, "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == m.usage.output_tokens


def test_system_prompt_reaches_the_model(smollm2_server):
    """The system prompt (a string, or text blocks) gives the same text as the same conversation via chat
    completions, and the same prompt (SmolLM2's template puts its own system prompt in without one)."""
    system = "You are a pirate. Always answer like a pirate."
    m = _client(smollm2_server).messages.create(model="m", max_tokens=16, system=system, messages=ASK,
                                                extra_body=GREEDY)
    chat = smollm2_server.openai().chat.completions.create(
        model="m", max_tokens=16, temperature=0, messages=[{"role": "system", "content": system}, *ASK])
    assert _text(m) == chat.choices[0].message.content
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    plain = _client(smollm2_server).messages.count_tokens(model="m", messages=ASK).input_tokens
    assert plain != chat.usage.prompt_tokens
    blocks = _client(smollm2_server).messages.create(
        model="m", max_tokens=16, messages=ASK, extra_body=GREEDY,
        system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}])
    assert _text(blocks) == _text(m)


def test_stop_sequences_and_max_tokens(smollm2_server):
    client = _client(smollm2_server)
    prompt = [{"role": "user", "content": "Count from one to twenty in words, separated by commas."}]
    full = _text(client.messages.create(model="m", max_tokens=16, messages=prompt, extra_body=GREEDY))
    word = full.split()[2]
    kw = dict(model="m", max_tokens=16, messages=prompt, stop_sequences=[word, "never-said"], extra_body=GREEDY)
    m = client.messages.create(**kw)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == word
    assert _text(m) == full[:full.index(word)]
    final, _ = _streamed(client, **kw)
    assert (final.stop_reason, final.stop_sequence, _blocks(final)) == ("stop_sequence", word, _blocks(m))
    # max_tokens
    m = client.messages.create(model="m", max_tokens=3, messages=prompt, extra_body=GREEDY)
    assert m.stop_reason == "max_tokens" and m.stop_sequence is None and m.usage.output_tokens == 3
    final, _ = _streamed(client, model="m", max_tokens=3, messages=prompt, extra_body=GREEDY)
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 3 and _text(final) == _text(m)


def test_usage_prefix_cache_and_count_tokens(smollm2_server):
    """input_tokens + cache_read_input_tokens is the prompt; a repeated prompt is read from the prefix cache
    (Anthropic's split: input_tokens counts only what was not). count_tokens gives the same prompt size."""
    client = _client(smollm2_server)
    messages = [{"role": "user", "content": "Name three colours of the rainbow, and say why the sky is blue."}]
    counted = client.messages.count_tokens(model="m", messages=messages).input_tokens
    first = client.messages.create(model="m", max_tokens=2, messages=messages, extra_body=GREEDY)
    second = client.messages.create(model="m", max_tokens=2, messages=messages, extra_body=GREEDY)
    for m in (first, second):
        assert m.usage.input_tokens + m.usage.cache_read_input_tokens == counted
        assert m.usage.cache_creation_input_tokens == 0 and m.usage.output_tokens == 2
    assert second.usage.cache_read_input_tokens >= 16  # at least one full page of the prompt was cached
    chat = smollm2_server.openai().chat.completions.create(model="m", messages=messages, max_tokens=1)
    assert chat.usage.prompt_tokens == counted


def test_assistant_prefill_is_continued(smollm2_server):
    """A conversation that ends with an assistant turn is continued from there (Anthropic's prefill)."""
    client = _client(smollm2_server)
    m = client.messages.create(model="m", max_tokens=8, extra_body=GREEDY, messages=[
        *ASK, {"role": "assistant", "content": "The capital of France is"}])
    assert _text(m) and not _text(m).startswith("The capital")
    chat = smollm2_server.openai().chat.completions.create(
        model="m", max_tokens=8, temperature=0, extra_body={"continue_final_message": True},
        messages=[*ASK, {"role": "assistant", "content": "The capital of France is"}])
    assert _text(m) == chat.choices[0].message.content


# ------------------------------------------------------------------------------ errors
def test_errors_are_anthropic_shaped(smollm2_server):
    url = f"{smollm2_server.base_url}/v1/messages"
    user = {"role": "user", "content": "hi"}
    cases = [
        ({"model": "m", "messages": [user]}, ["max_tokens", "required"]),
        ({"model": "m", "max_tokens": 0, "messages": [user]}, ["max_tokens"]),
        ({"model": "m", "max_tokens": 8, "messages": [{"role": "system", "content": "hi"}]}, ["role"]),
        ({"model": "m", "max_tokens": 8, "messages": []}, ["messages"]),
        ({"model": "m", "max_tokens": 8, "messages": [user], "temperature": -1}, ["temperature"]),
        ({"model": "m", "max_tokens": 8, "messages": [user], "tool_choice": {"type": "any"}}, ["tool_choice"]),
        ({"model": "m", "max_tokens": 8, "messages": [user], "thinking": {"type": "sometimes"}}, ["thinking"]),
        ({"model": "m", "max_tokens": 8, "messages": [user], "output_config": {"effort": "huge"}}, ["effort"]),
        ({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
         ["video"]),
        ({"model": "m", "max_tokens": 8, "messages": [user],
          "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, ["server tools"]),
        ({"model": "m", "max_tokens": 10_000_000, "messages": [user]}, ["maximum context length"]),
    ]
    for body, needles in cases:
        for stream in (False, True):  # a stream with bad input is a plain 400 too, before any event
            r = requests.post(url, json={**body, "stream": stream}, timeout=60)
            err = _assert_anthropic_error(r, 400, *needles)
            assert err["type"] == "invalid_request_error"
    _assert_anthropic_error(requests.post(url, data="{not json", timeout=60), 400, "Malformed JSON")
    # through the SDK: an image block (the served models take text only)
    client = _client(smollm2_server)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="m", max_tokens=8, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}])
    assert e.value.status_code == 400 and "image" in e.value.body["error"]["message"]
    assert e.value.body["error"]["type"] == "invalid_request_error"
    smollm2_server.assert_alive()


def test_api_key_x_api_key_and_bearer(smollm2_special_server):
    """With --api-key the SDK's x-api-key header and Authorization: Bearer both work; a wrong key is an
    Anthropic-shaped 401."""
    server = smollm2_special_server
    kw = dict(model="m", max_tokens=2, messages=ASK)
    assert _client(server, api_key="sk-ember-test").messages.create(**kw).type == "message"  # x-api-key
    bearer = anthropic.Anthropic(base_url=server.base_url, auth_token="sk-ember-test", max_retries=0)
    assert 0 < bearer.messages.create(**kw).usage.output_tokens <= 2
    with pytest.raises(anthropic.AuthenticationError) as e:
        _client(server, api_key="wrong").messages.create(**kw)
    assert e.value.status_code == 401 and e.value.body["error"]["type"] == "authentication_error"
    r = requests.post(f"{server.base_url}/v1/messages", json={"max_tokens": 2, "messages": ASK}, timeout=60)
    _assert_anthropic_error(r, 401, "API key")


# ------------------------------------------------------------------------------ thinking
def test_thinking_blocks(smollm2_think_server):
    """SmolLM2 behind a template that opens `<think>`: with a thinking budget the engine closes the block and
    the answer follows, as a thinking block and a text block; streamed the same. `disabled` closes the
    block in the prompt: no thinking block."""
    client = _client(smollm2_think_server)
    prompt = [{"role": "user", "content": "Write a haiku about the sea."}]
    kw = dict(model="m", max_tokens=16, messages=prompt, extra_body=GREEDY,
              thinking={"type": "enabled", "budget_tokens": 4})
    m = client.messages.create(**kw)
    assert [b.type for b in m.content] == ["thinking", "text"], m.content
    assert m.content[0].thinking and m.content[0].signature == "" and m.content[1].text.strip()
    assert "</think>" not in m.content[0].thinking + m.content[1].text
    final, types = _streamed(client, **kw)
    assert _blocks(final) == _blocks(m) and final.stop_reason == m.stop_reason
    assert "thinking" in types  # the SDK's event for thinking_delta
    # output_config.effort (the Step API's way): low = 20% of max_tokens
    low = client.messages.create(model="m", max_tokens=16, messages=prompt, extra_body=GREEDY,
                                 output_config={"effort": "low"})
    assert [b.type for b in low.content] == ["thinking", "text"]
    off = client.messages.create(model="m", max_tokens=8, messages=prompt, extra_body=GREEDY,
                                 thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"]


# ------------------------------------------------------------------------------ tools
_WEATHER_FN = TOOLS[0]["function"]  # the seed's get_weather, in Anthropic's tool shape
WEATHER = {"name": _WEATHER_FN["name"], "description": _WEATHER_FN["description"],
           "input_schema": _WEATHER_FN["parameters"]}


def test_tool_use_round_trip(qwen_server):
    """tool_choice {"type": "tool"} forces a schema-valid call (tool_use block, stop_reason tool_use), the
    same streamed; the tool_result fed back (with a text block in the same user turn) gives a text answer."""
    client = _client(qwen_server)
    ask = [{"role": "user", "content": "What's the weather like in San Francisco? Use celsius."}]
    kw = dict(model="m", max_tokens=48, messages=ask, tools=[WEATHER], extra_body=GREEDY,
              tool_choice={"type": "tool", "name": "get_weather"})
    m = client.messages.create(**kw)
    assert m.stop_reason == "tool_use" and [b.type for b in m.content] == ["tool_use"]
    call = m.content[0]
    assert call.id.startswith("toolu_") and call.name == "get_weather"
    jsonschema.validate(call.input, WEATHER["input_schema"])
    assert "San Francisco" in call.input["location"]
    final, types = _streamed(client, **kw)
    assert _blocks(final) == _blocks(m) and final.stop_reason == "tool_use" and "input_json" in types
    # the result goes back; the model answers in text
    answer = client.messages.create(model="m", max_tokens=24, tools=[WEATHER], extra_body=GREEDY, messages=[
        *ask, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "18 degrees, sunny"}]},
            {"type": "text", "text": "Thanks. Summarize the weather for me in plain words."}]}])
    assert answer.stop_reason in ("end_turn", "max_tokens") and [b.type for b in answer.content] == ["text"]
    assert "18" in _text(answer)


# ------------------------------------------------------------------------------ exact outputs (scripted engine)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}\n</tool_call>'


@pytest.mark.parametrize("pieces, text", [
    (["\n", CALL[:20], CALL[20:47], CALL[47:]], None),  # whitespace before a call: no text block
    (["Let me check. ", CALL[:30], CALL[30:]], "Let me check."),
])
def test_scripted_tool_call_blocks_stream_and_non_stream(pieces, text):
    """An exact model output (the API app on a scripted engine): the tool call parsed by qwen25 becomes a
    tool_use block, after a text block when there is text; the stream reconstructs the same message."""
    from tests.e2e.scripted_engine import ScriptedServer
    with ScriptedServer(pieces, chat_template=CHATML, tool_call_parser="qwen25") as s:
        client = anthropic.Anthropic(base_url="http://testserver", api_key="x", http_client=s.client,
                                     max_retries=0)
        kw = dict(model="m", max_tokens=64, tools=[WEATHER], messages=[{"role": "user", "content": "Paris?"}])
        m = client.messages.create(**kw)
        expected = [{"type": "text", "text": text}] if text else []
        expected.append({"type": "tool_use", "name": "get_weather",
                         "input": {"location": "Paris", "unit": "celsius"}})
        assert _blocks(m) == expected and m.stop_reason == "tool_use"
        final, _ = _streamed(client, **kw)
        assert _blocks(final) == expected and final.stop_reason == "tool_use"


def test_scripted_request_mapping():
    """What the engine gets: tool_choice any (one call) as the constrained schema, thinking budget_tokens as
    the thinking budget, output_config.format as a JSON schema, metadata ignored, the stop sequences."""
    from tests.e2e.scripted_engine import THINKING_TEMPLATE, ScriptedServer
    with ScriptedServer(["4"], chat_template=THINKING_TEMPLATE, reasoning_parser="qwen3") as s:
        client = anthropic.Anthropic(base_url="http://testserver", api_key="x", http_client=s.client,
                                     max_retries=0)
        user = [{"role": "user", "content": "2+2?"}]
        client.messages.create(model="m", max_tokens=40, messages=user, tools=[WEATHER],
                               tool_choice={"type": "any", "disable_parallel_tool_use": True})
        schema = json.loads(s.engine.requests[-1].sampling.json_schema)
        assert schema["maxItems"] == 1 and schema["items"]["anyOf"][0]["properties"]["parameters"] == \
            WEATHER["input_schema"]
        client.messages.create(model="m", max_tokens=40, messages=user, metadata={"user_id": "u1"},
                               thinking={"type": "enabled", "budget_tokens": 9}, stop_sequences=["END"])
        sp = s.engine.requests[-1].sampling
        assert (sp.thinking_budget, sp.think_end, sp.stop) == (9, "</think>", ["END"])
        client.messages.create(model="m", max_tokens=40, messages=user, thinking={"type": "disabled"},
                               output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}})
        assert json.loads(s.engine.requests[-1].sampling.json_schema) == {"type": "object"}
        assert s.prompt_text().endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off
