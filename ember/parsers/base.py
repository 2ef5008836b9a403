"""Streaming output parsers: the shared machinery.

How every parser works
----------------------
Model output arrives as text deltas (``feed``) and ends with ``finish``. Each parser is
written as ONE generator method, ``_run``, that reads a buffer through a few helpers
(``_until``, ``_match``, ``_skip_ws``, ``_char``, ``_json`` ...). When a helper cannot
decide yet -- say the buffer ends in ``<tool_ca`` -- it suspends the generator with a bare
``yield`` until more text arrives. After ``finish`` the helpers decide with what they have.

Every decision depends only on the text, never on where the chunks were cut, so the
concatenated output of a stream equals the one-shot parse (which is just ``feed(text)``
followed by ``finish()``), whatever the chunking.

A parser may *mark* a position and later *rewind* to it. Tool-call parsers use that to
give text back: a block whose first call turns out to be invalid (unknown tool name,
malformed, cut off before the name is complete) is re-read as ordinary content.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

from ember.parsers.jsonstream import JsonArgsWriter, JsonScanner

__all__ = [
    "ToolCallDelta", "ToolCall", "ParsedDelta", "ToolCallParser", "ReasoningParser",
    "OutputParser", "make_tool_call_id", "tool_schemas",
]


# ----------------------------------------------------------------------------------------
# Public data types


@dataclass
class ToolCallDelta:
    """One streamed piece of a tool call.

    The first delta of a call carries ``id`` and ``name`` (and ``arguments == ""``); the
    following ones carry argument fragments only. Concatenating all fragments of an index
    gives the final arguments JSON.
    """

    index: int
    id: str | None
    name: str | None
    arguments: str

    def to_openai(self) -> dict:
        fn: dict[str, Any] = {"arguments": self.arguments}
        out: dict[str, Any] = {"index": self.index, "function": fn}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            fn["name"] = self.name
        return out


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


_ALNUM = string.ascii_letters + string.digits
_rng = random.SystemRandom()


def make_tool_call_id() -> str:
    return "call_" + "".join(_rng.choices(_ALNUM, k=24))


def tool_schemas(tools: Iterable[Any] | None) -> dict[str, dict]:
    """OpenAI-style tool list -> {name: parameters JSON schema}.

    Accepts ``{"type": "function", "function": {...}}`` dicts, bare ``{"name", "parameters"}``
    dicts, and pydantic models of either shape.
    """
    out: dict[str, dict] = {}
    for tool in tools or ():
        if hasattr(tool, "model_dump"):
            tool = tool.model_dump()
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        name = fn.get("name")
        if isinstance(name, str) and name:
            params = fn.get("parameters")
            out[name] = params if isinstance(params, dict) else {}
    return out


# ----------------------------------------------------------------------------------------
# Buffer helpers


_WS = re.compile(r"\s*")


def _partial_start(buf: str, pos: int, tokens: Iterable[str]) -> int:
    """Smallest i >= pos such that buf[i:] is a proper prefix of a token (len(buf) if none)."""
    n = len(buf)
    longest = max((len(t) for t in tokens), default=1) - 1
    for k in range(min(longest, n - pos), 0, -1):
        tail = buf[n - k:]
        for t in tokens:
            if len(t) > k and t.startswith(tail):
                return n - k
    return n


def _find_first(buf: str, pos: int, tokens: Iterable[str]) -> tuple[int, str | None]:
    best, tok = -1, None
    for t in tokens:
        i = buf.find(t, pos)
        if i != -1 and (tok is None or i < best or (i == best and len(t) > len(tok))):
            best, tok = i, t
    return best, tok


def _drop(_: str) -> None:
    pass


class _StreamParser:
    """Buffer + cursor + the generator protocol described in the module docstring."""

    def __init__(self) -> None:
        self._buf = ""
        self._base = 0          # absolute offset of self._buf[0]
        self._pos = 0           # cursor, index into self._buf
        self._keep: int | None = None  # absolute position to keep for a rewind
        self._final = False
        self._gen = None
        self._finished = False

    # -- driving ---------------------------------------------------------------------
    def _push(self, text: str, final: bool = False) -> None:
        if self._finished:
            raise RuntimeError(f"{type(self).__name__}: feed()/finish() after finish()")
        if text:
            self._buf += text
        if final:
            self._final = True
        if self._gen is None:
            self._gen = self._run()
        try:
            next(self._gen)
            if final:  # pragma: no cover - a helper yielded after the end of the input
                raise RuntimeError("parser asked for more text after finish()")
        except StopIteration:
            if not final:  # pragma: no cover
                raise RuntimeError("parser stopped before finish()") from None
        if final:
            self._finished = True
        # forget consumed text (keeping a marked region for a rewind)
        keep = self._pos if self._keep is None else min(self._pos, self._keep - self._base)
        if keep > 0:
            self._buf = self._buf[keep:]
            self._base += keep
            self._pos -= keep

    def _run(self):  # pragma: no cover - abstract
        raise NotImplementedError
        yield

    # -- cursor ----------------------------------------------------------------------
    def _tell(self) -> int:
        return self._base + self._pos

    def _mark(self) -> int:
        self._keep = self._tell()
        return self._keep

    def _unmark(self) -> None:
        self._keep = None

    def _seek(self, abs_pos: int) -> None:
        assert self._keep is not None and abs_pos >= self._keep, "rewind past the mark"
        self._pos = abs_pos - self._base

    def _slice(self, a: int, b: int) -> str:
        return self._buf[a - self._base:b - self._base]

    def _consume(self, n: int) -> None:
        self._pos += n

    def _at_eof(self) -> bool:
        return self._final and self._pos >= len(self._buf)

    # -- reading helpers (generators: use with ``yield from``) -------------------------
    def _char(self):
        """The next character (not consumed), or None at the end of the input."""
        while self._pos >= len(self._buf):
            if self._final:
                return None
            yield
        return self._buf[self._pos]

    def _skip_ws(self):
        """Consume whitespace; return once a non-space character (or the end) is there."""
        while True:
            self._pos = _WS.match(self._buf, self._pos).end()
            if self._pos < len(self._buf) or self._final:
                return
            yield

    def _match(self, tokens: Iterable[str]):
        """The (longest) token the text at the cursor starts with, or None once none can.
        Nothing is consumed."""
        tokens = tuple(tokens)
        maxlen = max(len(t) for t in tokens)
        while True:
            rest = self._buf[self._pos:self._pos + maxlen]
            best = None
            for t in tokens:
                if rest.startswith(t) and (best is None or len(t) > len(best)):
                    best = t
            if not self._final and any(len(t) > len(rest) and t.startswith(rest) for t in tokens):
                yield
                continue
            return best

    def _next_call(self, begin: str, ends: tuple[str, ...], committed: bool):
        """Inside a tool-call block: skip to the next call opener `begin` (consumed; returns True) or the
        block's end (consumed; returns False). Stray text is skipped once a call has been committed;
        before that, or at the end of the output, it leaves the block (returns False, nothing consumed)."""
        while True:
            yield from self._skip_ws()
            t = yield from self._match((begin, *ends))
            if t is None:
                if self._at_eof() or not committed:
                    return False
                self._consume(1)
                continue
            self._consume(len(t))
            return t == begin

    def _until_step(self, tokens: tuple[str, ...], emit: Callable[[str], None]):
        """One non-blocking step of ``_until``: returns (decided, token)."""
        buf, pos = self._buf, self._pos
        idx, tok = _find_first(buf, pos, tokens)
        if self._final:
            limit = idx if tok is not None else len(buf)
        else:
            hold = _partial_start(buf, pos, tokens)
            if tok is not None and hold <= idx:
                tok = None  # an earlier (or longer) token may still complete
            limit = idx if tok is not None else hold
        if limit > pos:
            emit(buf[pos:limit])
            self._pos = limit
        return (tok is not None or self._final), tok

    def _until(self, tokens: Iterable[str], emit: Callable[[str], None] = _drop):
        """Pass the text before the first of ``tokens`` to ``emit`` (as soon as it cannot be
        part of a token). Returns the token, cursor on it, or None at the end of the input."""
        tokens = tuple(tokens)
        while True:
            done, tok = self._until_step(tokens, emit)
            if done:
                return tok
            yield

    def _collect_until(self, tokens: Iterable[str]):
        parts: list[str] = []
        tok = yield from self._until(tokens, parts.append)
        return "".join(parts), tok

    def _skip_past(self, token: str):
        """Drop everything up to and including ``token`` (or to the end)."""
        tok = yield from self._until((token,))
        if tok is not None:
            self._consume(len(tok))

    def _collect_while(self, pred: Callable[[str], bool]):
        out = []
        while True:
            c = yield from self._char()
            if c is None or not pred(c):
                return "".join(out)
            out.append(c)
            self._consume(1)

    def _json(self, scanner: JsonScanner):
        """Run a JSON scanner from the cursor. True: the value is complete (cursor after it);
        False: syntax error / rejected by the handler (cursor at the bad character);
        None: the input ended first."""
        while True:
            status, self._pos = scanner.feed(self._buf, self._pos)
            if status == JsonScanner.DONE:
                return True
            if status == JsonScanner.ERROR:
                return False
            if self._final:
                scanner.eof()
                return None
            yield


# ----------------------------------------------------------------------------------------
# Tool-call parsers


class ToolCallParser(_StreamParser):
    """Base class: splits content text from tool calls.

    Subclasses either set ``start_tokens`` and implement ``_block(token)`` (the default
    ``_run`` streams text until a start token, then lets ``_block`` read the calls), or
    override ``_run`` entirely.

    ``_block`` returns True when it consumed a tool-call block, or False -- before it
    emitted anything -- to have the block given back as content (the parser rewinds and
    re-reads it as text). The rule all formats follow: invalid calls in a block (unknown
    tool name, malformed header) are dropped, and a block that yields no valid call at all
    -- including one cut off before the first name is complete -- stays text, verbatim.

    Content whitespace rule: whitespace around tool calls (before a call, between calls,
    after the last call) is dropped -- except that when text resumes after the calls, the
    whitespace that preceded them is kept as the separator ("A\n<call>\nB" -> "A\nB").
    Everything else is passed through unchanged, so output without tool calls is returned
    verbatim.
    """

    name: ClassVar[str] = ""
    start_tokens: ClassVar[tuple[str, ...]] = ()
    # text at which a reasoning block ends implicitly when this parser is combined with a
    # reasoning parser (defaults to ``start_tokens``)
    reasoning_break_tokens: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, tools: Iterable[Any] | None = None) -> None:
        super().__init__()
        self.tools = tool_schemas(tools)
        self._content: list[str] = []
        self._calls: list[ToolCall] = []
        self._cur_args: list[str] | None = None  # argument fragments of the open call
        self._out_content: list[str] = []
        self._out_deltas: list[ToolCallDelta] = []
        self._pending_ws = ""  # trailing whitespace of the content, held back
        self._sep_ws = ""      # whitespace that preceded the current group of calls
        self._after_call = False

    @classmethod
    def break_tokens(cls) -> tuple[str, ...]:
        return cls.start_tokens if cls.reasoning_break_tokens is None else cls.reasoning_break_tokens

    # -- public API ------------------------------------------------------------------
    def feed(self, text: str) -> ParsedDelta:
        self._push(text)
        return self._take()

    def finish(self) -> ParsedDelta:
        self._push("", final=True)
        if self._cur_args is not None:
            self._end_call()
        if self._pending_ws:
            self._emit_content(self._pending_ws)
            self._pending_ws = ""
        return self._take()

    def parse_full(self, text: str) -> tuple[str, list[ToolCall]]:
        self.feed(text)
        self.finish()
        return self.content, self.tool_calls

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return list(self._calls)

    # -- output (for subclasses) -----------------------------------------------------
    def _text(self, s: str) -> None:
        """Content text, with the whitespace rule of the class docstring."""
        if not s:
            return
        if self._after_call:
            s = s.lstrip()
            if not s:
                return
            s = self._sep_ws + s
            self._after_call = False
        core = s.rstrip()
        if core:
            self._emit_content(self._pending_ws + core)
            self._pending_ws = s[len(core):]
        else:
            self._pending_ws += s

    def _emit_content(self, s: str) -> None:
        self._content.append(s)
        self._out_content.append(s)

    def _begin_call(self, name: str, call_id: str | None = None) -> None:
        if self._cur_args is not None:
            self._end_call()
        self._unmark()  # committed: no rewind past this point
        if not self._after_call:
            self._sep_ws = self._pending_ws if self._content else ""
        self._pending_ws = ""
        self._after_call = False
        self._calls.append(ToolCall(call_id or make_tool_call_id(), name, ""))
        self._cur_args = []
        self._out_deltas.append(ToolCallDelta(len(self._calls) - 1, self._calls[-1].id, name, ""))

    def _args(self, s: str) -> None:
        if s:
            assert self._cur_args is not None, "argument text outside a call"
            self._cur_args.append(s)
            self._out_deltas.append(ToolCallDelta(len(self._calls) - 1, None, None, s))

    def _end_call(self) -> None:
        if self._cur_args is None:
            return
        if not self._cur_args:
            self._args("{}")
        self._calls[-1].arguments = "".join(self._cur_args)
        self._cur_args = None
        self._after_call = True

    def _emit_call(self, name: str, arguments: str, call_id: str | None = None) -> None:
        self._begin_call(name, call_id)
        self._args(arguments)
        self._end_call()

    def _take(self) -> ParsedDelta:
        merged: list[ToolCallDelta] = []
        for d in self._out_deltas:
            if merged and d.name is None and merged[-1].index == d.index and merged[-1].name is None:
                merged[-1].arguments += d.arguments
            else:
                merged.append(ToolCallDelta(d.index, d.id, d.name, d.arguments))
        out = ParsedDelta("".join(self._out_content), "", merged)
        self._out_content.clear()
        self._out_deltas.clear()
        return out

    # -- default structure: text, start token, block, text ... ---------------------------
    def _run(self):
        while True:
            tok = yield from self._until(self.start_tokens, self._text)
            if tok is None:
                return
            start = self._mark()
            self._consume(len(tok))
            ok = yield from self._block(tok)
            if not ok:
                self._seek(start)
                self._consume(len(tok))
                self._text(tok)
            self._unmark()

    def _block(self, token: str):  # pragma: no cover - abstract
        raise NotImplementedError
        yield

    # -- shared pieces ----------------------------------------------------------------
    def _known(self, name: str) -> bool:
        return name in self.tools

    def _read_args(self):
        """Stream the JSON arguments object at the cursor into the open call (normalised
        as ``json.dumps(..., ensure_ascii=False)``). A cut-off or broken object is closed so
        that the arguments stay valid JSON. Returns True if the object was complete."""
        writer = JsonArgsWriter(self._args)
        ok = yield from self._json(JsonScanner(writer))
        if ok is not True:
            writer.close()
        return ok is True


# ----------------------------------------------------------------------------------------
# Reasoning parsers


class ReasoningParser(_StreamParser):
    """Splits ``<think>reasoning</think>content``.

    * Whitespace and any number of start tokens at the very beginning of the output are
      dropped and open the reasoning block. A start token later in the text is content.
    * ``force_reasoning``: the prompt already opened the block, so the output starts in
      reasoning (a leading start token is still dropped).
    * Reasoning ends at the end token (dropped) or, implicitly, at a tool-call start token
      (``tool_start_tokens`` plus those of the tool parser it is combined with), which is
      kept and starts the content.
    * Output that ends inside the block is all reasoning.
    """

    name: ClassVar[str] = ""
    start_token: ClassVar[str] = "<think>"
    end_token: ClassVar[str] = "</think>"
    default_force: ClassVar[bool] = False
    tool_start_tokens: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, force_reasoning: bool | None = None) -> None:
        super().__init__()
        self.force_reasoning = self.default_force if force_reasoning is None else bool(force_reasoning)
        self._breaks: list[str] = list(self.tool_start_tokens)
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._out_r: list[str] = []
        self._out_c: list[str] = []

    def add_break_tokens(self, tokens: Iterable[str]) -> None:
        """Also end reasoning implicitly at these (tool-call start) tokens."""
        if self._gen is not None:
            raise RuntimeError("add_break_tokens() after the first feed()")
        for t in tokens:
            if t and t not in self._breaks:
                self._breaks.append(t)

    # -- public API ------------------------------------------------------------------
    def feed(self, text: str) -> ParsedDelta:
        self._push(text)
        return self._take()

    def finish(self) -> ParsedDelta:
        self._push("", final=True)
        return self._take()

    def parse_full(self, text: str) -> tuple[str, str]:
        """-> (reasoning, content)"""
        self.feed(text)
        self.finish()
        return self.reasoning, self.content

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def content(self) -> str:
        return "".join(self._content)

    # -- output ----------------------------------------------------------------------
    def _emit_reasoning(self, s: str) -> None:
        self._reasoning.append(s)
        self._out_r.append(s)

    def _emit_content(self, s: str) -> None:
        self._content.append(s)
        self._out_c.append(s)

    def _take(self) -> ParsedDelta:
        out = ParsedDelta("".join(self._out_c), "".join(self._out_r))
        self._out_c.clear()
        self._out_r.clear()
        return out

    # -- parsing ---------------------------------------------------------------------
    def _run(self):
        start = self._mark()
        yield from self._skip_ws()
        opened = False
        while (yield from self._match((self.start_token,))):
            self._consume(len(self.start_token))
            opened = True
        if not opened:
            self._seek(start)  # keep the leading whitespace
        self._unmark()
        if opened or self.force_reasoning:
            tok = yield from self._until([self.end_token, *self._breaks], self._emit_reasoning)
            if tok is None:
                return
            if tok == self.end_token:
                self._consume(len(tok))
        yield from self._until((), self._emit_content)


# ----------------------------------------------------------------------------------------
# Both together


class OutputParser:
    """Reasoning parser (optional) -> tool-call parser (optional), streamed.

    ``feed`` returns what became certain with this delta; ``finish`` flushes what was held
    back. Afterwards ``content``, ``reasoning`` and ``tool_calls`` hold the full result,
    which is the same for any split of the text into deltas.
    """

    def __init__(self, reasoning_parser: ReasoningParser | None = None,
                 tool_parser: ToolCallParser | None = None) -> None:
        self.reasoning_parser = reasoning_parser
        self.tool_parser = tool_parser
        if reasoning_parser is not None and tool_parser is not None:
            reasoning_parser.add_break_tokens(tool_parser.break_tokens())
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._started = False
        self._finished = False

    def feed(self, text_delta: str) -> ParsedDelta:
        if self._finished:
            raise RuntimeError("OutputParser.feed() after finish()")
        self._started = True
        if self.reasoning_parser is not None:
            out = self.reasoning_parser.feed(text_delta)
        else:
            out = ParsedDelta(content=text_delta)
        return self._through_tools(out, final=False)

    def finish(self) -> ParsedDelta:
        if self._finished:
            raise RuntimeError("OutputParser.finish() called twice")
        self._started = True
        out = self.reasoning_parser.finish() if self.reasoning_parser is not None else ParsedDelta()
        out = self._through_tools(out, final=True)
        self._finished = True
        return out

    def _through_tools(self, out: ParsedDelta, final: bool) -> ParsedDelta:
        if self.tool_parser is not None:
            t = self.tool_parser.feed(out.content) if out.content else ParsedDelta()
            if final:
                t2 = self.tool_parser.finish()
                t = ParsedDelta(t.content + t2.content, "", t.tool_calls + t2.tool_calls)
            out = ParsedDelta(t.content, out.reasoning, t.tool_calls)
        self._content.append(out.content)
        self._reasoning.append(out.reasoning)
        return out

    def parse_full(self, text: str) -> tuple[str, str, list[ToolCall]]:
        """One-shot parse of a whole output (on a fresh parser) -> (content, reasoning, tool_calls)."""
        if self._started:
            raise RuntimeError("parse_full() needs a fresh OutputParser")
        self.feed(text)
        self.finish()
        return self.content, self.reasoning, self.tool_calls

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.tool_parser.tool_calls if self.tool_parser is not None else []

    @property
    def finished(self) -> bool:
        return self._finished
