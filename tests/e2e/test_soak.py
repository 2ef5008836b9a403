"""The soak of benchmarks/soak.py, short: 200 mixed requests at concurrency 32 on SmolLM2 (every route,
streamed and not, n=2, tools, json_schema, 20 % client aborts, 5 % malformed, 5 % over-long prompts,
5 % huge max_tokens): no 5xx, every request answered as expected, the KV pool whole afterwards."""
from __future__ import annotations

import asyncio
import json
import random

from benchmarks.soak import Case, check_body, make_case, soak


def test_soak_200_mixed_requests(smollm2_server):
    result = asyncio.run(soak(smollm2_server.base_url, 200, 32, seed=1))
    assert result["failures"] == [], json.dumps(result, indent=1)[:6000]
    assert result["5xx"] == 0 and result["answered"] == 200
    assert result["kv_pool_whole"], result["engine_stats_after"]
    assert result["health_after"] == 200
    kinds = result["by_kind"]
    assert kinds.get("abort", 0) >= 20 and kinds.get("malformed", 0) >= 3 and kinds.get("overlong", 0) >= 3
    assert kinds.get("huge", 0) >= 3
    assert result["statuses"].get("400", 0) >= kinds["malformed"] + kinds["overlong"] + kinds["huge"]
    smollm2_server.assert_alive()


def test_soak_checks_catch_bad_answers():
    """The soak's own checks: a 5xx, an error event mid-stream, a stream cut short and a 200 without
    choices are each reported (so a clean soak means something)."""
    rng = random.Random(0)
    ok = next(c for c in (make_case(rng, 100) for _ in range(200)) if c.kind == "ok" and c.label == "chat"
              and not c.stream)
    as_json = Case("ok", "POST", "/v1/chat/completions", b"{}", False, (200,), "chat_json")
    assert check_body(as_json, 200, b'{"choices": [{"finish_reason": "stop", "message": {"content": "{\\"a\\": 1}"}}], '
                                    b'"usage": {}}') is None
    assert check_body(as_json, 200, b'{"choices": [{"finish_reason": "stop", "message": {"content": "{oops"}}], '
                                    b'"usage": {}}')
    stream = Case("ok", "POST", "/v1/completions", b"{}", True, (200,), "completions")
    assert check_body(ok, 200, b'{"choices": [{"finish_reason": "stop"}], "usage": {}}') is None
    assert check_body(ok, 200, b'{"choices": [], "usage": {}}')
    assert check_body(ok, 500, b"Internal Server Error")
    assert check_body(stream, 200, b'data: {"choices": []}\n\ndata: [DONE]\n\n') is None
    assert check_body(stream, 200, b'data: {"choices": []}\n\n')  # no [DONE]
    assert check_body(stream, 200, b'data: {"error": {"message": "boom", "code": 500}}\n\ndata: [DONE]\n\n')
