"""Seed 000's tool request, as the seed writes it (no temperature, no max_tokens), sent N times to the bundled
Qwen2.5-Coder-0.5B: how many come back as the right call, with the model's sampling defaults
(`--sampling-defaults model`, ember's default) and with OpenAI's (`--sampling-defaults openai`).
Backs the numbers in docs/architecture.md ("Tool calls on Qwen2.5-Coder"); run by hand:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/seed000_tool_calls.py [--n 48] [--out benchmarks/results/...json]

A call is right when finish_reason is tool_calls, the first call is get_weather and its arguments are exactly
{location, unit} with a celsius unit and San Francisco in the location.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "City and state, e.g., 'San Francisco, CA'"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location", "unit"]}}}]
MESSAGES = [{"role": "user", "content": "What's the weather like in San Francisco? use celsius."}]


def verdict(choice) -> str:
    calls = choice.message.tool_calls or []
    if choice.finish_reason != "tool_calls" or not calls:
        return "no call: " + (choice.message.content or "")[:80].replace("\n", " ")
    fn = calls[0].function
    try:
        args = json.loads(fn.arguments)
    except ValueError:
        return f"bad arguments: {fn.arguments[:80]}"
    if fn.name != "get_weather" or set(args) != {"location", "unit"}:
        return f"wrong call: {fn.name}({fn.arguments[:80]})"
    if args["unit"] != "celsius" or "san francisco" not in str(args["location"]).lower():
        return f"wrong values: {fn.arguments[:80]}"
    return "right"


async def run(base_url: str, n: int, concurrency: int) -> list[str]:
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="EMPTY", timeout=600)
    model = (await client.models.list()).data[0].id
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> str:
        async with gate:
            r = await client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="auto")
            return verdict(r.choices[0])
    return await asyncio.gather(*(one(i) for i in range(n)))


def main() -> None:
    from ember.utils import get_free_port, launch_server_cmd, terminate_process, wait_for_server
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = {"n": args.n, "when": time.strftime("%Y-%m-%d %H:%M"), "model": "qwen2.5-coder-0.5b (bundled)"}
    for defaults in ("model", "openai"):
        port = get_free_port()
        log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
        proc, port = launch_server_cmd(f"{sys.executable} -m ember.launch_server --tool-call-parser qwen25 "
                                       f"--sampling-defaults {defaults} --port {port}", port=port)
        try:
            wait_for_server(f"http://127.0.0.1:{port}", timeout=900)
            verdicts = asyncio.run(run(f"http://127.0.0.1:{port}", args.n, args.concurrency))
        finally:
            terminate_process(proc)
        results[defaults] = {"right": verdicts.count("right"), "verdicts": verdicts}
        print(defaults, verdicts.count("right"), "of", args.n, flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
