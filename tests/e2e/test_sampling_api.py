"""Issue 5 through the HTTP API with the official SDK: n, logprobs, structured output, seed 002's options."""
import json

import openai
import pytest
import requests

MSG = [{"role": "user", "content": "Name a color."}]


def test_n3_identical_at_temperature_zero_and_usage_counts_all(smollm2_server):
    client = smollm2_server.openai()
    r = client.chat.completions.create(model="m", messages=MSG, max_tokens=6, temperature=0, n=3,
                                       extra_body={"ignore_eos": True})
    assert len(r.choices) == 3 and [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) == 1
    assert r.usage.completion_tokens == 3 * 6


def test_chat_top_logprobs_shape(smollm2_server):
    client = smollm2_server.openai()
    r = client.chat.completions.create(model="m", messages=MSG, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy picks the top token
        assert all(t.logprob <= 0 for t in item.top_logprobs)


def test_seed002_optional_parameters_accepted(smollm2_server):
    """Every optional parameter of seed 002 in one request (as an agent would send them)."""
    client = smollm2_server.openai()
    r = client.chat.completions.create(
        model="step-3.5-flash", messages=MSG, max_tokens=96, temperature=0.7, top_p=0.9, frequency_penalty=0.2,
        presence_penalty=0.1, seed=3, logit_bias={"100": -5}, logprobs=True, top_logprobs=2, stop=["\n\n"],
        response_format={"type": "json_object"},
        extra_body={"top_k": 40, "min_p": 0.05, "top_a": 0.1, "repetition_penalty": 1.1,
                    "reasoning": {"effort": "low"}, "verbosity": "low", "some_unknown_field": 1})
    # json_object: the grammar closes the object, and what comes back parses as one
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # logprobs with 2 alternatives per generated token
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 for e in r.choices[0].logprobs.content)


@pytest.mark.parametrize("field, value", [
    ("verbosity", "extreme"), ("top_logprobs", 21), ("temperature", -1), ("top_p", 1.5), ("min_p", 2),
    ("top_a", -0.1), ("repetition_penalty", 0), ("logit_bias", {"1": 500}), ("seed", "x"), ("n", 0),
])
def test_out_of_range_values_are_400_naming_the_field(smollm2_server, field, value):
    body = {"model": "m", "messages": MSG, "max_tokens": 2, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    r = requests.post(f"{smollm2_server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert field in json.dumps(r.json()["error"])


def test_json_schema_response_format(smollm2_server):
    schema = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["color", "count"], "additionalProperties": False}
    client = smollm2_server.openai()
    r = client.chat.completions.create(
        model="m", messages=MSG, max_tokens=40, temperature=1.0, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}})
    data = json.loads(r.choices[0].message.content)
    assert data["color"] in ("red", "green", "blue") and 0 <= data["count"] <= 9


def test_bad_top_logprobs_through_sdk(smollm2_server):
    with pytest.raises(openai.BadRequestError) as e:
        smollm2_server.openai().chat.completions.create(model="m", messages=MSG, logprobs=True, top_logprobs=50)
    assert "top_logprobs" in str(e.value)
