"""Reasoning through the real API stack: reasoning_content / reasoning split from content (stream and
not), stream_reasoning / separate_reasoning, reasoning effort (the thinking budget handed to the engine,
`none` turning thinking off), reasoning token usage, and the /separate_reasoning and
/parse_function_call helpers. The parsing path runs on a scripted engine (an exact model output);
one real-model run (SmolLM2 with a template that opens `<think>`) checks the engine side."""
from __future__ import annotations

import json

import pytest

from tests.e2e.scripted_engine import ALWAYS_THINKING_TEMPLATE, ScriptedServer

ASK = [{"role": "user", "content": "What is 2 + 2?"}]
# the model's output after a prompt that opened `<think>`, cut into pieces inside tags and inside a
# multi-byte character (the engine sends whole characters, so the pieces are too)
REASONING = "Let me add: 2 + 2 = 4 ✓.\n"
ANSWER = "\n\nThe answer is 4 ✓."
PIECES = ["Let me add", ": 2 + 2 = 4 ", "✓.\n</", "thi", "nk>", "\n\nThe answer", " is 4 ✓", "."]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}]


def _stream(client, **kw) -> tuple[str, str, str, dict, list]:
    """(content, reasoning_content, reasoning, tool calls by index, chunks) accumulated from a stream."""
    chunks = list(client.chat.completions.create(stream=True, **kw))
    content = reasoning_content = reasoning = ""
    calls: dict[int, dict] = {}
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        content += d.content or ""
        reasoning_content += (d.model_extra or {}).get("reasoning_content") or ""
        reasoning += (d.model_extra or {}).get("reasoning") or ""
        for t in d.tool_calls or []:
            e = calls.setdefault(t.index, {"name": "", "arguments": ""})
            e["name"] += (t.function.name or "") if t.function else ""
            e["arguments"] += (t.function.arguments or "") if t.function else ""
    return content, reasoning_content, reasoning, calls, chunks


# ------------------------------------------------------------------------------ parsing (scripted engine)
@pytest.mark.parametrize("parser", ["qwen3", "qwen3-thinking", "deepseek-r1", "step3p5"])
def test_reasoning_split_stream_and_non_stream(parser):
    with ScriptedServer(PIECES, reasoning_parser=parser) as s:
        client = s.openai()
        r = client.chat.completions.create(model="m", messages=ASK, max_tokens=64)
        msg = r.choices[0].message
        assert msg.model_extra["reasoning_content"] == msg.model_extra["reasoning"] == REASONING
        assert msg.content == ANSWER
        expected_tokens = len(s.tokenizer.encode(REASONING, add_special_tokens=False))
        assert r.usage.model_extra["reasoning_tokens"] == expected_tokens
        assert r.usage.completion_tokens_details.reasoning_tokens == expected_tokens
        content, reasoning_content, reasoning, calls, chunks = _stream(
            client, model="m", messages=ASK, max_tokens=64, stream_options={"include_usage": True})
        assert (content, reasoning_content, reasoning, calls) == (ANSWER, REASONING, REASONING, {})
        assert chunks[-1].usage.model_extra["reasoning_tokens"] == expected_tokens
        # the model writing `<think>` itself gives the same split
        s.engine.pieces = ["<th", "ink>"] + PIECES
        assert client.chat.completions.create(model="m", messages=ASK).choices[0].message.content == ANSWER


def test_stream_reasoning_false_sends_the_reasoning_in_one_piece():
    with ScriptedServer(PIECES, reasoning_parser="qwen3") as s:
        content, reasoning_content, _, _, chunks = _stream(s.openai(), model="m", messages=ASK,
                                                           extra_body={"stream_reasoning": False})
        assert (content, reasoning_content) == (ANSWER, REASONING)
        pieces = [c.choices[0].delta.model_extra.get("reasoning_content") for c in chunks if c.choices]
        assert [p for p in pieces if p] == [REASONING]


def test_separate_reasoning_false_keeps_everything_in_content():
    with ScriptedServer(PIECES, reasoning_parser="qwen3") as s:
        r = s.openai().chat.completions.create(model="m", messages=ASK, extra_body={"separate_reasoning": False})
        assert r.choices[0].message.content == "".join(PIECES)
        assert r.choices[0].message.model_extra["reasoning_content"] is None
        assert r.usage.model_extra["reasoning_tokens"] == 0


