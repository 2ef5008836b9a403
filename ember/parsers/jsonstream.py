"""Incremental JSON: a scanner that reports syntax as it completes, and a writer that turns
those events back into normalised JSON text (``json.dumps(value, ensure_ascii=False)``).

The writer only emits text that can no longer change, so what it has written is always a
prefix of the final serialisation: that is how tool-call arguments are streamed.
"""

from __future__ import annotations

import json
import re
from typing import Callable

_STR_RUN = re.compile(r'[^"\\]*')
_ATOM = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")
_ATOM_CHARS = frozenset("0123456789+-.eEtruefalsn")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")
_JSON_WS = frozenset(" \t\r\n")


class Reject(Exception):
    """Raised by a scanner handler to stop the scan (reported as a syntax error)."""


def json_str_body(s: str) -> str:
    """``s`` encoded as the inside of a JSON string (json.dumps style, ensure_ascii=False).
    The encoding works character by character, so pieces can be encoded separately."""
    return json.dumps(s, ensure_ascii=False)[1:-1]


class NullHandler:
    def begin(self, kind): pass
    def end(self, kind): pass
    def key(self, k): pass
    def str_begin(self): pass
    def str_chunk(self, s): pass
    def str_end(self): pass
    def atom(self, tok): pass


class JsonScanner:
    """Incremental JSON parser for one value. ``feed(text, i)`` reads ``text[i:]`` and calls
    the handler as syntax completes:

    ``begin('{'|'[')``, ``end('{'|'[')``, ``key(str)``, ``str_begin()``, ``str_chunk(str)``
    (decoded text, in pieces), ``str_end()``, ``atom(token)`` (number / true / false / null).

    Lenient where models are sloppy: raw control characters inside strings are accepted, and
    an unknown escape keeps the escaped character.
    """

    MORE, DONE, ERROR = 0, 1, -1

    def __init__(self, handler=None) -> None:
        self.h = handler or NullHandler()
        self.stack: list[str] = []
        self.state = "value"
        self.is_key = False
        self.chars: list[str] = []
        self.hex = ""
        self.high: str | None = None  # pending high surrogate from a \uXXXX escape
        self.atom = ""
        self.done = False

    # -- strings -----------------------------------------------------------------------
    def _add(self, s: str) -> None:
        if self.high is not None:
            self.chars.append(self.high)
            self.high = None
        self.chars.append(s)

    def _add_code(self, code: int) -> None:
        if 0xD800 <= code < 0xDC00:
            if self.high is not None:
                self.chars.append(self.high)
            self.high = chr(code)
        elif 0xDC00 <= code < 0xE000 and self.high is not None:
            self.chars.append(chr(0x10000 + ((ord(self.high) - 0xD800) << 10) + (code - 0xDC00)))
            self.high = None
        else:
            self._add(chr(code))

    def _flush_chars(self) -> None:
        if self.chars and not self.is_key:
            self.h.str_chunk("".join(self.chars))
            self.chars.clear()

    def _end_string(self) -> None:
        if self.high is not None:
            self.chars.append(self.high)
            self.high = None
        text = "".join(self.chars)
        self.chars.clear()
        if self.is_key:
            self.h.key(text)
            self.state = "colon"
        else:
            if text:
                self.h.str_chunk(text)
            self.h.str_end()
            self._value_done()

    # -- structure ---------------------------------------------------------------------
    def _value_done(self) -> None:
        if self.stack:
            self.state = "after"
        else:
            self.done = True
            self.state = "done"

    def _close(self, kind: str) -> None:
        self.stack.pop()
        self.h.end(kind)
        self._value_done()

    def _deliver_atom(self) -> None:
        tok, self.atom = self.atom, ""
        if not _ATOM.fullmatch(tok):
            raise Reject(tok)
        self.h.atom(tok)
        self._value_done()

    def feed(self, text: str, i: int) -> tuple[int, int]:
        """-> (status, index of the first unread character)."""
        if self.done:
            return self.DONE, i
        n = len(text)
        try:
            while i < n:
                st = self.state
                if st == "str":
                    j = _STR_RUN.match(text, i).end()
                    if j > i:
                        self._add(text[i:j])
                        i = j
                    if i >= n:
                        break
                    c = text[i]
                    i += 1
                    if c == '"':
                        self._end_string()
                        if self.done:
                            return self.DONE, i
                    else:
                        self.state = "esc"
                    continue
                c = text[i]
                if st == "esc":
                    i += 1
                    if c == "u":
                        self.state, self.hex = "hex", ""
                    else:
                        self._add(_ESCAPES.get(c, c))
                        self.state = "str"
                    continue
                if st == "hex":
                    if c not in _HEX:
                        raise Reject(c)
                    i += 1
                    self.hex += c
                    if len(self.hex) == 4:
                        self._add_code(int(self.hex, 16))
                        self.state = "str"
                    continue
                if st == "atom":
                    if c in _ATOM_CHARS:
                        self.atom += c
                        i += 1
                        continue
                    self._deliver_atom()
                    if self.done:
                        return self.DONE, i
                    continue  # re-read c in state "after"
                if c in _JSON_WS:
                    i += 1
                    continue
                if st == "value" or st == "value_or_end":
                    if st == "value_or_end" and c == "]":
                        self._close("[")
                    elif c == "{":
                        self.h.begin("{")
                        self.stack.append("{")
                        self.state = "key_or_end"
                    elif c == "[":
                        self.h.begin("[")
                        self.stack.append("[")
                        self.state = "value_or_end"
                    elif c == '"':
                        self.is_key = False
                        self.h.str_begin()
                        self.state = "str"
                    elif c in "-0123456789tfn":
                        self.atom = c
                        self.state = "atom"
                    else:
                        raise Reject(c)
                elif st == "key" or st == "key_or_end":
                    if st == "key_or_end" and c == "}":
                        self._close("{")
                    elif c == '"':
                        self.is_key = True
                        self.state = "str"
                    else:
                        raise Reject(c)
                elif st == "colon":
                    if c != ":":
                        raise Reject(c)
                    self.state = "value"
                elif st == "after":
                    top = self.stack[-1]
                    if c == ",":
                        self.state = "key" if top == "{" else "value"
                    elif (c == "}" and top == "{") or (c == "]" and top == "["):
                        self._close(top)
                    else:
                        raise Reject(c)
                else:  # pragma: no cover
                    raise Reject(c)
                i += 1
                if self.done:
                    return self.DONE, i
        except Reject:
            self.state = "error"
            return self.ERROR, i
        if self.state in ("str", "esc", "hex"):
            self._flush_chars()
        return self.MORE, i

    def eof(self) -> None:
        """The input ended inside the value: deliver what is certain (a pending number)."""
        if self.state == "atom" and _ATOM.fullmatch(self.atom):
            try:
                self._deliver_atom()
            except Reject:  # pragma: no cover
                pass
        elif self.state in ("str", "esc", "hex"):
            self._flush_chars()


