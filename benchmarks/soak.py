"""Soak test: many mixed requests against a running ember server, then checks that it held up.

    python -m benchmarks.soak --base-url http://127.0.0.1:30000 --requests 2000 --concurrency 32
    python -m benchmarks.soak --launch smollm2-135m --requests 2000 --concurrency 32   # starts its own server

The mix covers every generation route (OpenAI completions and chat, native /generate, Anthropic-style
/v1/messages), streamed and not, n > 1, tools, json_schema; and, by share of requests: 20 % clients that
go away mid-request, 5 % malformed bodies, 5 % prompts over the context length, 5 % huge max_tokens.
It checks that every request got a well-formed answer or the right 4xx (a client that went away gets
nothing to check), no 5xx and no exception, the server still answers /health, and that afterwards every
KV page is free again (free + cached by the prefix cache = total, from /get_server_info). Prints a JSON
report; exit code 1 when a check failed. tests/e2e/test_soak.py runs a short version in CI.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
COLOR_SCHEMA = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
                "required": ["color"], "additionalProperties": False}
TOPICS = ["France", "the sea", "a cat", "winter", "numbers", "Python", "the moon", "bread"]


@dataclass
class Case:
    kind: str  # "ok", "abort", "malformed", "overlong", "huge"
    method: str
    path: str
    body: bytes
    stream: bool
    expect: tuple[int, ...]  # accepted statuses
    label: str


@dataclass
class Report:
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    by_label: Counter = field(default_factory=Counter)
    aborted: int = 0
    failures: list[str] = field(default_factory=list)

    def fail(self, case: Case, why: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(f"{case.label} ({case.kind}): {why}")
        else:
            self.failures.append("...")


def _ok_case(rng: random.Random, label: str | None = None) -> tuple[str, dict, bool, str]:
    """(path, body, stream, label) of a well-formed generation request."""
    topic = rng.choice(TOPICS)
    stream = rng.random() < 0.5
    max_tokens = rng.randint(4, 24)
    user = [{"role": "user", "content": f"Write one sentence about {topic}."}]
    kinds = ["completions", "chat", "chat_n2", "chat_tools", "chat_json", "generate", "messages"]
    label = label or rng.choice(kinds)
    if label == "completions":
        return "/v1/completions", {"model": "m", "prompt": f"A short note on {topic}:", "max_tokens": max_tokens,
                                   "stream": stream, "temperature": 0.8}, stream, label
    if label == "chat":
        return "/v1/chat/completions", {"model": "m", "messages": user, "max_tokens": max_tokens,
                                        "stream": stream}, stream, label
    if label == "chat_n2":
        return "/v1/chat/completions", {"model": "m", "messages": user, "max_tokens": max_tokens, "n": 2,
                                        "temperature": 0.9, "stream": stream}, stream, label
    if label == "chat_tools":
        return "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": f"Weather in {topic}?"}],
                                        "tools": [WEATHER_TOOL], "tool_choice": rng.choice(["auto", "required"]),
                                        "max_tokens": 32, "stream": stream}, stream, label
    if label == "chat_json":
        return "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "Name a color."}],
                                        "response_format": {"type": "json_schema",
                                                            "json_schema": {"name": "c", "schema": COLOR_SCHEMA}},
                                        "max_tokens": 24, "stream": stream}, stream, label
    if label == "generate":
        return "/generate", {"text": f"Facts about {topic}:", "stream": stream,
                             "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0.7}}, stream, label
    return "/v1/messages", {"model": "m", "max_tokens": max_tokens, "messages": user, "stream": stream}, stream, label


def make_case(rng: random.Random, context_length: int) -> Case:
    r = rng.random()
    if r < 0.05:  # malformed: bad JSON, wrong types, missing fields
        path = rng.choice(["/v1/completions", "/v1/chat/completions", "/generate", "/v1/messages"])
        body = rng.choice([b"{not json", b"[1, 2, 3]", b'{"messages": "hello", "max_tokens": "many"}',
                           b'{"prompt": {"a": 1}}', b'{"text": 5, "sampling_params": {"temperature": "hot"}}',
                           b'{"model": "m", "messages": [], "max_tokens": -1}', b"", b'{"temperature": 9}'])
        return Case("malformed", "POST", path, body, False, (400, 422), f"malformed {path}")
    if r < 0.10:  # a prompt longer than the context
        words = " ".join(["token"] * (context_length + 64))
        path, body, _, label = _ok_case(rng, rng.choice(["completions", "chat", "generate", "messages"]))
        body["stream"] = False
        if "prompt" in body:
            body["prompt"] = words
        elif "text" in body:
            body["text"] = words
        else:
            body["messages"] = [{"role": "user", "content": words}]
        return Case("overlong", "POST", path, json.dumps(body).encode(), False, (400,), f"overlong {label}")
    if r < 0.15:  # max_tokens far past the context
        path, body, _, label = _ok_case(rng, rng.choice(["completions", "chat", "generate", "messages"]))
        body["stream"] = False
        if path == "/generate":
            body["sampling_params"]["max_new_tokens"] = 10 ** 9
        else:
            body["max_tokens"] = 10 ** 9
        return Case("huge", "POST", path, json.dumps(body).encode(), False, (400,), f"huge {label}")
    path, body, stream, label = _ok_case(rng)
    kind = "abort" if r < 0.35 else "ok"
    if kind == "abort":
        if path == "/generate":
            body["sampling_params"]["max_new_tokens"] = 256
        else:
            body["max_tokens"] = 256
    return Case(kind, "POST", path, json.dumps(body).encode(), stream, (200,), label)


def check_body(case: Case, status: int, data: bytes) -> str | None:
    """Why an answer is not well-formed (None when it is)."""
    if status != 200:
        try:
            err = json.loads(data)
        except ValueError:
            return f"status {status} without a JSON error body: {data[:200]!r}"
        if case.path == "/v1/messages":
            return None if err.get("type") == "error" and err.get("error", {}).get("message") else f"bad error {err}"
        return None if isinstance(err.get("error"), dict) and err["error"].get("message") else f"bad error {err}"
    if not case.stream:
        try:
            obj = json.loads(data)
        except ValueError:
            return f"non-JSON 200 body: {data[:200]!r}"
        if case.path == "/generate":
            return None if "text" in obj and "meta_info" in obj else f"bad /generate answer {str(obj)[:200]}"
        if case.path == "/v1/messages":
            return None if obj.get("type") == "message" and obj.get("stop_reason") else f"bad message {str(obj)[:200]}"
        choices = obj.get("choices") or []
        if not choices or any(c.get("finish_reason") is None for c in choices) or "usage" not in obj:
            return f"bad OpenAI answer {str(obj)[:200]}"
        if case.label == "chat_json" and choices[0]["finish_reason"] == "stop":
            content = (choices[0].get("message") or {}).get("content")
            try:
                json.loads(content)
            except (TypeError, ValueError):
                return f"json_schema output that does not parse: {content!r}"
        return None
    text = data.decode("utf-8", "replace")
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    if case.path == "/v1/messages":
        return None if "event: message_stop" in text else f"stream without message_stop: {text[-300:]!r}"
    if not events or events[-1] != "[DONE]":
        return f"stream without [DONE]: {text[-300:]!r}"
    for e in events[:-1]:
        obj = json.loads(e)
        if "error" in obj:
            return f"error event in a stream: {obj}"
    return None


async def run_case(client: httpx.AsyncClient, case: Case, rng: random.Random, report: Report) -> None:
    report.sent += 1
    report.by_label[case.label] += 1
    headers = {"content-type": "application/json"}
    try:
        if case.kind == "abort":  # go away after a few chunks, or after a moment without streaming
            if case.stream:
                async with client.stream(case.method, case.path, content=case.body, headers=headers) as r:
                    report.statuses[r.status_code] += 1
                    if r.status_code != 200:
                        report.fail(case, f"status {r.status_code}")
                        return
                    n = rng.randint(1, 4)
                    async for _ in r.aiter_lines():
                        n -= 1
                        if n <= 0:
                            break
            else:
                try:
                    await asyncio.wait_for(client.request(case.method, case.path, content=case.body,
                                                          headers=headers), rng.uniform(0.05, 1.0))
                except asyncio.TimeoutError:
                    pass
            report.aborted += 1
            return
        if case.stream:
            async with client.stream(case.method, case.path, content=case.body, headers=headers) as r:
                data = await r.aread()
                status = r.status_code
        else:
            r = await client.request(case.method, case.path, content=case.body, headers=headers)
            data, status = r.content, r.status_code
        report.statuses[status] += 1
        if status not in case.expect:
            report.fail(case, f"status {status} (expected {case.expect}): {data[:300]!r}")
            return
        why = check_body(case, status, data)
        if why:
            report.fail(case, why)
    except (httpx.HTTPError, ValueError, KeyError) as e:
        report.statuses["exception"] += 1
        report.fail(case, f"{type(e).__name__}: {e}")


async def wait_idle(client: httpx.AsyncClient, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    stats: dict = {}
    while time.monotonic() < deadline:
        stats = (await client.get("/get_server_info")).json()["engine_stats"]
        if stats.get("running") == 0 and stats.get("waiting") == 0:
            return stats
        await asyncio.sleep(0.2)
    return stats


async def soak(base_url: str, n_requests: int, concurrency: int, seed: int = 0, api_key: str | None = None) -> dict:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    report = Report()
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, timeout=600, headers=headers,
                                 limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        context_length = (await client.get("/get_model_info")).json()["context_length"]
        cases = [make_case(rng, context_length) for _ in range(n_requests)]
        queue: asyncio.Queue = asyncio.Queue()
        for i, c in enumerate(cases):
            queue.put_nowait((c, random.Random(seed * 1_000_003 + i)))

        async def worker():
            while not queue.empty():
                case, r = queue.get_nowait()
                await run_case(client, case, r, report)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - t0
        stats = await wait_idle(client)
        health = (await client.get("/health")).status_code
    pool_whole = stats.get("free_pages", -1) + stats.get("cached_pages", 0) == stats.get("total_pages")
    n5xx = sum(v for k, v in report.statuses.items() if isinstance(k, int) and k >= 500)
    result = {
        "requests": n_requests, "concurrency": concurrency, "seed": seed, "elapsed_s": round(elapsed, 1),
        "answered": report.sent, "client_aborts": report.aborted,
        "statuses": {str(k): v for k, v in sorted(report.statuses.items(), key=str)},
        "by_kind": dict(Counter(c.kind for c in cases)), "by_route": dict(report.by_label),
        "5xx": n5xx, "failures": report.failures, "health_after": health, "engine_stats_after": stats,
        "kv_pool_whole": pool_whole,
    }
    result["ok"] = (not report.failures and n5xx == 0 and report.sent == n_requests and health == 200
                    and pool_whole)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default=None, help="a running server (else --launch)")
    ap.add_argument("--launch", default=None, metavar="MODEL", help="start `ember` on this model for the run")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--output", default=None, help="write the JSON report here too")
    args = ap.parse_args(argv)
    proc = None
    base_url = args.base_url
    if base_url is None:
        if not args.launch:
            ap.error("give --base-url or --launch")
        from ember.utils import launch_server_cmd, wait_for_server
        proc, port = launch_server_cmd(f"python -m ember.launch_server --model-path {args.launch} --log-level warning")
        base_url = f"http://127.0.0.1:{port}"
        wait_for_server(base_url, timeout=900, process=proc)
    try:
        result = asyncio.run(soak(base_url, args.requests, args.concurrency, args.seed, args.api_key))
    finally:
        if proc is not None:
            from ember.utils import terminate_process
            terminate_process(proc)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