def test_reasoning_exclude_hides_it_but_counts_it():
    with ScriptedServer(PIECES, reasoning_parser="qwen3") as s:
        r = s.openai().chat.completions.create(model="m", messages=ASK,
                                               extra_body={"reasoning": {"effort": "high", "exclude": True}})
        assert r.choices[0].message.content == ANSWER
        assert r.choices[0].message.model_extra["reasoning"] is None
        assert r.usage.model_extra["reasoning_tokens"] > 0


def test_tool_call_after_and_inside_reasoning():
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
    for pieces, reasoning in (
            (["I need the weather.\n</think>\n\n", call[:15], call[15:40], call[40:]], "I need the weather.\n"),
            (["I need the weather.\n", call[:7], call[7:]], "I need the weather.\n")):  # no </think>
        with ScriptedServer(pieces, reasoning_parser="qwen3", tool_call_parser="qwen25") as s:
            client = s.openai()
            r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS)
            c = r.choices[0]
            assert c.finish_reason == "tool_calls" and c.message.model_extra["reasoning_content"] == reasoning
            assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == [
                ("get_weather", {"city": "Paris", "days": 2})]
            content, reasoning_content, _, calls, _ = _stream(client, model="m", messages=ASK, tools=TOOLS)
            assert reasoning_content == reasoning and not content
            assert calls == {0: {"name": "get_weather", "arguments": c.message.tool_calls[0].function.arguments}}


# ------------------------------------------------------------------------------ reasoning effort (scripted)
SHARES = {"xhigh": 0.95, "high": 0.80, "medium": 0.50, "low": 0.20, "minimal": 0.10}


@pytest.mark.parametrize("body", [
    *({"reasoning": {"effort": e}} for e in SHARES),
    *({"reasoning_effort": e} for e in ("low", "medium", "high")),
    {"output_config": {"effort": "medium"}},
    {"reasoning": {"max_tokens": 7}},
])
def test_effort_sets_the_thinking_budget(body):
    with ScriptedServer(PIECES, reasoning_parser="qwen3") as s:
        r = s.client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 50, **body})
        assert r.status_code == 200, r.text
        sp = s.engine.requests[-1].sampling
        effort = (body.get("reasoning") or {}).get("effort") or body.get("reasoning_effort") or (
            body.get("output_config") or {}).get("effort")
        assert sp.thinking_budget == (7 if effort is None else int(50 * SHARES[effort]))
        assert sp.think_end == "</think>"
        assert r.json()["choices"][0]["message"]["content"] == ANSWER


def test_no_budget_without_effort_parser_or_thinking():
    with ScriptedServer(PIECES, reasoning_parser="qwen3", tool_call_parser="qwen25") as s:
        def budget(**body):
            r = s.client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 40, **body})
            assert r.status_code == 200, r.text
            return s.engine.requests[-1].sampling.thinking_budget
        assert budget() is None
        assert budget(reasoning_effort="low", chat_template_kwargs={"enable_thinking": False}) is None
        assert budget(reasoning_effort="low", response_format={"type": "json_object"}) is None
        assert budget(reasoning_effort="low", tools=TOOLS, tool_choice="required") is None
        assert budget(reasoning_effort="low", tools=TOOLS) == 8  # tool_choice auto: thinking comes first
    with ScriptedServer(PIECES) as s:  # no --reasoning-parser: no end tag to force
        s.client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 40, "reasoning_effort": "low"})
        assert s.engine.requests[-1].sampling.thinking_budget is None
    with ScriptedServer(["◁think▷hm◁/think▷ok"], reasoning_parser="kimi", chat_template=None) as s:
        # kimi's model opens its block itself; nothing says it will, so no budget is forced on it
        s.client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 40, "reasoning_effort": "low"})
        assert s.engine.requests[-1].sampling.thinking_budget is None
        r = s.client.post("/v1/chat/completions", json={"messages": ASK}).json()["choices"][0]["message"]
        assert (r["reasoning_content"], r["content"]) == ("hm", "ok")


