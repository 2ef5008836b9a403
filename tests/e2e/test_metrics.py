"""/metrics: SGLang's metric names and types, moving by exactly what a scripted run did."""
from __future__ import annotations

import time

import requests
from prometheus_client.parser import text_string_to_metric_families

COUNTERS = ["sglang:prompt_tokens", "sglang:generation_tokens", "sglang:cached_tokens", "sglang:num_requests",
            "sglang:num_aborted_requests"]
HISTOGRAMS = ["sglang:time_to_first_token_seconds", "sglang:inter_token_latency_seconds",
              "sglang:e2e_request_latency_seconds", "sglang:queue_time_seconds"]
GAUGES = ["sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:num_used_tokens", "sglang:token_usage",
          "sglang:cache_hit_rate", "sglang:gen_throughput"]


def scrape(server) -> tuple[dict, dict]:
    """({family name: type}, {(sample name, sorted labels without model_name): value})."""
    r = requests.get(f"{server.base_url}/metrics", headers=server.headers, timeout=30)
    assert r.status_code == 200
    types, values = {}, {}
    for fam in text_string_to_metric_families(r.text):
        types[fam.name] = fam.type
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            values[(s.name, labels)] = s.value
    return types, values


def delta(before, after, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_names_types_and_counts_under_a_scripted_run(smollm2_server):
    server = smollm2_server
    client = server.openai()
    types, before = scrape(server)
    for name in COUNTERS:
        assert types.get(name) == "counter", (name, types.get(name))
    for name in HISTOGRAMS:
        assert types.get(name) == "histogram", (name, types.get(name))
    for name in GAUGES:
        assert types.get(name) == "gauge", (name, types.get(name))

    prompt = completion = 0
    done = []  # completion tokens of each engine request that finished by length
    for i in range(3):  # non-streamed chat, forced to its max_tokens
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"Count to {i + 3}."}],
                                           max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        prompt += r.usage.prompt_tokens
        completion += r.usage.completion_tokens
        done.append(r.usage.completion_tokens)
    # streamed completions with n=2: two engine requests in one HTTP request
    chunks = list(client.completions.create(model="m", prompt="Once upon a time", max_tokens=5, n=2, stream=True,
                                            temperature=0.8, seed=3, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    usage = chunks[-1].usage
    prompt += usage.prompt_tokens
    completion += usage.completion_tokens
    done += [5, 5]
    # a stream the client drops after its first chunk: aborted in the engine
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Write a long story."}],
                                            max_tokens=400, stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, after = scrape(server)
        if delta(before, after, "sglang:num_requests_total", finish_reason="abort") >= 1:
            break
        time.sleep(0.2)

    assert delta(before, after, "sglang:num_requests_total", finish_reason="length") == len(done) == 5
    assert delta(before, after, "sglang:num_requests_total", finish_reason="abort") == 1
    assert delta(before, after, "sglang:num_aborted_requests_total") == 1
    aborted_prompt = delta(before, after, "sglang:prompt_tokens_total") - prompt
    assert aborted_prompt > 0  # the aborted request's prompt was counted too (it was prefilled)
    generated = delta(before, after, "sglang:generation_tokens_total")
    assert completion < generated  # plus what the aborted stream got before it went
    assert delta(before, after, "sglang:time_to_first_token_seconds_count") == 6
    assert delta(before, after, "sglang:e2e_request_latency_seconds_count") == 6
    assert delta(before, after, "sglang:queue_time_seconds_count") == 6
    # one inter-token gap per token after the first, for every request
    assert delta(before, after, "sglang:inter_token_latency_seconds_count") == generated - 6
    assert after[("sglang:gen_throughput", ())] > 0
    assert 0 <= after[("sglang:token_usage", ())] <= 1
    assert after[("sglang:num_running_reqs", ())] == 0
    assert ("ember_total_pages", ()) in after  # ember's own gauges stay