class JsonArgsWriter:
    """Scanner handler that writes the scanned value out again as
    ``json.dumps(value, ensure_ascii=False)``, piece by piece, through ``out``.

    The value is meant to be a tool call's arguments object. A string holding a JSON object
    is decoded (some models double-encode); any other non-object value becomes ``{}``.
    ``close()`` ends a cut-off object so the text written is still valid JSON.
    """

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out
        self.stack: list[list] = []  # [kind, number of members so far]
        self.cur_key = ""
        self.in_str = False
        self.mode: str | None = None  # "stream" (object root) | "string" | "skip"
        self.root_chars: list[str] = []
        self.complete = False

    def _prefix(self) -> str:
        if not self.stack:
            return ""
        top = self.stack[-1]
        s = ", " if top[1] else ""
        top[1] += 1
        if top[0] == "{":
            s += json.dumps(self.cur_key, ensure_ascii=False) + ": "
        return s

    def begin(self, kind: str) -> None:
        if self.mode is None:
            self.mode = "stream" if kind == "{" else "skip"
        if self.mode == "stream":
            self.out(self._prefix() + kind)
        self.stack.append([kind, 0])

    def end(self, kind: str) -> None:
        self.stack.pop()
        if self.mode == "stream":
            self.out("}" if kind == "{" else "]")
        if not self.stack:
            self._root_done()

    def key(self, k: str) -> None:
        self.cur_key = k

    def str_begin(self) -> None:
        if self.mode is None:
            self.mode = "string"
        elif self.mode == "stream":
            self.out(self._prefix() + '"')
        self.in_str = True

    def str_chunk(self, s: str) -> None:
        if self.mode == "stream":
            self.out(json_str_body(s))
        elif self.mode == "string":
            self.root_chars.append(s)

    def str_end(self) -> None:
        self.in_str = False
        if self.mode == "stream":
            self.out('"')
        if not self.stack:
            self._root_done()

    def atom(self, tok: str) -> None:
        if self.mode is None:
            self.mode = "skip"
        if self.mode == "stream":
            self.out(self._prefix() + json.dumps(json.loads(tok)))
        if not self.stack:
            self._root_done()

    def _root_done(self) -> None:
        self.complete = True
        if self.mode == "string":
            try:
                value = json.loads("".join(self.root_chars))
            except ValueError:
                value = None
            self.out(json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else "{}")
        elif self.mode == "skip":
            self.out("{}")

    def close(self) -> None:
        if self.complete:
            return
        self.complete = True
        if self.mode == "stream":
            s = '"' if self.in_str else ""
            self.out(s + "".join("}" if k == "{" else "]" for k, _ in reversed(self.stack)))
        else:
            self.out("{}")