def test_effort_high_with_kimi_k2_end_tag_and_a_template_that_opens_the_block():
    tpl = ALWAYS_THINKING_TEMPLATE.replace("<think>", "◁think▷")
    with ScriptedServer(["hm◁/think▷ok"], reasoning_parser="kimi", chat_template=tpl) as s:
        r = s.client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 40, "reasoning_effort": "high"})
        assert s.engine.requests[-1].sampling.thinking_budget == 32
        assert s.engine.requests[-1].sampling.think_end == "◁/think▷"
        msg = r.json()["choices"][0]["message"]
        assert (msg["reasoning_content"], msg["content"]) == ("hm", "ok")


def test_effort_none_turns_thinking_off():
    # a template with a switch: enable_thinking=False reaches it, the parser expects no reasoning
    with ScriptedServer(["Hello", " there"], reasoning_parser="qwen3") as s:
        for body in ({"reasoning": {"effort": "none"}}, {"reasoning": {"enabled": False}},
                     {"reasoning_effort": "none"}):
            r = s.client.post("/v1/chat/completions", json={"messages": ASK, **body}).json()
            msg = r["choices"][0]["message"]
            assert (msg["content"], msg["reasoning_content"], msg["reasoning"]) == ("Hello there", None, None)
            assert r["usage"]["reasoning_tokens"] == 0
            assert s.prompt_text().endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
            assert s.engine.requests[-1].sampling.thinking_budget is None
        _, reasoning_content, _, _, _ = _stream(s.openai(), model="m", messages=ASK,
                                                extra_body={"reasoning": {"effort": "none"}})
        assert reasoning_content == ""
    # a template that always opens the block: it is closed in the prompt (no thinking token at all)
    with ScriptedServer(["Hello"], chat_template=ALWAYS_THINKING_TEMPLATE, reasoning_parser="deepseek-r1") as s:
        r = s.client.post("/v1/chat/completions", json={"messages": ASK, "reasoning": {"effort": "none"}}).json()
        assert r["choices"][0]["message"]["content"] == "Hello"
        assert r["choices"][0]["message"]["reasoning_content"] is None
        assert s.prompt_text().endswith("<|im_start|>assistant\n<think>\n</think>\n\n")
        # the same server without `none`: everything up to </think> is reasoning
        r = s.client.post("/v1/chat/completions", json={"messages": ASK}).json()
        assert r["choices"][0]["message"]["reasoning_content"] == "Hello"
    # minimax-append-think keeps the thinking in the content; with `none` there is none to add
    with ScriptedServer(["Hi!"], chat_template=ALWAYS_THINKING_TEMPLATE, reasoning_parser="minimax-append-think") as s:
        r = s.client.post("/v1/chat/completions", json={"messages": ASK, "reasoning_effort": "none"}).json()
        assert r["choices"][0]["message"]["content"] == "Hi!"
        r = s.client.post("/v1/chat/completions", json={"messages": ASK}).json()
        assert r["choices"][0]["message"]["content"] == "<think>Hi!"


