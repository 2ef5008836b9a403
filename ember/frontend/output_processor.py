"""Per-choice output parsing for chat: reasoning (`reasoning_content`) and tool calls, stream-safe.

Wraps `ember.parsers.OutputParser`; without parsers the text is all content.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Default tool-call parser per model_type when a request has tools and --tool-call-parser is not set.
DEFAULT_TOOL_PARSERS = {"qwen2": "qwen25"}


@dataclass
class ToolCallOut:
    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallOut] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


def make_output_parser(reasoning_parser: str | None, tool_parser: str | None, tools: list[dict] | None,
                       force_reasoning: bool | None = None):
    """An ember.parsers.OutputParser, or None when neither parser applies."""
    if not reasoning_parser and not (tool_parser and tools):
        return None
    from ember.parsers import OutputParser, get_reasoning_parser, get_tool_call_parser
    rp = get_reasoning_parser(reasoning_parser, force_reasoning=force_reasoning) if reasoning_parser else None
    tp = get_tool_call_parser(tool_parser, tools) if (tool_parser and tools) else None
    return OutputParser(rp, tp)


class ChoiceOutput:
    """Feeds one choice's text deltas through the parser; keeps the full content/reasoning/tool calls."""

    def __init__(self, parser=None):
        self.parser = parser
        self.content = ""
        self.reasoning = ""
        self.tool_calls: list[dict] = []  # {"id", "name", "arguments"}
        self._finished = False

    def _convert(self, pd) -> Delta:
        if pd is None:
            return Delta()
        calls = [ToolCallOut(index=getattr(c, "index", 0), id=getattr(c, "id", None),
                             name=getattr(c, "name", None), arguments=getattr(c, "arguments", None) or "")
                 for c in (getattr(pd, "tool_calls", None) or [])]
        return Delta(content=getattr(pd, "content", None) or "", reasoning=getattr(pd, "reasoning", None) or "",
                     tool_calls=calls)

    def feed(self, text: str) -> Delta:
        if self.parser is None:
            self.content += text
            return Delta(content=text)
        if not text:
            return Delta()
        d = self._convert(self.parser.feed(text))
        return d

    def finish(self) -> Delta:
        if self._finished:
            return Delta()
        self._finished = True
        if self.parser is None:
            return Delta()
        d = self._convert(self.parser.finish())
        self.content = getattr(self.parser, "content", "") or ""
        self.reasoning = getattr(self.parser, "reasoning", "") or ""
        self.tool_calls = [{"id": getattr(c, "id", None), "name": getattr(c, "name", ""),
                            "arguments": getattr(c, "arguments", "") or ""}
                           for c in (getattr(self.parser, "tool_calls", None) or [])]
        return d


def forced_tool_schema(tools: list[dict], named: str | None, parallel: bool = True) -> dict:
    """JSON schema that constrains the output when tool_choice is "required" (a JSON array of
    {"name", "parameters"} objects, one at most without parallel tool calls) or names one function
    (that function's arguments object)."""
    def params(t):
        p = (t.get("function") or {}).get("parameters")
        return p if isinstance(p, dict) and p else {"type": "object"}

    if named is not None:
        for t in tools:
            if (t.get("function") or {}).get("name") == named:
                return params(t)
        raise ValueError(f"tool_choice names {named!r}, which is not in tools")
    schema = {
        "type": "array",
        "minItems": 1,
        "items": {"anyOf": [{
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]}, "parameters": params(t)},
            "required": ["name", "parameters"],
        } for t in tools if t.get("function", {}).get("name")]},
    }
    if not parallel:
        schema["maxItems"] = 1
    return schema


class ForcedToolOutput:
    """Output of a request whose tool_choice forced tool calls (the engine constrained it to JSON).

    named: the whole output is the arguments of that function (streamed as argument deltas).
    required: the output is a JSON array of {"name", "parameters"}; the calls come at the end."""

    def __init__(self, named: str | None):
        self.named = named
        self.text = ""
        self.content = ""
        self.reasoning = ""
        self.tool_calls: list[dict] = []
        self._started = False
        self._id = _call_id()

    def feed(self, text: str) -> Delta:
        self.text += text
        if self.named is None or not text:
            return Delta()
        calls = [ToolCallOut(0, None if self._started else self._id, None if self._started else self.named, text)]
        self._started = True
        return Delta(tool_calls=calls)

    def finish(self) -> Delta:
        import json
        if self.named is not None:
            self.tool_calls = [{"id": self._id, "name": self.named, "arguments": self.text}]
            if not self._started:
                self._started = True
                return Delta(tool_calls=[ToolCallOut(0, self._id, self.named, self.text)])
            return Delta()
        try:
            items = json.loads(self.text)
        except json.JSONDecodeError:
            self.content = self.text  # cut short (max_tokens): give the text back as content
            return Delta(content=self.text)
        out = []
        for i, item in enumerate(items if isinstance(items, list) else []):
            if isinstance(item, dict) and "name" in item:
                args = json.dumps(item.get("parameters", {}), ensure_ascii=False)
                call = {"id": _call_id(), "name": item["name"], "arguments": args}
                self.tool_calls.append(call)
                out.append(ToolCallOut(i, call["id"], call["name"], args))
        return Delta(tool_calls=out)


def _call_id() -> str:
    import uuid
    return f"call_{uuid.uuid4().hex[:24]}"
