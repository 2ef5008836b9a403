"""Tool calling on the bundled Qwen model: streamed tool_calls deltas, tool_choice required / named."""
from __future__ import annotations

import json

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and state, e.g., 'San Francisco, CA'"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location", "unit"],
        },
    },
}, {
    "type": "function",
    "function": {"name": "get_time", "description": "Current time in a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                "required": ["city"]}},
}]
ASK = [{"role": "user", "content": "What's the weather like in San Francisco? use celsius."}]


def test_streamed_tool_call_deltas(qwen_server):
    client = qwen_server.openai()
    chunks = list(client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="auto",
                                                 max_tokens=48, temperature=0, stream=True))
    calls: dict[int, dict] = {}
    finish = None
    for c in chunks:
        if not c.choices:
            continue
        for d in c.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            if d.id:
                assert entry["id"] is None, "the id comes once, on the first delta of a call"
                entry["id"] = d.id
                assert d.type == "function"
            if d.function and d.function.name:
                entry["name"] += d.function.name
            if d.function and d.function.arguments:
                entry["arguments"] += d.function.arguments
        finish = c.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert calls[0]["id"] and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"])["location"].startswith("San Francisco")
    # the same call as without streaming
    r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=48, temperature=0)
    assert r.choices[0].message.tool_calls[0].function.arguments == calls[0]["arguments"]


def test_tool_choice_named_and_required(qwen_server):
    client = qwen_server.openai()
    r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=40, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time" and r.choices[0].finish_reason == "tool_calls"
    assert set(json.loads(call.function.arguments)) == {"city"}
    r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=48, temperature=0,
                                       tool_choice="required")
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name in ("get_weather", "get_time")
    json.loads(calls[0].function.arguments)


def test_tool_result_round_trip(qwen_server):
    """The assistant's tool call (arguments as a JSON string) and the tool result go back through the
    template; the model answers in text."""
    client = qwen_server.openai()
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location": "San Francisco, CA", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    r = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, max_tokens=16, temperature=0)
    assert r.choices[0].message.content
