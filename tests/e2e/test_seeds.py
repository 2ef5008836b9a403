"""The client code of seeds 000 and 003, run as written against ember on the bundled model
(Qwen2.5-Coder-0.5B-Instruct): only base_url changed and max_tokens reduced (CPU inference is slow)."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from ember.utils import print_highlight

USAGE_KEYS = {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details", "reasoning_tokens"}


def _check_chat_dict(response: dict, model: str) -> None:
    """The fields seed 003 shows for a chat completion."""
    assert set(response) >= {"id", "object", "created", "model", "choices", "usage", "metadata"}
    assert response["object"] == "chat.completion" and response["model"] == model
    choice = response["choices"][0]
    assert set(choice) >= {"index", "message", "logprobs", "finish_reason", "matched_stop"}
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["message"]["reasoning_content"] is None and choice["message"]["tool_calls"] is None
    assert choice["logprobs"] is None
    if choice["finish_reason"] == "stop":
        assert choice["matched_stop"] == 151645  # <|im_end|>
    assert set(response["usage"]) >= USAGE_KEYS and response["usage"]["reasoning_tokens"] == 0
    # the prefix cache holds whole pages (16 tokens), never the whole prompt: the last token is computed
    cached, prompt = response["usage"]["prompt_tokens_details"]["cached_tokens"], response["usage"]["prompt_tokens"]
    assert cached % 16 == 0 and 0 <= cached < prompt, (cached, prompt)
    assert response["metadata"] == {"weight_version": "default"}


# ------------------------------------------------------------------------------------------ seed 003
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_seed003_curl(qwen_server):
    port = qwen_server.port
    curl_command = f"""