@pytest.mark.parametrize("body, param", [
    ({"reasoning_effort": "bogus"}, "reasoning_effort"),
    ({"reasoning": {"effort": "huge"}}, "reasoning.effort"),
    ({"reasoning": {"effort": 3}}, "reasoning.effort"),
    ({"reasoning": "high"}, "reasoning"),
    ({"reasoning": {"max_tokens": -1}}, "reasoning.max_tokens"),
    ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
])
def test_bad_effort_values_are_400(body, param):
    with ScriptedServer(PIECES, reasoning_parser="qwen3") as s:
        r = s.client.post("/v1/chat/completions", json={"messages": ASK, **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert not s.engine.requests


# ------------------------------------------------------------------------------ helper routes
def test_separate_reasoning_route():
    with ScriptedServer([], reasoning_parser="deepseek-r1") as s:
        c = s.client
        r = c.post("/separate_reasoning", json={"text": "Let me think.\n</think>\nThe answer is 4."})
        assert r.status_code == 200 and r.json() == {"text": "\nThe answer is 4.", "reasoning_text": "Let me think.\n"}
        r = c.post("/separate_reasoning", json={"text": "<think>\nA\n</think>\n\nB", "reasoning_parser": "qwen3"})
        assert r.json() == {"text": "\n\nB", "reasoning_text": "\nA\n"}
        r = c.post("/separate_reasoning", json={"text": "◁think▷a◁/think▷b", "reasoning_parser": "kimi"})
        assert r.json() == {"text": "b", "reasoning_text": "a"}
        r = c.post("/separate_reasoning", json={"text": "Hello", "reasoning_parser": "qwen3", "force_reasoning": False})
        assert r.json() == {"text": "Hello", "reasoning_text": ""}
        r = c.post("/separate_reasoning", json={"text": "x", "reasoning_parser": "nope"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_parser"
        assert c.post("/separate_reasoning", json={"reasoning_parser": "qwen3"}).json()["error"]["param"] == "text"
    with ScriptedServer([]) as s:  # no --reasoning-parser and none named
        r = s.client.post("/separate_reasoning", json={"text": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_parser"


def test_parse_function_call_route():
    with ScriptedServer([], tool_call_parser="qwen25") as s:
        c = s.client
        text = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京", "days": 3}}\n</tool_call>')
        r = c.post("/parse_function_call", json={"text": text, "tools": TOOLS})
        assert r.status_code == 200, r.text
        assert r.json() == {"normal_text": "Checking.", "calls": [
            {"tool_index": 0, "name": "get_weather", "parameters": '{"city": "Paris"}'},
            {"tool_index": 1, "name": "get_weather", "parameters": '{"city": "東京", "days": 3}'}]}
        # a tool the request does not list is not a call; without tools nothing is
        unknown = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'
        assert c.post("/parse_function_call", json={"text": unknown, "tools": TOOLS}).json()["calls"] == []
        assert c.post("/parse_function_call", json={"text": text}).json()["calls"] == []
        # another format, by name; XML values typed from the schema
        xml = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n" \
              "</parameter>\n</function>\n</tool_call>"
        r = c.post("/parse_function_call", json={"text": xml, "tools": TOOLS, "tool_call_parser": "step3p5"})
        assert r.json()["calls"] == [
            {"tool_index": 0, "name": "get_weather", "parameters": '{"city": "Paris", "days": 3}'}]
        r = c.post("/parse_function_call", json={"text": xml, "tools": TOOLS, "tool_call_parser": "nope"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_call_parser"
        r = c.post("/parse_function_call", json={"text": xml, "tools": [{"type": "function"}]})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("tools")


# ------------------------------------------------------------------------------ a real model
def test_real_model_effort_low_cuts_the_reasoning_and_an_answer_follows(smollm2_think_server):
    """SmolLM2 behind a template that opens `<think>` never closes the block itself: with effort low the
    engine writes `</think>` after 20% of max_tokens, and the rest is the answer; stream and non-stream
    split the same way. With effort none the block is closed in the prompt: no reasoning at all."""
    client = smollm2_think_server.openai()
    kw = dict(model="m", messages=ASK, max_tokens=30, temperature=0)
    low = {"ignore_eos": True, "reasoning": {"effort": "low"}}
    r = client.chat.completions.create(**kw, extra_body=low)
    msg = r.choices[0].message
    reasoning = msg.model_extra["reasoning_content"]
    assert reasoning and msg.content and msg.content.strip()
    assert "</think>" not in reasoning + msg.content
    assert r.usage.completion_tokens == 30
    assert 0 < r.usage.model_extra["reasoning_tokens"] <= 6  # the budget: 20% of 30 tokens
    assert r.usage.completion_tokens_details.reasoning_tokens == r.usage.model_extra["reasoning_tokens"]
    content, reasoning_content, _, _, _ = _stream(client, **kw, extra_body=low)
    assert (reasoning_content, content) == (reasoning, msg.content)
    # no effort: the block never closes, everything is reasoning
    r0 = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    assert r0.choices[0].message.model_extra["reasoning_content"] and not r0.choices[0].message.content
    # effort none
    none = {"ignore_eos": True, "reasoning": {"effort": "none"}}
    r2 = client.chat.completions.create(**kw, extra_body=none)
    assert r2.choices[0].message.content and r2.choices[0].message.model_extra["reasoning_content"] is None
    assert r2.usage.model_extra["reasoning_tokens"] == 0
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens  # `</think>` closes the block in the prompt
    content, reasoning_content, _, _, _ = _stream(client, **kw, extra_body=none)
    assert (reasoning_content, content) == ("", r2.choices[0].message.content)
