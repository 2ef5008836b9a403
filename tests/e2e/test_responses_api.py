"""The Responses API through the official openai SDK (`client.responses`): plain, streamed (raw events and the
SDK's stream helper), a function tool with its output fed back, previous_response_id, retrieve/delete, errors."""
from __future__ import annotations

import json

import openai
import pytest

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Get the current weather in a given location",
                "parameters": {"type": "object", "properties": {
                    "location": {"type": "string", "description": "City and state, e.g., 'San Francisco, CA'"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                    "required": ["location", "unit"]}}


def _chat_text(client, messages, max_tokens):
    r = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=max_tokens)
    return r.choices[0].message.content, r.usage


def test_plain_equals_chat(qwen_server):
    client = qwen_server.openai()
    r = client.responses.create(model="m", input="Name a primary color. One word.", temperature=0,
                                max_output_tokens=12, instructions="You answer briefly.")
    text, usage = _chat_text(client, [{"role": "system", "content": "You answer briefly."},
                                      {"role": "user", "content": "Name a primary color. One word."}], 12)
    assert r.object == "response" and r.status in ("completed", "incomplete")
    assert r.output_text == text and r.output_text.strip()
    assert r.usage.input_tokens == usage.prompt_tokens
    assert r.usage.output_tokens == usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_streamed_events_and_stream_helper(qwen_server):
    client = qwen_server.openai()
    args = dict(model="m", input="Count from 1 to 5, digits only.", temperature=0, max_output_tokens=80)
    events = list(client.responses.create(stream=True, **args))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"  # the SDK's stream helper needs it (max_output_tokens not hit)
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas and deltas == final.output_text
    assert "response.output_item.added" in kinds and "response.output_text.done" in kinds
    plain = client.responses.create(**args)
    assert plain.output_text == deltas
    with client.responses.stream(**args) as stream:  # the SDK rebuilds the response from the events
        assert stream.get_final_response().output_text == deltas


def test_function_tool_and_its_output_fed_back(qwen_server):
    client = qwen_server.openai()
    r1 = client.responses.create(model="m", input="What's the weather like in San Francisco? use celsius.",
                                 tools=[WEATHER_TOOL], tool_choice="auto", temperature=0, max_output_tokens=64)
    calls = [o for o in r1.output if o.type == "function_call"]
    assert calls, r1.output
    assert calls[0].name == "get_weather" and calls[0].call_id
    assert json.loads(calls[0].arguments)["location"]
    r2 = client.responses.create(model="m", previous_response_id=r1.id, tools=[WEATHER_TOOL], temperature=0,
                                 max_output_tokens=48, input=[{"type": "function_call_output",
                                                               "call_id": calls[0].call_id,
                                                               "output": "22 degrees celsius, sunny"}])
    assert r2.previous_response_id == r1.id
    # the same conversation through chat completions gives the same answer (the history was rebuilt exactly)
    chat = client.chat.completions.create(model="m", temperature=0, max_tokens=48, tools=[
        {"type": "function", "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"}}], messages=[
        {"role": "user", "content": "What's the weather like in San Francisco? use celsius."},
        {"role": "assistant", "content": None, "tool_calls": [{"id": calls[0].call_id, "type": "function", "function": {
            "name": "get_weather", "arguments": calls[0].arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].call_id, "content": "22 degrees celsius, sunny"}])
    assert r2.usage.input_tokens == chat.usage.prompt_tokens > r1.usage.input_tokens
    msg = chat.choices[0].message
    assert r2.output_text == (msg.content or "").strip() or r2.output_text == (msg.content or "")
    # the 0.5B model may call the tool again here (it does at temperature 0): then the calls must agree too
    assert [(o.name, o.arguments) for o in r2.output if o.type == "function_call"] == \
        [(c.function.name, c.function.arguments) for c in msg.tool_calls or []]


def test_previous_response_id_continues_the_conversation(qwen_server):
    client = qwen_server.openai()
    q1, q2 = "My name is Ada. Say OK.", "What is my name?"
    r1 = client.responses.create(model="m", input=q1, temperature=0, max_output_tokens=8)
    r2 = client.responses.create(model="m", input=q2, previous_response_id=r1.id, temperature=0,
                                 max_output_tokens=12)
    text, usage = _chat_text(client, [{"role": "user", "content": q1}, {"role": "assistant", "content": r1.output_text},
                                      {"role": "user", "content": q2}], 12)
    assert r2.output_text == text
    assert r2.usage.input_tokens == usage.prompt_tokens


def test_retrieve_delete_and_errors(qwen_server):
    client = qwen_server.openai()
    r = client.responses.create(model="m", input="Hi", max_output_tokens=4, temperature=0)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="m", input="Hi", previous_response_id="resp_nope")
    assert "resp_nope" in e.value.body["message"] if isinstance(e.value.body, dict) else "resp_nope" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", input=[{"type": "bogus_item"}])
    assert "bogus_item" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", input="Hi", tools=[{"type": "web_search"}])
    assert "web_search" in str(e.value)
    unstored = client.responses.create(model="m", input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_reasoning_is_its_own_item(smollm2_think_server):
    client = smollm2_think_server.openai()
    r = client.responses.create(model="m", input="Is 7 prime?", temperature=0, max_output_tokens=24,
                                reasoning={"effort": "high"})
    assert r.output[0].type == "reasoning"
    assert r.output[0].content[0].text.strip()
    assert r.usage.output_tokens_details.reasoning_tokens > 0
