"""The OpenAI-compatible routes on a real server (SmolLM2-135M), through the official openai SDK."""
from __future__ import annotations

import asyncio
import json

import pytest
import requests

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_list_and_any_model_name(smollm2_server):
    client = smollm2_server.openai()
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    # a single-model server answers whatever model name a request gives
    r = client.completions.create(model="whatever/name", prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.model == "whatever/name"


def test_completion_shapes(smollm2_server):
    client = smollm2_server.openai()
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    c = r.choices[0]
    assert c.index == 0 and isinstance(c.text, str) and c.text
    assert c.finish_reason in ("stop", "length")
    assert hasattr(c, "matched_stop")
    assert r.usage.completion_tokens == 8 if c.finish_reason == "length" else r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # 5 prompt tokens: less than one cached page
    assert r.model_extra["metadata"] == {"weight_version": "default"}
    assert r.usage.model_extra["reasoning_tokens"] == 0


def test_completion_prompt_forms(smollm2_server):
    client = smollm2_server.openai()
    text = client.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    # list of strings -> one choice per prompt, in order
    r = client.completions.create(model="m", prompt=[PROMPT, "One, two, three,"], max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == text
    # token ids and lists of token ids
    ids = _encode(smollm2_server, PROMPT)
    r = client.completions.create(model="m", prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == text
    r = client.completions.create(model="m", prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text for c in r.choices] == [text, text]
    # echo
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    assert r.choices[0].text == PROMPT + text


def _encode(server, text: str) -> list[int]:
    """The prompt's token ids, from the tokenizer the server loaded."""
    from transformers import AutoTokenizer
    info = requests.get(f"{server.base_url}/get_model_info").json()
    ids = AutoTokenizer.from_pretrained(info["model_dir"]).encode(text)
    r = requests.post(f"{server.base_url}/generate", json={"text": text, "sampling_params": {"max_new_tokens": 1}})
    assert len(ids) == r.json()["meta_info"]["prompt_tokens"]
    return ids


def test_completion_n_logprobs_stop(smollm2_server):
    client = smollm2_server.openai()
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=5, temperature=0, n=2, logprobs=3)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    full = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    word = full.strip().split()[0]
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0, stop=[word])
    c = r.choices[0]
    assert word not in c.text and c.finish_reason == "stop" and c.matched_stop == word


def test_completion_stream_with_usage(smollm2_server):
    client = smollm2_server.openai()
    full = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]


