"""Bad inputs get OpenAI-shaped 4xx errors naming the problem, and never disturb other requests."""
from __future__ import annotations

import threading

import openai
import pytest
import requests

CHAT = [{"role": "user", "content": "Count from one to ten in words."}]


def _post(server, path, body=None, data=None, headers=None):
    h = {"Content-Type": "application/json", **server.headers, **(headers or {})}
    return requests.post(f"{server.base_url}{path}", json=body, data=data, headers=h, timeout=120)


def _assert_error(r, status: int, *needles: str):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    for n in needles:
        assert n in err["message"], (n, err["message"])
    return err


# (path, body, status, words the message must contain)
BAD = [
    ("/v1/chat/completions", "{not json", 400, ["Malformed JSON"]),
    ("/v1/completions", "[1, 2]", 400, ["JSON object"]),
    ("/v1/chat/completions", {"model": "m"}, 400, ["messages", "required"]),
    ("/v1/chat/completions", {"messages": []}, 400, ["messages"]),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, ["role"]),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": "many"}, 400, ["max_tokens"]),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": "hot"}, 400, ["temperature"]),
    ("/v1/chat/completions", {"messages": CHAT, "stream": "yes please"}, 400, ["stream"]),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, ["tools"]),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": -1}, 400, ["temperature"]),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": 1.5}, 400, ["top_p"]),
    ("/v1/chat/completions", {"messages": CHAT, "top_k": 2.5}, 400, ["top_k"]),
    ("/v1/chat/completions", {"messages": CHAT, "min_p": 2}, 400, ["min_p"]),
    ("/v1/chat/completions", {"messages": CHAT, "frequency_penalty": 3}, 400, ["frequency_penalty"]),
    ("/v1/chat/completions", {"messages": CHAT, "presence_penalty": -3}, 400, ["presence_penalty"]),
    ("/v1/chat/completions", {"messages": CHAT, "repetition_penalty": 0}, 400, ["repetition_penalty"]),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": -1}, 400, ["max_tokens"]),
    ("/v1/chat/completions", {"messages": CHAT, "min_tokens": -2}, 400, ["min_tokens"]),
    ("/v1/chat/completions", {"messages": CHAT, "n": 0}, 400, ["n must"]),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 50}, 400, ["top_logprobs"]),
    ("/v1/chat/completions", {"messages": CHAT, "logit_bias": {"x": 1}}, 400, ["logit_bias"]),
    ("/v1/chat/completions", {"messages": CHAT, "logit_bias": {"10": 500}}, 400, ["logit_bias"]),
    ("/v1/chat/completions", {"messages": CHAT, "logit_bias": {"999999999": 1}}, 400, ["vocabulary"]),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 10_000_000}, 400,
     ["maximum context length", "10000000"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                        "image_url": {"url": "x"}}]}]},
     400, ["smollm2", "does not accept image"]),  # a text-only model: the error names it
    ("/v1/completions", {"prompt": "hi", "suffix": "bye"}, 400, ["suffix"]),
    ("/v1/completions", {"prompt": ""}, 400, ["prompt"]),
    ("/v1/completions", {"prompt": [999999999]}, 400, ["vocabulary"]),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 9_000_000}, 400, ["maximum context length"]),
    ("/v1/completions", {"prompt": "hi", "logprobs": 99}, 400, ["logprobs"]),
    ("/generate", {"sampling_params": {"max_new_tokens": 4}}, 400, ["text or input_ids"]),
    ("/generate", {"text": "hi", "sampling_params": {"temperature": -5}}, 400, ["temperature"]),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": "lots"}}, 400, ["max_new_tokens"]),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 10_000_000}}, 400,
     ["maximum context length"]),
    ("/generate", {"input_ids": [-1]}, 400, ["vocabulary"]),
    ("/abort_request", {}, 400, ["rid"]),
]


def test_bad_inputs_get_4xx_and_do_not_disturb(smollm2_server):
    client = smollm2_server.openai()
    alone = client.chat.completions.create(model="m", messages=CHAT, max_tokens=24, temperature=0)
    # a request streaming while the bad ones arrive must get exactly the same text
    got = {}

    def bystander():
        parts = []
        for chunk in client.chat.completions.create(model="m", messages=CHAT, max_tokens=24, temperature=0,
                                                    stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        got["text"] = "".join(parts)

    t = threading.Thread(target=bystander)
    t.start()
    for path, body, status, needles in BAD:
        if isinstance(body, str):
            r = _post(smollm2_server, path, data=body)
        else:
            r = _post(smollm2_server, path, body)
        _assert_error(r, status, *needles)
    for path in ("/v1/nope", "/generatee"):
        _assert_error(requests.post(f"{smollm2_server.base_url}{path}", json={}), 404, "Not found")
    _assert_error(requests.get(f"{smollm2_server.base_url}/v1/chat/completions"), 405, "not allowed")
    t.join(300)
    assert got["text"] == alone.choices[0].message.content
    smollm2_server.assert_alive()


def test_openai_sdk_raises_bad_request_with_message(smollm2_server):
    client = smollm2_server.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=CHAT, temperature=7000)
    assert "temperature" in str(e.value) and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="x", max_tokens=10_000_000)
    assert "maximum context length" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="x", suffix="y")
    assert "suffix" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=CHAT, stream=True, max_tokens=10_000_000)
    smollm2_server.assert_alive()


def test_prompt_longer_than_context(smollm2_server):
    info = requests.get(f"{smollm2_server.base_url}/get_model_info").json()
    words = " hello" * (info["context_length"] + 10)
    r = _post(smollm2_server, "/v1/completions", {"prompt": words, "max_tokens": 4})
    err = _assert_error(r, 400, "maximum context length", str(info["context_length"]))
    assert err["param"] in ("max_tokens", "messages", "prompt")
    smollm2_server.assert_alive()


def test_bad_grammar_is_a_400(smollm2_server):
    r = _post(smollm2_server, "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})
    assert r.status_code == 400, r.text
    smollm2_server.assert_alive()


def test_structured_output_json_schema(smollm2_server):
    import json
    client = smollm2_server.openai()
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    r = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Name a city as JSON."}], max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    # the grammar ends the object itself: a 12-character city fits well within 64 tokens
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"city"} and isinstance(value["city"], str) and len(value["city"]) <= 12
