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