def test_chat_shapes_and_stream(smollm2_server):
    client = smollm2_server.openai()
    r = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert msg.model_extra.get("reasoning_content", "missing") is None
    assert msg.tool_calls is None
    assert r.choices[0].model_extra.get("matched_stop", "missing") != "missing"
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    chunks = list(client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_chat_sampling_params_and_logprobs(smollm2_server):
    client = smollm2_server.openai()
    r = client.chat.completions.create(
        model="m", messages=CHAT, max_completion_tokens=6, temperature=0.7, top_p=0.9, seed=7,
        frequency_penalty=0.1, presence_penalty=0.1, logprobs=True, top_logprobs=2, n=2,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2,
                    "skip_special_tokens": True, "top_a": 0.1, "unknown_field_is_ignored": 1})
    assert len(r.choices) == 2
    # one logprob entry per generated token, two alternatives each
    assert sum(len(c.logprobs.content) for c in r.choices) == r.usage.completion_tokens
    for c in r.choices:
        assert len(c.logprobs.content) >= 2  # min_tokens
        assert all(len(e.top_logprobs) == 2 for e in c.logprobs.content)
    # the same seed gives the same text
    again = client.chat.completions.create(model="m", messages=CHAT, max_tokens=6, temperature=0.7, top_p=0.9,
                                           seed=7, frequency_penalty=0.1, presence_penalty=0.1, n=2,
                                           extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                                                       "min_tokens": 2, "top_a": 0.1})
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_logit_bias_and_ignore_eos(smollm2_server):
    base = smollm2_server.base_url
    client = smollm2_server.openai()

    def generate(bias: dict) -> dict:
        return requests.post(f"{base}/generate", json={"text": PROMPT, "sampling_params": {
            "temperature": 0, "max_new_tokens": 1, "logit_bias": bias}}).json()

    greedy = generate({})
    banned = generate({str(greedy["output_ids"][0]): -100})
    assert banned["output_ids"][0] != greedy["output_ids"][0]
    # the OpenAI routes apply the same bias: a banned greedy token is replaced by the native route's pick ...
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=1, temperature=0,
                                  logit_bias={str(greedy["output_ids"][0]): -100})
    assert r.choices[0].text == banned["text"] != greedy["text"]
    # ... and a +100 bias forces a token the model would not write, on completions and chat alike
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(requests.get(f"{base}/get_model_info").json()["model_dir"])
    forced = tok.encode(" zebra")[0]
    piece = tok.decode([forced])
    assert forced not in greedy["output_ids"] and piece.strip()
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=2, temperature=0,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == piece * 2, r.choices[0].text
    r = client.chat.completions.create(model="m", messages=CHAT, max_tokens=2, temperature=0,
                                       logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert piece.strip() in (r.choices[0].message.content or ""), r.choices[0].message.content
    r = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Say OK."}], max_tokens=3, temperature=0,
        extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_concurrent_streams_match_solo(smollm2_server):
    """16 concurrent streaming clients each get exactly the text they get alone (temperature 0)."""
    subjects = ["France", "Japan", "Italy", "Spain", "Egypt", "Peru", "Kenya", "Canada", "Norway", "Chile",
                "India", "Brazil", "Greece", "Mexico", "Poland", "Turkey"]
    prompts = [[{"role": "user", "content": f"Tell me one fact about {s}."}] for s in subjects]
    client = smollm2_server.openai()
    solo = [client.chat.completions.create(model="m", messages=p, max_tokens=16, temperature=0).choices[0]
            .message.content for p in prompts]

    async def run_all():
        aclient = smollm2_server.async_openai()

        async def one(p):
            stream = await aclient.chat.completions.create(model="m", messages=p, max_tokens=16, temperature=0,
                                                           stream=True)
            parts = []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
            return "".join(parts)

        try:
            return await asyncio.gather(*[one(p) for p in prompts])
        finally:
            await aclient.close()

    together = asyncio.run(run_all())
    for s, a, b in zip(subjects, solo, together):
        assert a == b, f"{s}: alone {a!r} != concurrent {b!r}"


def test_native_generate(smollm2_server):
    base = smollm2_server.base_url
    r = requests.post(f"{base}/generate", json={"text": PROMPT, "sampling_params": {"temperature": 0,
                                                                                   "max_new_tokens": 8}})
    assert r.status_code == 200
    d = r.json()
    assert set(d) >= {"text", "output_ids", "meta_info"}
    m = d["meta_info"]
    assert set(m) >= {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency"}
    assert m["finish_reason"] in ({"type": "length", "length": 8},) or m["finish_reason"]["type"] == "stop"
    assert len(d["output_ids"]) == m["completion_tokens"]
    # batch of texts, input_ids, and logprobs
    r = requests.post(f"{base}/generate", json={"text": [PROMPT, "1, 2, 3,"],
                                                "sampling_params": {"temperature": 0, "max_new_tokens": 4}})
    batch = r.json()
    assert isinstance(batch, list) and len(batch) == 2 and batch[0]["output_ids"] == d["output_ids"][:4]
    r = requests.post(f"{base}/generate", json={"input_ids": [d["output_ids"][:3]] * 2, "return_logprob": True,
                                                "top_logprobs_num": 2,
                                                "sampling_params": {"temperature": 0, "max_new_tokens": 3}})
    out = r.json()
    assert len(out) == 2 and len(out[0]["meta_info"]["output_token_logprobs"]) == 3
    assert all(len(t) <= 2 for t in out[0]["meta_info"]["output_top_logprobs"])
    # a stop string reports what matched
    word = d["text"].strip().split()[0]
    r = requests.post(f"{base}/generate", json={"text": PROMPT, "sampling_params": {
        "temperature": 0, "max_new_tokens": 8, "stop": [word]}}).json()
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": word}


def test_native_generate_stream_is_cumulative(smollm2_server):
    base = smollm2_server.base_url
    full = requests.post(f"{base}/generate", json={"text": PROMPT, "sampling_params": {
        "temperature": 0, "max_new_tokens": 8}}).json()
    resp = requests.post(f"{base}/generate", json={"text": PROMPT, "stream": True, "sampling_params": {
        "temperature": 0, "max_new_tokens": 8}}, stream=True)
    texts, done = [], False
    for line in resp.iter_lines(decode_unicode=False):
        line = line.decode()
        if line.startswith("data:"):
            if line == "data: [DONE]":
                done = True
                break
            texts.append(json.loads(line[5:].strip())["text"])
    assert done and texts[-1] == full["text"]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_info_routes(smollm2_server):
    base = smollm2_server.base_url
    assert requests.get(f"{base}/health").status_code == 200
    assert requests.get(f"{base}/health_generate").status_code == 200
    info = requests.get(f"{base}/get_model_info").json()
    assert info["is_generation"] is True and info["context_length"] > 0
    server = requests.get(f"{base}/get_server_info").json()
    assert server["served_model_name"] == "smollm2"
    stats = server["engine_stats"]
    assert stats["total_pages"] > 0 and 0 <= stats["free_pages"] <= stats["total_pages"]
    assert "ember_free_pages" in requests.get(f"{base}/metrics").text


def test_flush_cache_and_abort_request(smollm2_server):
    base = smollm2_server.base_url
    r = requests.post(f"{base}/flush_cache")
    assert r.status_code == 200
    stats = smollm2_server.stats()
    assert stats["cached_pages"] == 0
    r = requests.post(f"{base}/abort_request", json={"rid": "no-such-request"})
    assert r.status_code == 200
    # abort a running request by its id
    import threading
    result = {}

    def run():
        result["r"] = requests.post(f"{base}/generate", json={
            "text": PROMPT, "rid": "abort-me", "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}).json()

    t = threading.Thread(target=run)
    t.start()
    _wait_running(smollm2_server, 1)
    assert requests.post(f"{base}/abort_request", json={"rid": "abort-me"}).status_code == 200
    t.join(60)
    assert not t.is_alive()
    assert result["r"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert result["r"]["meta_info"]["completion_tokens"] < 400


def _wait_running(server, n, timeout=60.0):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.stats()["running"] >= n:
            return
        time.sleep(0.05)
    raise AssertionError("request did not start running")


def _wait_idle(server, timeout=10.0) -> dict:
    import time
    deadline = time.monotonic() + timeout
    stats = server.stats()
    while time.monotonic() < deadline:
        stats = server.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        time.sleep(0.1)
    raise AssertionError(f"engine still busy: {stats}")


def _aborts(server) -> int:
    text = requests.get(f"{server.base_url}/metrics", timeout=30).text
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("ember_aborted_requests_total")))


def test_stream_disconnect_frees_pages(smollm2_server):
    """A client that goes away after 3 chunks: its request is aborted (not run to its 4,000 tokens) and
    its pages freed."""
    base = smollm2_server.base_url
    requests.post(f"{base}/flush_cache")
    before = _wait_idle(smollm2_server)
    aborts = _aborts(smollm2_server)
    resp = requests.post(f"{base}/v1/chat/completions", stream=True, json={
        "model": "m", "messages": CHAT, "max_tokens": 4000, "stream": True, "ignore_eos": True})
    n = 0
    for line in resp.iter_lines():
        if line.startswith(b"data:"):
            n += 1
            if n == 3:
                break
    resp.close()
    after = _wait_idle(smollm2_server, timeout=120)
    assert _aborts(smollm2_server) == aborts + 1  # the API aborted it in the engine
    # every page is free again except those the prefix cache keeps
    assert after["free_pages"] + after["cached_pages"] == after["total_pages"], after
    assert before["free_pages"] + before["cached_pages"] == before["total_pages"]
    smollm2_server.assert_alive()
    r = smollm2_server.openai().chat.completions.create(model="m", messages=CHAT, max_tokens=4, temperature=0)
    assert r.choices[0].message.content


def test_nonstream_disconnect_aborts(smollm2_server):
    base = smollm2_server.base_url
    _wait_idle(smollm2_server)
    aborts = _aborts(smollm2_server)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{base}/v1/completions", timeout=2.0, json={
            "model": "m", "prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True})
    after = _wait_idle(smollm2_server, timeout=120)
    assert _aborts(smollm2_server) == aborts + 1
    assert after["free_pages"] + after["cached_pages"] == after["total_pages"], after


def test_prefix_cache_hits_are_reported(smollm2_server):
    """The same long prompt twice: the second request reads whole pages from the prefix cache, and every
    API reports them (OpenAI cached_tokens, native meta_info.cached_tokens)."""
    base = smollm2_server.base_url
    client = smollm2_server.openai()
    page = smollm2_server.stats()["page_size"]
    prompt = "Here is a list of fruits: " + ", ".join(["apple", "pear", "plum", "fig"] * 12) + ". The best is"
    first = client.completions.create(model="m", prompt=prompt, max_tokens=1, temperature=0)
    second = client.completions.create(model="m", prompt=prompt, max_tokens=1, temperature=0)
    n_prompt = second.usage.prompt_tokens
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert n_prompt > 3 * page
    assert cached % page == 0 and n_prompt - page <= cached <= n_prompt, (cached, n_prompt)
    assert first.usage.prompt_tokens_details.cached_tokens <= cached
    native = requests.post(f"{base}/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 1}})
    assert native.json()["meta_info"]["cached_tokens"] == cached
