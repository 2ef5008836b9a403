"""How often does the bundled Qwen2.5-Coder-0.5B make the right tool call with tool_choice="auto"?
(Not a test: a measurement, too slow for CI. Numbers and the decision: docs/architecture.md, "Tool calls
on Qwen2.5-Coder".)

Variants, all through ember's chat route with --tool-call-parser qwen25:
  tolerant  the model is free; the qwen25 parser also accepts an output that is nothing but a bare or
            fenced JSON call naming a provided tool (what ember does)
  tagged    an EBNF grammar (the request's `ebnf`) lets the model choose between text (not starting with
            `{`, `<` or a backtick) and ONE schema-valid call in `<tool_call>` tags (the format the chat
            template asks for)
  any-form  the grammar allows text or one schema-valid call, bare, fenced or tagged (the tolerant parser
            reads all three)

A call prompt counts as right when the first call names the intended tool, its arguments validate
against the tool's schema and contain the expected value; a no-call prompt when there is no call.

    python tests/e2e/qwen_tool_accuracy.py                 # starts a server (bundled model)
    python tests/e2e/qwen_tool_accuracy.py --base-url http://127.0.0.1:30000
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.e2e.test_qwen_tools import TOOLS4  # noqa: E402

# (prompt, intended tool or None, a value the arguments must contain)
CALL_PROMPTS = [
    ("What's the weather like in San Francisco? use celsius.", "get_weather", "San Francisco"),
    ("What's the weather in Paris in celsius?", "get_weather", "Paris"),
    ("Is it raining in Tokyo right now?", "get_weather", "Tokyo"),
    ("How hot is it in Phoenix, AZ? Fahrenheit please.", "get_weather", "Phoenix"),
    ("Tell me the temperature in Berlin.", "get_weather", "Berlin"),
    ("Do I need an umbrella in London today?", "get_weather", "London"),
    ("Search the web for the latest Python release.", "search_web", "Python"),
    ("Find news about the Mars rover, 3 results.", "search_web", "Mars"),
    ("Look up who won the 2018 World Cup.", "search_web", "World Cup"),
    ("Search for vegan lasagna recipes.", "search_web", "lasagna"),
    ("What are the best hiking trails near Denver? Search online.", "search_web", "Denver"),
    ("Open config.yaml and show me its contents.", "read_file", "config.yaml"),
    ("Read the first 20 lines of /var/log/syslog.", "read_file", "syslog"),
    ("What does README.md say?", "read_file", "README.md"),
    ("Show me src/main.py.", "read_file", "main.py"),
    ("Print the file notes.txt.", "read_file", "notes.txt"),
    ("Email alice@example.com that the meeting moved to 3pm.", "send_email", "alice@example.com"),
    ("Send an urgent email to bob@example.com about the outage.", "send_email", "bob@example.com"),
    ("Tell dave@example.com by email: project approved.", "send_email", "dave@example.com"),
    ("Notify ops@example.com by email that the backup finished.", "send_email", "ops@example.com"),
]
NO_CALL_PROMPTS = [
    ("Write a haiku about autumn leaves.", None, None),
    ("What is 12 times 7?", None, None),
    ("Explain in one sentence what a Python decorator is.", None, None),
    ("Translate 'good morning' into French.", None, None),
    ("Write a Python function that reverses a string.", None, None),
    ("Say hello.", None, None),
]
PROMPTS = CALL_PROMPTS + NO_CALL_PROMPTS
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS4}


def call_grammar(forms: tuple[str, ...]) -> str:
    """EBNF: text that does not start like a call, or one call (schema-valid, of a provided tool) in the
    given forms: bare, fenced, tagged."""
    import xgrammar as xg
    schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                         "required": ["name", "arguments"]} for name, params in SCHEMAS.items()]}
    rules = str(xg.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False))
    rules = re.sub(r"^root ::=", "call_json ::=", rules, flags=re.M)
    alts = {"bare": "call_json", "fenced": '"```json\\n" call_json "\\n```"',
            "tagged": '"<tool_call>\\n" call_json "\\n</tool_call>"'}
    return "root ::= (" + " | ".join(alts[f] for f in forms) + ") | text\ntext ::= [^<{`] [^]*\n" + rules


VARIANTS = {
    "tolerant": None,
    "tagged": ("tagged",),
    "any-form": ("bare", "fenced", "tagged"),
}


def right(r, tool: str | None, value: str | None) -> bool:
    import jsonschema
    calls = r.choices[0].message.tool_calls or []
    if tool is None:
        return not calls
    if not calls or calls[0].function.name != tool:
        return False
    try:
        args = json.loads(calls[0].function.arguments)
        jsonschema.validate(args, SCHEMAS[tool])
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return value.lower() in json.dumps(args, ensure_ascii=False).lower()


async def measure(base_url: str, max_tokens: int) -> dict:
    import openai
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="EMPTY", max_retries=0, timeout=1800)
    results = {}
    for name, forms in VARIANTS.items():
        extra = {"ebnf": call_grammar(forms)} if forms else {}
        t0 = time.time()

        async def one(prompt):
            return await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": prompt}], tools=TOOLS4, tool_choice="auto",
                temperature=0, max_tokens=max_tokens, extra_body=extra)
        await one(PROMPTS[0][0])  # warm the prefix cache (the tools prompt) and the grammar
        rs = await asyncio.gather(*[one(p) for p, _, _ in PROMPTS])
        ok = [right(r, t, v) for r, (_, t, v) in zip(rs, PROMPTS)]
        n_call = len(CALL_PROMPTS)
        results[name] = {"calls_right": sum(ok[:n_call]), "calls": n_call,
                         "no_call_right": sum(ok[n_call:]), "no_calls": len(NO_CALL_PROMPTS),
                         "seconds": round(time.time() - t0, 1)}
        print(name, results[name], flush=True)
        for r, (p, t, _), good in zip(rs, PROMPTS, ok):
            if not good:
                m = r.choices[0].message
                got = [(c.function.name, c.function.arguments) for c in m.tool_calls or []] or repr(m.content)[:100]
                print(f"   wrong: {p!r} (want {t}) -> {got}", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", help="a running ember server (with --tool-call-parser qwen25)")
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()
    server = None
    base_url = args.base_url
    if base_url is None:
        from ember.utils import terminate_process
        from tests.e2e.conftest import start_server
        server = start_server(["--tool-call-parser", "qwen25"], Path(tempfile.mkdtemp()), "qwen-accuracy")
        base_url = server.base_url
    try:
        results = asyncio.run(measure(base_url, args.max_tokens))
    finally:
        if server is not None:
            terminate_process(server.proc)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
