"""ember.bench_serving: workload generation (seeded, exact lengths), metric computation from known
timings, and one short real run against `ember serve` on smollm2-135m."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from ember import bench_serving as bs


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def _encode_len(tok, text):
    return len(tok.encode(text, add_special_tokens=False))


def test_random_workload_exact_lengths_and_deterministic(tokenizer):
    a = bs.sample_random_requests(tokenizer, 6, input_len=100, output_len=16, seed=7)
    b = bs.sample_random_requests(tokenizer, 6, input_len=100, output_len=16, seed=7)
    c = bs.sample_random_requests(tokenizer, 6, input_len=100, output_len=16, seed=8)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert [r.prompt for r in a] != [r.prompt for r in c]
    assert len({r.prompt for r in a}) == 6
    for r in a:
        assert r.api == "completions" and r.prompt_len == 100 and r.output_len == 16
        assert _encode_len(tokenizer, r.prompt) == 100


def test_random_workload_range_ratio(tokenizer):
    reqs = bs.sample_random_requests(tokenizer, 10, input_len=60, output_len=20, range_ratio=0.5, seed=3)
    for r in reqs:
        assert 30 <= r.prompt_len <= 60 and 10 <= r.output_len <= 20
        assert _encode_len(tokenizer, r.prompt) == r.prompt_len
    assert len({r.prompt_len for r in reqs}) > 1


def test_shared_prefix_workload(tokenizer):
    reqs = bs.sample_shared_prefix_requests(tokenizer, 6, system_prompt_len=120, question_len=12, output_len=8,
                                            num_groups=2, seed=5)
    again = bs.sample_shared_prefix_requests(tokenizer, 6, 120, 12, 8, num_groups=2, seed=5)
    assert [r.prompt for r in reqs] == [r.prompt for r in again]
    for r in reqs:
        assert r.prompt_len == 132 and _encode_len(tokenizer, r.prompt) == 132
    ids = [tokenizer.encode(r.prompt, add_special_tokens=False) for r in reqs]
    # groups alternate: requests 0, 2, 4 share one 120-token prefix, 1, 3, 5 another
    assert ids[0][:120] == ids[2][:120] == ids[4][:120]
    assert ids[1][:120] == ids[3][:120] == ids[5][:120]
    assert ids[0][:120] != ids[1][:120]
    assert len({tuple(i) for i in ids}) == 6


def test_chat_workload(tokenizer):
    prompts = bs.load_chat_prompts()
    assert len(prompts) >= 40
    reqs = bs.sample_chat_requests(tokenizer, 45, output_len=32, seed=1)
    assert len(reqs) == 45 and all(r.api == "chat" and r.output_len == 32 for r in reqs)
    assert len({json.dumps(r.prompt) for r in reqs}) == len(prompts)  # cycles through every prompt
    assert [r.prompt for r in reqs] == [r.prompt for r in bs.sample_chat_requests(tokenizer, 45, 32, seed=1)]
    for r in reqs[:3]:
        text = tokenizer.apply_chat_template(r.prompt, add_generation_prompt=True, tokenize=False)
        assert r.prompt_len == _encode_len(tokenizer, text)


def _out(ttft, gaps, prompt_len=10, expected=None):
    itl = list(gaps)
    return bs.RequestOutput(success=True, prompt_len=prompt_len, output_len=len(itl) + 1,
                            expected_output_len=expected if expected is not None else len(itl) + 1,
                            ttft=ttft, latency=ttft + sum(itl), itl=itl)


def test_metrics_from_known_timings():
    outs = [_out(0.1, [0.01] * 4), _out(0.2, [0.02] * 4), _out(0.3, [0.03] * 4), _out(0.4, [0.04] * 4),
            bs.RequestOutput(success=False, error="boom")]
    m = bs.calculate_metrics(outs, duration=2.0)
    assert m["completed"] == 4 and m["failed"] == 1 and m["errors"] == ["boom"]
    assert m["total_input_tokens"] == 40 and m["total_output_tokens"] == 20
    assert m["request_throughput"] == pytest.approx(2.0)
    assert m["output_throughput"] == pytest.approx(10.0)
    assert m["total_throughput"] == pytest.approx(30.0)
    ttfts = np.array([100.0, 200.0, 300.0, 400.0])
    assert m["mean_ttft_ms"] == pytest.approx(250.0)
    assert m["median_ttft_ms"] == pytest.approx(250.0)
    assert m["p90_ttft_ms"] == pytest.approx(np.percentile(ttfts, 90)) == pytest.approx(370.0)
    assert m["p99_ttft_ms"] == pytest.approx(397.0)
    # ITL pools every gap: 4 each of 10, 20, 30, 40 ms
    assert m["median_itl_ms"] == pytest.approx(25.0)
    assert m["p90_itl_ms"] == pytest.approx(40.0)
    assert m["mean_itl_ms"] == pytest.approx(25.0)
    # TPOT per request = (latency - ttft) / (out - 1) = the gap
    assert m["mean_tpot_ms"] == pytest.approx(25.0)
    assert m["median_e2e_latency_ms"] == pytest.approx(350.0)  # latencies 140, 280, 420, 560 ms
    assert m["output_len_mismatches"] == 0
    assert bs.calculate_metrics([_out(0.1, [0.01], expected=5)], 1.0)["output_len_mismatches"] == 1


def test_metrics_empty():
    m = bs.calculate_metrics([], duration=1.0)
    assert m["completed"] == 0 and m["output_throughput"] == 0 and m["p99_itl_ms"] == 0


def test_cli_parses_and_payload():
    parser = argparse.ArgumentParser()
    bs.add_cli_args(parser)
    args = parser.parse_args(["--model", "m", "--dataset-name", "chat", "--max-concurrency", "4",
                              "--extra-request-body", '{"top_k": 1}'])
    assert args.request_rate == float("inf") and args.ignore_eos and args.max_concurrency == 4
    body = bs._payload(bs.RequestSpec([{"role": "user", "content": "hi"}], 5, 7, "chat"), args)
    assert body["messages"][0]["content"] == "hi" and body["max_tokens"] == 7 and body["min_tokens"] == 7
    assert body["ignore_eos"] is True and body["stream"] is True and body["top_k"] == 1
    args = parser.parse_args(["--model", "m", "--no-ignore-eos"])
    body = bs._payload(bs.RequestSpec("x", 1, 3), args)
    assert body["prompt"] == "x" and "ignore_eos" not in body and "min_tokens" not in body


def test_real_run_against_ember(tmp_path, smollm2_dir):
    out = tmp_path / "r.json"
    rc = bs.main(["--launch", "ember serve --model-path smollm2-135m --num-threads 1 --log-level warning",
                  "--launch-log", str(tmp_path / "server.log"), "--launch-timeout", "300",
                  "--model", "smollm2-135m", "--dataset-name", "random", "--random-input-len", "32",
                  "--output-len", "8", "--num-prompts", "4", "--max-concurrency", "2",
                  "--warmup-output-len", "2", "--disable-tqdm", "--output-json", str(out), "--output-details"])
    assert rc == 0
    r = json.loads(out.read_text())
    m = r["metrics"]
    assert m["completed"] == 4 and m["failed"] == 0
    assert m["total_output_tokens"] == 32 and m["output_len_mismatches"] == 0  # ignore_eos honoured
    assert m["total_input_tokens"] >= 4 * 32
    for k in ("request_throughput", "output_throughput", "total_throughput", "median_ttft_ms", "p90_ttft_ms",
              "p99_ttft_ms", "median_itl_ms", "p90_itl_ms", "p99_itl_ms", "median_e2e_latency_ms"):
        assert m[k] > 0, k
    assert m["median_ttft_ms"] < m["median_e2e_latency_ms"]
    assert r["server_peak_rss_mb"] > 100
    assert "smollm2-135m" in r["server"]["served_models"]
    assert len(r["requests"]) == 4 and all(len(q["itl"]) >= 1 for q in r["requests"])
