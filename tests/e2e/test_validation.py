"""Seed 002's parameter ranges on /v1/chat/completions (a real server, SmolLM2): every value just outside
a range is answered 400 with the error naming the field, and the range's ends are accepted."""
from __future__ import annotations

import json

import openai
import pytest
import requests

MSG = [{"role": "user", "content": "Hi"}]

# (field, value just outside seed 002's range or of the wrong kind)
OUTSIDE = [
    ("temperature", 2.01), ("temperature", 9), ("temperature", -0.1),
    ("top_p", -0.1), ("top_p", 1.01),
    ("top_k", -1), ("top_k", 2.5),
    ("frequency_penalty", -2.01), ("frequency_penalty", 2.01),
    ("presence_penalty", -2.01), ("presence_penalty", 2.01),
    ("repetition_penalty", -0.1), ("repetition_penalty", 2.01),
    ("min_p", -0.1), ("min_p", 1.01),
    ("top_a", -0.1), ("top_a", 1.01),
    ("seed", 1.5), ("seed", "x"),
    ("max_tokens", 0), ("max_tokens", -3),
    ("logit_bias", {"1": 101}), ("logit_bias", {"x": 1}),
    ("logprobs", "sometimes"),
    ("top_logprobs", -1), ("top_logprobs", 21),
    ("response_format", {"type": "xml"}),
    ("structured_outputs", "yes please"),
    ("stop", 5),
    ("tools", "get_weather"),
    ("tool_choice", "sometimes"),
    ("parallel_tool_calls", "maybe"),
    ("verbosity", "extreme"),
    ("reasoning", {"effort": "enormous"}),
]

# (field, a value at an end of the range): accepted
ENDS = [
    ("temperature", 0.0), ("temperature", 2.0), ("top_p", 0.0), ("top_p", 1.0), ("top_k", 0), ("top_k", 1),
    ("frequency_penalty", -2.0), ("frequency_penalty", 2.0), ("presence_penalty", -2.0),
    ("presence_penalty", 2.0), ("repetition_penalty", 2.0), ("min_p", 0.0), ("min_p", 1.0), ("top_a", 0.0),
    ("top_a", 1.0), ("max_tokens", 1), ("top_logprobs", 0), ("top_logprobs", 20), ("verbosity", "high"),
    ("reasoning", {"effort": "none"}), ("reasoning", {"effort": "xhigh"}), ("structured_outputs", True),
]


@pytest.mark.parametrize("field, value", OUTSIDE, ids=[f"{f}={v!r}" for f, v in OUTSIDE])
def test_outside_the_seed002_range_is_400_naming_the_field(smollm2_server, field, value):
    body = {"model": "m", "messages": MSG, "max_tokens": 2, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    r = requests.post(f"{smollm2_server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] and error["param"].split(".")[0] == field, error
    assert field in error["message"], error


@pytest.mark.parametrize("field, value", ENDS, ids=[f"{f}={v!r}" for f, v in ENDS])
def test_the_ends_of_the_seed002_ranges_are_accepted(smollm2_server, field, value):
    body = {"model": "m", "messages": MSG, "max_tokens": 1, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    r = requests.post(f"{smollm2_server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_temperature_9_through_the_sdk(smollm2_server):
    with pytest.raises(openai.BadRequestError) as e:
        smollm2_server.openai().chat.completions.create(model="m", messages=MSG, max_tokens=2, temperature=9)
    assert e.value.status_code == 400
    assert json.dumps(e.value.body).count("temperature") >= 1


def test_top_p_zero_is_the_most_likely_token(smollm2_server):
    """top_p 0 (inside seed 002's range) samples like greedy decoding, whatever the temperature."""
    client = smollm2_server.openai()
    greedy = client.chat.completions.create(model="m", messages=MSG, max_tokens=8, temperature=0)
    for seed in (1, 2):
        r = client.chat.completions.create(model="m", messages=MSG, max_tokens=8, temperature=2.0, top_p=0.0,
                                           seed=seed)
        assert r.choices[0].message.content == greedy.choices[0].message.content
