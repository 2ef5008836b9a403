"""Server flags on a real server (SmolLM2): --api-key, --max-queued-requests, --reasoning-parser,
--chat-template."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import requests

KEY = "sk-ember-test"
CHAT = [{"role": "user", "content": "Hello!"}]

ROUTES = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/anything", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}),
    ("POST", "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 1}}),
    ("GET", "/health_generate", None),
    ("GET", "/get_model_info", None),
    ("GET", "/get_server_info", None),
    ("GET", "/metrics", None),
    ("POST", "/flush_cache", None),
    ("POST", "/abort_request", {"rid": "none"}),
    ("POST", "/separate_reasoning", {"text": "a</think>b"}),
    ("POST", "/parse_function_call", {"text": "x", "tool_call_parser": "qwen25", "tools": []}),
]


def test_api_key_on_every_route_but_health(smollm2_special_server):
    base = smollm2_special_server.base_url
    assert requests.get(f"{base}/health").status_code == 200
    for method, path, body in ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = requests.request(method, f"{base}{path}", json=body, headers=headers, timeout=60)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json()["error"]["type"] == "AuthenticationError"
        r = requests.request(method, f"{base}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"},
                             timeout=120)
        assert r.status_code == 200, (method, path, r.status_code, r.text)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    assert smollm2_special_server.openai().models.list().data[0].id


def test_queue_limit_answers_503(smollm2_special_server):
    """--max-running-requests 1 --max-queued-requests 1: of 5 simultaneous requests, 2 are served
    (one running, one waiting) and 3 get 503 at once; then the server serves again."""
    base = smollm2_special_server.base_url

    async def run():
        async with httpx.AsyncClient(timeout=300, headers={"Authorization": f"Bearer {KEY}"}) as c:
            async def one():
                return await c.post(f"{base}/v1/completions", json={"prompt": "Once upon a time",
                                                                   "max_tokens": 16, "ignore_eos": True})
            return await asyncio.gather(*[one() for _ in range(5)])

    rs = asyncio.run(run())
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 200, 503, 503, 503], [(r.status_code, r.text[:200]) for r in rs]
    for r in rs:
        if r.status_code == 503:
            assert "overloaded" in r.json()["error"]["message"]
    r = requests.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                      headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200


def test_reasoning_parser(smollm2_special_server):
    """deepseek-r1 treats output up to </think> as reasoning; SmolLM2 never closes it, so all text is
    reasoning_content — unless the request turns reasoning off."""
    client = smollm2_special_server.openai()
    r = client.chat.completions.create(model="m", messages=CHAT, max_tokens=8, temperature=0, extra_body={
        "ignore_eos": True})
    msg = r.choices[0].message
    assert msg.reasoning_content and not msg.content
    assert r.usage.reasoning_tokens > 0
    assert r.usage.completion_tokens_details.reasoning_tokens == r.usage.reasoning_tokens
    # streamed: the same reasoning arrives as reasoning_content deltas
    chunks = list(client.chat.completions.create(model="m", messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    streamed = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    assert streamed == msg.reasoning_content
    # separate_reasoning=false: everything is content
    r2 = client.chat.completions.create(model="m", messages=CHAT, max_tokens=8, temperature=0, extra_body={
        "ignore_eos": True, "separate_reasoning": False})
    assert r2.choices[0].message.reasoning_content is None
    assert r2.choices[0].message.content == msg.reasoning_content


def test_chat_template_from_file(smollm2_special_server):
    from transformers import AutoTokenizer
    base = smollm2_special_server.base_url
    auth = {"Authorization": f"Bearer {KEY}"}
    info = requests.get(f"{base}/get_model_info", headers=auth).json()
    tok = AutoTokenizer.from_pretrained(info["model_dir"])
    expected = tok.encode("### user: Hello!\n### assistant:", add_special_tokens=False)
    r = requests.post(f"{base}/v1/chat/completions", headers=auth,
                      json={"messages": CHAT, "max_tokens": 1}).json()
    assert r["usage"]["prompt_tokens"] == len(expected)


def test_tool_call_arguments_and_template_kwargs(smollm2_special_server):
    """Assistant tool calls with JSON-string arguments and chat_template_kwargs reach the template."""
    base = smollm2_special_server.base_url
    auth = {"Authorization": f"Bearer {KEY}"}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"location": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = requests.post(f"{base}/v1/chat/completions", headers=auth, json={
        "messages": messages, "max_tokens": 1, "chat_template_kwargs": {"anything": 1}})
    assert r.status_code == 200, r.text