curl -s http://127.0.0.1:{port}/v1/chat/completions \
-H "Content-Type: application/json" \
-d '{{"model": "qwen/qwen2.5-0.5b-instruct", "messages": [{{"role": "user", "content": "What is the capital of France?"}}], "max_tokens": 16}}'
"""
    response = json.loads(subprocess.check_output(curl_command, shell=True))
    print_highlight(response)
    _check_chat_dict(response, "qwen/qwen2.5-0.5b-instruct")
    assert "Paris" in response["choices"][0]["message"]["content"]


def test_seed003_requests(qwen_server):
    import requests
    port = qwen_server.port
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    data = {
        "model": "qwen/qwen2.5-0.5b-instruct",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
    }
    response = requests.post(url, json=data)
    print_highlight(response.json())
    _check_chat_dict(response.json(), "qwen/qwen2.5-0.5b-instruct")


def test_seed003_openai_client(qwen_server):
    import openai
    port = qwen_server.port
    client = openai.Client(base_url=f"http://127.0.0.1:{port}/v1", api_key="None")
    response = client.chat.completions.create(
        model="qwen/qwen2.5-0.5b-instruct",
        messages=[
            {"role": "user", "content": "List 3 countries and their capitals."},
        ],
        temperature=0,
        max_tokens=16,
    )
    print_highlight(response)
    assert response.choices[0].message.content
    assert response.choices[0].finish_reason in ("stop", "length")
    assert hasattr(response.choices[0], "matched_stop")
    assert response.choices[0].message.reasoning_content is None
    assert response.usage.reasoning_tokens == 0
    assert response.metadata == {"weight_version": "default"}


def test_seed003_openai_streaming(qwen_server, capsys):
    import openai
    port = qwen_server.port
    client = openai.Client(base_url=f"http://127.0.0.1:{port}/v1", api_key="None")
    # Use stream=True for streaming responses
    response = client.chat.completions.create(
        model="qwen/qwen2.5-0.5b-instruct",
        messages=[
            {"role": "user", "content": "List 3 countries and their capitals."},
        ],
        temperature=0,
        max_tokens=16,
        stream=True,
    )
    # Handle the streaming output
    for chunk in response:
        if chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    streamed = capsys.readouterr().out
    full = client.chat.completions.create(model="qwen/qwen2.5-0.5b-instruct",
                                          messages=[{"role": "user", "content": "List 3 countries and their capitals."}],
                                          temperature=0, max_tokens=16)
    assert streamed == full.choices[0].message.content


def test_seed003_native_generate(qwen_server):
    import requests
    port = qwen_server.port
    response = requests.post(
        f"http://127.0.0.1:{port}/generate",
        json={
            "text": "The capital of France is",
            "sampling_params": {
                "temperature": 0,
                "max_new_tokens": 16,
            },
        },
    )
    print_highlight(response.json())
    d = response.json()
    assert d["text"].startswith(" Paris")
    assert len(d["output_ids"]) == 16
    m = d["meta_info"]
    assert m["finish_reason"] == {"type": "length", "length": 16}
    assert m["prompt_tokens"] == 5 and m["completion_tokens"] == 16
    assert m["weight_version"] == "default" and isinstance(m["id"], str)
    assert m["cached_tokens"] == 0 and m["e2e_latency"] > 0  # 5 prompt tokens: less than a cached page


def test_seed003_native_generate_streaming(qwen_server, capsys):
    import requests
    port = qwen_server.port
    response = requests.post(
        f"http://127.0.0.1:{port}/generate",
        json={
            "text": "The capital of France is",
            "sampling_params": {
                "temperature": 0,
                "max_new_tokens": 16,
            },
            "stream": True,
        },
        stream=True,
    )
    prev = 0
    saw_done = False
    for chunk in response.iter_lines(decode_unicode=False):
        chunk = chunk.decode("utf-8")
        if chunk and chunk.startswith("data:"):
            if chunk == "data: [DONE]":
                saw_done = True
                break
            data = json.loads(chunk[5:].strip("\n"))
            output = data["text"]
            print(output[prev:], end="", flush=True)
            prev = len(output)
    assert saw_done
    assert capsys.readouterr().out.startswith(" Paris")


# ------------------------------------------------------------------------------------------ seed 000
def test_seed000_completion(qwen_server):
    from openai import OpenAI
    client = OpenAI(
        api_key="EMPTY",
        base_url=f"http://127.0.0.1:{qwen_server.port}/v1",
    )
    response = client.completions.create(
        model="/root/autodl-fs/stepfun-ai/Step-3___5-Flash",
        prompt="简要介绍一下 Step-3.5-Flash 模型的特点。",
        max_tokens=12,
        top_p=0.95,
        temperature=1.0,
    )
    print(response)
    assert response.object == "text_completion"
    assert response.model == "/root/autodl-fs/stepfun-ai/Step-3___5-Flash"
    c = response.choices[0]
    assert c.finish_reason in ("stop", "length") and hasattr(c, "matched_stop") and c.logprobs is None
    assert response.usage.completion_tokens <= 12 and response.usage.prompt_tokens > 0
    assert response.usage.reasoning_tokens == 0
    assert response.metadata == {"weight_version": "default"}


def test_seed000_chat(qwen_server):
    from openai import OpenAI
    client = OpenAI(
        api_key="EMPTY",
        base_url=f"http://127.0.0.1:{qwen_server.port}/v1",
    )
    completion = client.chat.completions.create(
        model="step-3.5-flash",
        messages=[
            {
                "role": "system",
                "content": "You are an AI chat assistant provided by StepFun. You are good at Chinese, English, "
                           "and many other languages.",
            },
            {
                "role": "user",
                "content": "介绍一下阶跃星辰！"
            },
        ],
        max_tokens=12,
    )
    print(completion.choices[0].message.content)
    assert completion.choices[0].message.content
    assert completion.model == "step-3.5-flash"


def test_seed000_streaming(qwen_server, capsys):
    from openai import OpenAI
    client = OpenAI(
        api_key="EMPTY",
        base_url=f"http://127.0.0.1:{qwen_server.port}/v1",
    )
    stream = client.chat.completions.create(
        model="step-3.5-flash",
        messages=[{"role": "user", "content": "分析一下阶跃星辰未来的发展目标"}],
        stream=True,
        max_tokens=12,
        top_p=0.95,
        temperature=1.0,
    )
    for chunk in stream:
        delta = chunk.choices[0].delta
        if delta and delta.content:
            print(delta.content, end="", flush=True)
    assert capsys.readouterr().out


def test_seed000_tool_calling(qwen_server):
    from openai import OpenAI
    client = OpenAI(base_url=f"http://127.0.0.1:{qwen_server.port}/v1", api_key="EMPTY")

    def get_weather(location: str, unit: str):
        return f"Getting the weather for {location} in {unit}..."

    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "City and state, e.g., 'San Francisco, CA'"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
                },
                "required": ["location", "unit"]
            }
        }
    }]

    response = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "What's the weather like in San Francisco? use celsius."}],
        tools=tools,
        tool_choice="auto"
    )  # as the seed writes it: no temperature, no max_tokens (the model's own sampling defaults apply)
    print(response)
    assert response.choices[0].finish_reason == "tool_calls"
    assert response.choices[0].matched_stop is None
    tool_call = response.choices[0].message.tool_calls[0].function
    print(f"Function called: {tool_call.name}")
    print(f"Arguments: {tool_call.arguments}")
    print(f"Result: {get_weather(**json.loads(tool_call.arguments))}")
    assert tool_call.name == "get_weather"
    assert set(json.loads(tool_call.arguments)) == {"location", "unit"}
    assert response.choices[0].message.tool_calls[0].id
    assert response.choices[0].message.tool_calls[0].type == "function"
