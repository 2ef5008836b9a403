"""Streaming parsers for model output: reasoning blocks and tool calls.

Typical use in a server::

    parser = make_output_parser(reasoning="qwen3", tool="qwen25", tools=request_tools)
    for delta_text in generation:
        d = parser.feed(delta_text)      # ParsedDelta(content, reasoning, tool_calls)
        ...send d...
    d = parser.finish()                  # what was held back
    parser.content, parser.reasoning, parser.tool_calls   # the full result

The result does not depend on how the text was split into deltas; ``parse_full`` gives
the same result in one call. Parser names are SGLang's (``--tool-call-parser`` /
``--reasoning-parser``). Wire formats: /work/shared/FORMATS.md.

Behaviour (where SGLang's streaming and one-shot paths differ, one rule serves both):

* Only calls naming a tool of the request become tool calls. Invalid calls inside a
  block (unknown name, malformed header) are dropped; a block with no valid call at all
  stays content, verbatim -- so with no tools, nothing is ever a tool call.
* Output cut off inside a call (max_tokens): once the name is complete the call exists
  (its name has been streamed), and its arguments are closed into valid JSON with what
  arrived -- complete parameters, a cut-off string as far as it got, a pending number; a
  half-written key or literal is dropped. Cut off before the name is complete: content.
* Arguments are always ``json.dumps(args, ensure_ascii=False)`` (SGLang's form), also for
  the JSON formats. JSON arguments and string-typed XML parameters stream as they arrive;
  other XML values are typed from the tool schema and sent when complete.
* Content: whitespace around tool calls is dropped; text after the calls is kept (joined
  with the whitespace that preceded the calls).
* qwen25 / qwen (tolerant, for small Qwen2.5 models): when the WHOLE output is nothing but
  tool-call JSON (``{"name", "arguments"|"parameters"}`` objects, one or several, a list
  of them, optionally in a ``` fence) naming provided tools, those are the calls. Output
  starting with ``{``, ``[`` or a backtick is held back until that is decided (at
  ``finish`` at the latest, earlier when it cannot be); JSON mixed with prose stays text.
  llama3 does the same for a bare JSON output (``;`` separators allowed).
* Reasoning: a start token is recognised only at the very beginning (after whitespace).
  Combined with a tool parser, every reasoning parser also ends the reasoning at that
  parser's tool-call start token (SGLang does it for qwen3 / glm45 / kimi_k2 only), so a
  call inside an unclosed thinking block is still a call. ``force_reasoning=None`` takes
  SGLang's server default for a request without chat_template_kwargs (see reasoning.py);
  pass False when the request disabled thinking.
* kimi_k2 call ids are the model's own ``functions.NAME:IDX``; others ``call_<24 alnum>``.
"""

from __future__ import annotations

from typing import Any, Iterable

from ember.parsers.base import (
    OutputParser, ParsedDelta, ReasoningParser, ToolCall, ToolCallDelta, ToolCallParser,
    make_tool_call_id, tool_schemas,
)
from ember.parsers.json_formats import (
    DeepSeekV3Parser, HermesParser, KimiK2Parser, Llama3Parser, Qwen25Parser,
)
from ember.parsers.harmony import GptOssParser, GptOssReasoningParser
from ember.parsers.pythonic import PythonicParser
from ember.parsers.reasoning import (
    DeepSeekR1ReasoningParser, DeepSeekV3ReasoningParser, Glm45ReasoningParser,
    KimiK2ReasoningParser, KimiReasoningParser, MinimaxAppendThinkReasoningParser,
    MinimaxReasoningParser, Qwen3ReasoningParser, Qwen3ThinkingReasoningParser,
)
from ember.parsers.xml_formats import (
    Glm45Parser, Glm47Parser, MinimaxM2Parser, Qwen3CoderParser, Step3Parser,
)

TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    "qwen25": Qwen25Parser,
    "qwen": Qwen25Parser,
    "hermes": HermesParser,
    "qwen3_coder": Qwen3CoderParser,
    "step3p5": Qwen3CoderParser,
    "step3": Step3Parser,
    "glm45": Glm45Parser,
    "glm": Glm45Parser,
    "glm47": Glm47Parser,
    "minimax-m2": MinimaxM2Parser,
    "llama3": Llama3Parser,
    "deepseekv3": DeepSeekV3Parser,
    "kimi_k2": KimiK2Parser,
    "pythonic": PythonicParser,
    "gpt-oss": GptOssParser,
}

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek-r1": DeepSeekR1ReasoningParser,
    "step3p5": DeepSeekR1ReasoningParser,
    "step3": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
    "qwen3-thinking": Qwen3ThinkingReasoningParser,
    "glm45": Glm45ReasoningParser,
    "minimax": MinimaxReasoningParser,
    "minimax-append-think": MinimaxAppendThinkReasoningParser,
    "kimi": KimiReasoningParser,
    "kimi_k2": KimiK2ReasoningParser,
    "deepseek-v3": DeepSeekV3ReasoningParser,
    "gpt-oss": GptOssReasoningParser,
}


def get_tool_call_parser(name: str, tools: Iterable[Any] | None) -> ToolCallParser:
    """A fresh tool-call parser for one request. ``tools``: the request's OpenAI-style tool
    list; only calls naming one of these tools become tool calls."""
    try:
        cls = TOOL_CALL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; valid: {', '.join(sorted(TOOL_CALL_PARSERS))}") from None
    return cls(tools)


def get_reasoning_parser(name: str, *, force_reasoning: bool | None = None) -> ReasoningParser:
    """A fresh reasoning parser for one request. ``force_reasoning``: the output starts
    inside the thinking block (the prompt opened it); None: the parser's default."""
    try:
        cls = REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; valid: {', '.join(sorted(REASONING_PARSERS))}") from None
    return cls(force_reasoning=force_reasoning)


def make_output_parser(reasoning: str | None = None, tool: str | None = None,
                       tools: Iterable[Any] | None = None, *,
                       force_reasoning: bool | None = None) -> OutputParser:
    """OutputParser from parser names (either may be None)."""
    rp = get_reasoning_parser(reasoning, force_reasoning=force_reasoning) if reasoning else None
    tp = get_tool_call_parser(tool, tools) if tool else None
    return OutputParser(rp, tp)


def parse_full(text: str, reasoning: str | None = None, tool: str | None = None,
               tools: Iterable[Any] | None = None, *,
               force_reasoning: bool | None = None) -> tuple[str, str, list[ToolCall]]:
    """One-shot parse -> (content, reasoning, tool_calls)."""
    return make_output_parser(reasoning, tool, tools, force_reasoning=force_reasoning).parse_full(text)


__all__ = [
    "OutputParser", "ParsedDelta", "ReasoningParser", "ToolCall", "ToolCallDelta",
    "ToolCallParser", "TOOL_CALL_PARSERS", "REASONING_PARSERS", "get_tool_call_parser",
    "get_reasoning_parser", "make_output_parser", "parse_full", "make_tool_call_id",
    "tool_schemas",
]
