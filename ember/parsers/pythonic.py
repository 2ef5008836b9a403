"""Pythonic tool calls (Llama 3.2 / Llama 4): ``[get_weather(city="Paris"), f(x=1)]``."""

from __future__ import annotations

import ast
import json
from typing import Any

from ember.parsers.base import ToolCallParser


class _ListScanner:
    """Finds the end of ``[name(...), ...]`` while checking, as early as possible, that the
    text after ``[`` starts like a call (``name(``), so ordinary brackets are released
    quickly. Knows Python string literals well enough to skip brackets inside them."""

    MORE, DONE, ERROR = 0, 1, -1

    def __init__(self) -> None:
        self.stage = 0  # 0: before the name, 1: in the name, 2: after it, 3: in the list
        self.depth = 1
        self.quote: str | None = None
        self.escape = False

    def feed(self, s: str, i: int) -> tuple[int, int]:
        n = len(s)
        while i < n:
            c = s[i]
            i += 1
            if self.stage < 3:
                if c.isspace() and self.stage != 1:
                    continue
                if self.stage == 0 and (c.isalpha() or c == "_"):
                    self.stage = 1
                elif self.stage == 1 and (c.isalnum() or c in "_."):
                    pass
                elif self.stage == 1 and c.isspace():
                    self.stage = 2
                elif self.stage in (1, 2) and c == "(":
                    self.stage, self.depth = 3, 2
                else:
                    return self.ERROR, i
            elif self.quote:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == self.quote:
                    self.quote = None
            elif c in "\"'":
                self.quote = c
            elif c in "([{":
                self.depth += 1
            elif c in ")]}":
                self.depth -= 1
                if self.depth == 0:
                    return (self.DONE if c == "]" else self.ERROR), i
        return self.MORE, i

    def eof(self) -> None:
        pass


_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def _value(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _value(node.operand)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("**dict")
        return {str(_value(k)): _value(v) for k, v in zip(node.keys, node.values)}
    raise ValueError(f"not a literal: {ast.dump(node)[:40]}")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + "." + node.attr
    raise ValueError("bad function name")


def parse_call_list(text: str) -> list[tuple[str, dict]] | None:
    """``[f(a=1), g()]`` -> [("f", {"a": 1}), ("g", {})], or None if it is not exactly that."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
        if not isinstance(tree.body, ast.List) or not tree.body.elts:
            return None
        calls = []
        for call in tree.body.elts:
            if not isinstance(call, ast.Call) or call.args:
                return None
            args = {}
            for kw in call.keywords:
                if kw.arg is None:
                    return None
                args[kw.arg] = _value(kw.value)
            calls.append((_dotted(call.func), args))
        return calls
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


class PythonicParser(ToolCallParser):
    """A list of Python-style calls with keyword arguments (literal values; ``true`` /
    ``false`` / ``null`` are accepted too), anywhere in the output, every name a provided
    tool; otherwise the list is text. ``<|python_start|>`` / ``<|python_end|>`` (Llama 4)
    are dropped. Calls are emitted whole once the closing ``]`` arrives."""

    name = "pythonic"
    start_tokens = ("[", "<|python_start|>", "<|python_end|>")
    reasoning_break_tokens = ("<|python_start|>",)

    def _block(self, token: str):
        if token != "[":
            return True  # a marker token: dropped
        start = self._tell() - 1
        status = yield from self._json(_ListScanner())  # same feed protocol as JsonScanner
        if status is not True:
            return False
        calls = parse_call_list(self._slice(start, self._tell()))
        if not calls or not all(self._known(name) for name, _ in calls):
            return False
        for name, args in calls:
            self._emit_call(name, json.dumps(args, ensure_ascii=False))
        return True