class CallEnvelope:
    """Scanner handler for ``{"name": "...", "arguments": {...}}`` (``parameters`` is accepted
    too). Reports the name through ``on_name(name) -> bool`` (False: drop this call; it may
    also raise Reject) and streams the arguments through ``out`` once the name is accepted
    (arguments written before the name are held until then)."""

    ARG_KEYS = ("arguments", "parameters")

    def __init__(self, on_name: Callable[[str], bool], out: Callable[[str], None]) -> None:
        self.on_name = on_name
        self.target = out
        self.state = "wait"  # wait | accept | discard
        self.pending: list[str] = []
        self.writer = JsonArgsWriter(self._out)
        self.depth = 0
        self.cur_key: str | None = None
        self.routing = False
        self.args_seen = False
        self.name: str | None = None
        self.name_chars: list[str] | None = None

    def _out(self, s: str) -> None:
        if self.state == "accept":
            self.target(s)
        elif self.state == "wait":
            self.pending.append(s)

    def _set_name(self, name: str) -> None:
        self.name = name
        if self.on_name(name):
            self.state = "accept"
            for p in self.pending:
                self.target(p)
        else:
            self.state = "discard"
        self.pending.clear()

    def _args_start(self) -> bool:
        return self.depth == 1 and self.cur_key in self.ARG_KEYS and not self.args_seen

    def begin(self, kind: str) -> None:
        if self.routing:
            self.writer.begin(kind)
        elif self.depth == 0:
            if kind != "{":
                raise Reject(kind)
        elif self._args_start():
            self.routing = self.args_seen = True
            self.writer.begin(kind)
        self.depth += 1

    def end(self, kind: str) -> None:
        self.depth -= 1
        if self.routing:
            self.writer.end(kind)
            if self.depth == 1:
                self.routing = False

    def key(self, k: str) -> None:
        if self.routing:
            self.writer.key(k)
        elif self.depth == 1:
            self.cur_key = k

    def str_begin(self) -> None:
        if self.depth == 0:
            raise Reject('"')
        if self.routing:
            self.writer.str_begin()
        elif self._args_start():
            self.routing = self.args_seen = True
            self.writer.str_begin()
        elif self.depth == 1 and self.cur_key == "name" and self.name is None:
            self.name_chars = []

    def str_chunk(self, s: str) -> None:
        if self.routing:
            self.writer.str_chunk(s)
        elif self.name_chars is not None:
            self.name_chars.append(s)

    def str_end(self) -> None:
        if self.routing:
            self.writer.str_end()
            if self.depth == 1:
                self.routing = False
        elif self.name_chars is not None:
            name, self.name_chars = "".join(self.name_chars), None
            self._set_name(name)

    def atom(self, tok: str) -> None:
        if self.depth == 0:
            raise Reject(tok)
        if self.routing:
            self.writer.atom(tok)
        elif self._args_start():
            self.args_seen = True
            self.writer.atom(tok)
