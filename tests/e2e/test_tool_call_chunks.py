"""Streamed tool calls: one entry per call index in each chunk (as OpenAI streams them), also when a whole
<tool_call> block arrives in one piece. Seen with benchmarks/third_party_clients.py: chunks carried
{index 0, id, name, arguments ""} and {index 0, arguments} side by side. OpenCode's AI SDK, LangChain and
LiteLLM merge by index and coped; a client reading one entry per index per chunk loses the arguments."""
from __future__ import annotations

import json

import pytest

from tests.e2e.scripted_engine import ScriptedServer

ASK = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TWO = CALL + "\n" + CALL.replace("Paris", "Lyon")


@pytest.mark.parametrize("pieces", [[CALL], [CALL[:20], CALL[20:]], [TWO], ["Sure.\n", TWO]],
                         ids=["one-piece", "two-pieces", "two-calls-one-piece", "text-then-two-calls"])
def test_one_entry_per_index_per_chunk(pieces):
    with ScriptedServer(pieces, chat_template=None, tool_call_parser="qwen25") as s:
        with s.client.stream("POST", "/v1/chat/completions",
                             json={"model": "m", "messages": ASK, "tools": TOOLS, "stream": True}) as r:
            assert r.status_code == 200
            data = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in map(json.loads, data):
        for ch in chunk["choices"]:
            finish = ch["finish_reason"] or finish
            entries = ch["delta"].get("tool_calls") or []
            indices = [e["index"] for e in entries]
            assert len(indices) == len(set(indices)), f"two entries for one index in a chunk: {entries}"
            for e in entries:
                c = calls.setdefault(e["index"], {"id": None, "name": "", "arguments": ""})
                if "id" in e:
                    assert c["id"] is None, "the id comes once"
                    c["id"] = e["id"]
                c["name"] += e["function"].get("name") or ""
                c["arguments"] += e["function"].get("arguments") or ""
    want = [("get_weather", {"city": "Paris"})] + ([("get_weather", {"city": "Lyon"})] if TWO in "".join(pieces)
                                                  else [])
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == want
    assert all(c["id"] for c in calls.values())
    assert finish == "tool_calls"
