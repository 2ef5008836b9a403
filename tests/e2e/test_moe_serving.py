"""MiniMax-M2 (tiny random weights in hub layout, MiniMax's chat template) served as its deployments run it:
`--tool-call-parser minimax-m2 --reasoning-parser minimax-append-think`. /v1/chat/completions (official openai
SDK) and /generate answer over real HTTP, with the tokens `ember.Engine` generates for the same prompt."""
from __future__ import annotations

import pytest

GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris today?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def minimax_dir(tmp_path_factory):
    from tests.tiny_models import tiny_model
    return tiny_model("minimax_m2", tmp_path_factory.getbasetemp() / "tiny-minimax-m2-e2e")


@pytest.fixture(scope="module")
def minimax_server(e2e_servers, minimax_dir):
    server = e2e_servers.get("minimax-m2", ["--model-path", str(minimax_dir), "--served-model-name", "minimax-m2",
                                            "--tool-call-parser", "minimax-m2",
                                            "--reasoning-parser", "minimax-append-think"])
    yield server
    e2e_servers.stop("minimax-m2")


@pytest.fixture(scope="module")
def engine(minimax_dir):
    from ember import Engine
    eng = Engine(model_path=str(minimax_dir), cpu_kv_cache_gb=0.5)  # the server's settings (conftest COMMON_FLAGS)
    yield eng
    if hasattr(eng, "shutdown"):
        eng.shutdown()


@pytest.fixture(scope="module")
def expected(engine):
    """The prompt the template renders (tools included) and the Engine's greedy continuation of it."""
    ids = engine.tokenizer.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    assert engine.tokenizer.decode(ids).endswith("]~b]ai\n<think>\n")  # the template opens the thinking block
    return ids, engine.generate(input_ids=ids, sampling_params=GREEDY)


def test_generate_returns_the_engines_tokens(minimax_server, expected):
    import requests
    ids, out = expected
    r = requests.post(f"{minimax_server.base_url}/generate", json={"input_ids": ids, "sampling_params": GREEDY},
                      timeout=300)
    r.raise_for_status()
    d = r.json()
    assert d["output_ids"] == out["output_ids"] and len(d["output_ids"]) == GREEDY["max_new_tokens"]
    assert d["text"] == out["text"]
    assert d["meta_info"]["prompt_tokens"] == len(ids)


def test_chat_completion_returns_the_engines_tokens(minimax_server, expected, engine):
    ids, out = expected
    client = minimax_server.openai()
    resp = client.chat.completions.create(model="minimax-m2", messages=MESSAGES, tools=TOOLS, max_tokens=16,
                                          temperature=0, logprobs=True, extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == GREEDY["max_new_tokens"]
    # one logprob entry per generated token: the same tokens as the Engine's
    tokens = [e.token for e in choice.logprobs.content]
    assert tokens == [engine.tokenizer.decode([t]) for t in out["output_ids"]]
    # minimax-append-think splits nothing off: the prompt's <think> is prepended to the content
    assert choice.message.content == "<think>" + out["text"]
    assert choice.message.tool_calls is None and getattr(choice.message, "reasoning_content", None) is None
    assert choice.finish_reason == "length"
