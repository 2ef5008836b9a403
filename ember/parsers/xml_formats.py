"""Tool-call formats whose arguments are XML-ish ``key -> text`` pairs: qwen3_coder / step3p5,
step3, glm45, glm47, minimax-m2. Values are typed from the tool's JSON schema."""

from __future__ import annotations

import json
from typing import Any, Callable

from ember.parsers.base import ToolCallParser
from ember.parsers.jsonstream import json_str_body
from ember.parsers.schema import (
    finite_float, json_type, literal, loads_or_literal, primary_type, prop_schema, schema_types,
)


class _ArgsBuilder:
    """Writes ``{"k": v, ...}`` one member at a time through ``out``."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out
        self.n = 0

    def key(self, k: str) -> None:
        self.out(("{" if self.n == 0 else ", ") + json.dumps(k, ensure_ascii=False) + ": ")
        self.n += 1

    def value(self, v: Any) -> None:
        self.out(json.dumps(v, ensure_ascii=False))

    def raw(self, s: str) -> None:
        self.out(s)

    def close(self) -> None:
        self.out("{}" if self.n == 0 else "}")


# value stripping policies: what is removed around a raw value
def _strip(value: str, policy: str | None) -> str:
    if policy == "nl1":  # exactly one newline on each side
        if value.startswith("\n"):
            value = value[1:]
        return value[:-1] if value.endswith("\n") else value
    if policy == "nl":
        return value.strip("\n")
    if policy == "ws":
        return value.strip()
    return value


def _strippable(c: str, policy: str | None) -> bool:
    return c == "\n" if policy in ("nl", "nl1") else c.isspace()


class _XmlToolParser(ToolCallParser):
    """Shared pieces. Subclasses define the value policy and ``_convert``.

    Parameters whose declared type makes the value a plain string are streamed character by
    character; other values are converted and sent once complete.
    """

    value_strip: str | None = None
    null_words: tuple[str, ...] = ()

    def _convert(self, value: str, schema: dict | None, params: dict) -> Any:  # pragma: no cover
        raise NotImplementedError

    def _is_raw_string(self, schema: dict | None, params: dict) -> bool:  # pragma: no cover
        raise NotImplementedError

    def _param(self, args: _ArgsBuilder, fn: str, key: str, ends: tuple[str, ...]):
        """Read one value (cursor at its first character) up to the first of ``ends`` and add
        it to ``args``. Returns the end token (cursor on it) or None at the end of input."""
        params = self.tools.get(fn) or {}
        schema = prop_schema(params, key)
        emitted = 0

        def on_text(piece: str) -> None:
            nonlocal emitted
            if not emitted:
                args.key(key)
                args.raw('"')
            args.raw(json_str_body(piece))
            emitted += len(piece)

        stream = on_text if self._is_raw_string(schema, params) else None
        value, end = yield from self._xml_value(ends, stream)
        if emitted:
            args.raw(json_str_body(value[emitted:]) + '"')
        else:
            args.key(key)
            args.value(self._convert(value, schema, params))
        return end

    def _xml_value(self, ends: tuple[str, ...], on_text: Callable[[str], None] | None):
        """The raw value up to the first of ``ends``, stripped per ``value_strip``, and the end
        token (None at the end of input). With ``on_text``, the stripped value is also passed
        on as it arrives -- once it can no longer be one of ``null_words``, and without the
        text the strip may still remove. The caller sends the rest when it gets the value."""
        policy, nulls = self.value_strip, self.null_words
        raw = ""
        lead: int | None = None  # chars stripped at the start, once known
        sent = -1  # raw[lead:sent] has been passed to on_text (-1: not started)

        def collect(s: str) -> None:
            nonlocal raw
            raw += s

        while True:
            done, tok = self._until_step(ends, collect)
            if done:
                return _strip(raw, policy), tok
            if on_text is not None and raw:
                if lead is None:
                    lead = _lead_len(raw, policy)
                if lead is not None:
                    end = _body_end(raw, policy, lead)
                    if sent < 0:
                        body = raw[lead:end].lower()
                        if not any(w.startswith(body) for w in nulls):
                            sent = lead
                    if 0 <= sent < end:
                        on_text(raw[sent:end])
                        sent = end
            yield


def _lead_len(raw: str, policy: str | None) -> int | None:
    """How many leading characters of a (growing, non-empty) value the strip removes, or None
    while that is not known yet (everything so far is strippable)."""
    if policy is None:
        return 0
    if policy == "nl1":
        return 1 if raw[0] == "\n" else 0
    k = 0
    while k < len(raw) and _strippable(raw[k], policy):
        k += 1
    return k if k < len(raw) else None


def _body_end(raw: str, policy: str | None, lead: int) -> int:
    """End of the part of a growing value that the strip can no longer remove."""
    end = len(raw)
    if policy == "nl1":
        return end - 1 if end > lead and raw.endswith("\n") else end
    if policy is not None:
        while end > lead and _strippable(raw[end - 1], policy):
            end -= 1
    return end


class Qwen3CoderParser(_XmlToolParser):
    """Qwen3-Coder / Step-3.5 (``qwen3_coder``, ``step3p5``)::

        <tool_call>
        <function=NAME>
        <parameter=KEY>
        VALUE
        </parameter>
        </function>
        </tool_call>

    One newline is stripped on each side of a value; a value also ends at the next
    ``<parameter=`` or at ``</function>`` (missing close tags are tolerated). A missing
    ``>`` after the parameter name, when a newline follows, is repaired. Several
    ``<function=`` in one block are several calls.
    """

    name = "qwen3_coder"
    start_tokens = ("<tool_call>",)
    value_strip = "nl1"
    null_words = ("null",)
    VALUE_ENDS = ("</parameter>", "<parameter=", "</function>")

    def _is_raw_string(self, schema, params) -> bool:
        return schema is None or primary_type(schema) in ("string", "str", "text", "varchar", "char", "enum")

    def _convert(self, value: str, schema: dict | None, params: dict) -> Any:
        # Qwen3CoderDetector._convert_param_value
        if value.lower() == "null":
            return None
        if schema is None:
            return value
        t = primary_type(schema)
        if t in ("string", "str", "text", "varchar", "char", "enum"):
            return value
        try:
            if t.startswith(("int", "uint", "long", "short", "unsigned")):
                return int(value)
            if t.startswith(("num", "float")):
                f = finite_float(value)
                if f.is_integer() and "." not in value and "e" not in value.lower():
                    return int(f)
                return f
        except ValueError:
            return value
        if t in ("boolean", "bool", "binary"):
            return value.lower() == "true"
        if t in ("object", "array", "arr") or t.startswith(("dict", "list")):
            return loads_or_literal(value)
        try:
            return literal(value)
        except ValueError:
            return value

    def _block(self, token: str):
        committed = False
        while True:
            yield from self._skip_ws()
            t = yield from self._match(("<function=", "</tool_call>"))
            if t == "</tool_call>":
                self._consume(len(t))
                return committed
            if t is None:
                if self._at_eof() or not committed:
                    return committed
                self._consume(1)  # junk inside the block
                continue
            self._consume(len(t))
            name, end = yield from self._collect_until((">", "\n", "<"))
            name = name.strip()
            if end != ">" or not self._known(name):
                yield from self._skip_past("</function>")  # an invalid call: dropped
                continue
            self._consume(1)
            self._begin_call(name)
            committed = True
            yield from self._function_body(name)
            self._end_call()

    def _function_body(self, name: str):
        args = _ArgsBuilder(self._args)
        while True:
            yield from self._skip_ws()
            t = yield from self._match(("<parameter=", "</function>", "</tool_call>"))
            if t == "</function>":
                self._consume(len(t))
                break
            if t == "</tool_call>":
                break
            if t is None:
                if self._at_eof():
                    break
                self._consume(1)
                continue
            self._consume(len(t))
            key, end = yield from self._collect_until((">", "\n", "<"))
            if end is None:
                break
            if end == "<":
                continue
            if end == ">":
                self._consume(1)
            end = yield from self._param(args, name, key.strip(), self.VALUE_ENDS)
            if end is None:
                break
            if end == "</parameter>":
                self._consume(len(end))
        args.close()


class Step3Parser(_XmlToolParser):
    """Step-3::

        <｜tool_calls_begin｜><｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="NAME">
        <steptml:parameter name="KEY">VALUE</steptml:parameter>
        </steptml:invoke><｜tool_call_end｜><｜tool_calls_end｜>

    Values are stripped; a value whose declared type is not "string" is parsed as JSON,
    then as a Python literal, else kept as text.
    """

    name = "step3"
    CALLS_BEGIN = "<｜tool_calls_begin｜>"
    CALLS_END = "<｜tool_calls_end｜>"
    CALL_BEGIN = "<｜tool_call_begin｜>"
    CALL_END = "<｜tool_call_end｜>"
    SEP = "<｜tool_sep｜>"
    start_tokens = (CALLS_BEGIN,)
    value_strip = "ws"
    VALUE_ENDS = ("</steptml:parameter>", "<steptml:parameter", "</steptml:invoke>", CALL_END)

    @staticmethod
    def _type(schema: dict | None) -> str:
        t = schema.get("type", "string") if isinstance(schema, dict) else "string"
        return t if isinstance(t, str) else json.dumps(t)

    def _is_raw_string(self, schema, params) -> bool:
        return self._type(schema) == "string"

    def _convert(self, value: str, schema: dict | None, params: dict) -> Any:
        return value if self._type(schema) == "string" else loads_or_literal(value)

    def _block(self, token: str):
        committed = False
        while True:
            if not (yield from self._next_call(self.CALL_BEGIN, (self.CALLS_END,), committed)):
                return committed
            kind, end = yield from self._collect_until((self.SEP, self.CALL_END, self.CALLS_END))
            name = None
            if end == self.SEP and kind.strip() == "function":
                self._consume(len(end))
                yield from self._skip_ws()
                if (yield from self._match(("<steptml:invoke name=",))):
                    self._consume(len("<steptml:invoke name="))
                    name, end = yield from self._collect_until((">", "\n", "<"))
                    name = name.strip().strip("\"'") if end == ">" else None
            if name is None or not self._known(name):
                yield from self._skip_past(self.CALL_END)  # an invalid call: dropped
                continue
            self._consume(1)
            self._begin_call(name)
            committed = True
            args = _ArgsBuilder(self._args)
            while True:
                yield from self._skip_ws()
                t = yield from self._match(("<steptml:parameter name=", "</steptml:invoke>",
                                            self.CALL_END, self.CALLS_END))
                if t == "<steptml:parameter name=":
                    self._consume(len(t))
                    key, end = yield from self._collect_until((">", "\n", "<"))
                    if end != ">":
                        continue
                    self._consume(1)
                    end = yield from self._param(args, name, key.strip().strip("\"'"), self.VALUE_ENDS)
                    if end == "</steptml:parameter>":
                        self._consume(len(end))
                    elif end is None:
                        break
                elif t == "</steptml:invoke>":
                    self._consume(len(t))
                elif t == self.CALL_END:
                    self._consume(len(t))
                    break
                elif t == self.CALLS_END or self._at_eof():
                    break
                else:
                    self._consume(1)
            args.close()
            self._end_call()


class _GlmParser(_XmlToolParser):
    """GLM-4.5 / 4.6 (``glm45``) and GLM-4.7 / 5 (``glm47``)::

        <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>

    (glm45 puts a newline after the name and between the pairs; both layouts are accepted
    by both.) A string-typed value is kept verbatim; other values are parsed as JSON, then
    JSON with ``\\"`` unescaped, then as a Python literal, else kept as text. A number or
    integer given as a quoted string is turned into a number. An undeclared key is typed
    from its value.
    """

    start_tokens = ("<tool_call>",)
    value_strip = None

    def _types(self, schema, params) -> set[str]:
        return schema_types(schema, params) if schema is not None else set()

    def _is_raw_string(self, schema, params) -> bool:
        return self._types(schema, params) == {"string"}

    def _convert(self, value: str, schema: dict | None, params: dict) -> Any:
        types = self._types(schema, params)
        if types == {"string"}:
            return value
        s = value.strip()
        v: Any = value
        for attempt in (lambda: json.loads(s), lambda: json.loads(s.replace('\\"', '"')), lambda: literal(s)):
            try:
                v = attempt()
                break
            except ValueError:
                continue
        if types & {"number", "integer"} and isinstance(v, str):  # a quoted number
            try:
                f = finite_float(v)
                plain = "." not in v and "e" not in v.lower()
                v = int(f) if f.is_integer() and ("integer" in types or plain) else f
            except ValueError:
                pass
        if types and "string" in types and json_type(v) not in types and not (
                json_type(v) == "integer" and "number" in types):
            return value  # e.g. "123" for a string|null parameter stays a string
        return v

    def _block(self, token: str):
        yield from self._skip_ws()
        name, end = yield from self._collect_until(("<", "\n", "\\n"))
        name = name.strip()
        if end is None or not self._known(name):
            return False  # one call per block: give it back as text
        self._begin_call(name)
        args = _ArgsBuilder(self._args)
        while True:
            yield from self._skip_ws()
            t = yield from self._match(("<arg_key>", "</tool_call>"))
            if t == "</tool_call>":
                self._consume(len(t))
                break
            if t is None:
                if self._at_eof():
                    break
                self._consume(1)  # junk, e.g. a literal "\n"
                continue
            self._consume(len(t))
            key, end = yield from self._collect_until(("</arg_key>", "<"))
            if end != "</arg_key>":
                if end is None:
                    break
                continue
            self._consume(len(end))
            while True:  # whitespace or literal "\n" between </arg_key> and <arg_value>
                yield from self._skip_ws()
                if not (yield from self._match(("\\n",))):
                    break
                self._consume(2)
            if not (yield from self._match(("<arg_value>",))):
                continue
            self._consume(len("<arg_value>"))
            end = yield from self._param(args, name, key.strip(), ("</arg_value>",))
            if end is None:
                break
            self._consume(len(end))
        args.close()
        self._end_call()
        return True


class Glm45Parser(_GlmParser):
    name = "glm45"


class Glm47Parser(_GlmParser):
    name = "glm47"


class MinimaxM2Parser(_XmlToolParser):
    """MiniMax-M2::

        <minimax:tool_call>
        <invoke name="NAME">
        <parameter name="KEY">VALUE</parameter>
        </invoke>
        </minimax:tool_call>

    Several ``<invoke>`` in one block are several calls. Newlines around a value are
    stripped. Typing: ``null``/``none``/``nil`` -> null; otherwise the declared types are
    tried in the order integer, number, boolean (true/1/yes/on, false/0/no/off), object,
    array, string; the fallback is JSON, then the text. An undeclared key is a string.
    """

    name = "minimax-m2"
    BEGIN = "<minimax:tool_call>"
    END = "</minimax:tool_call>"
    start_tokens = (BEGIN,)
    value_strip = "nl"
    null_words = ("null", "none", "nil")
    VALUE_ENDS = ("</parameter>", "<parameter name=", "</invoke>")

    def _types(self, schema, params) -> list[str]:
        if schema is None:
            return ["string"]
        return sorted(schema_types(schema, params)) or ["string"]

    def _is_raw_string(self, schema, params) -> bool:
        return set(self._types(schema, params)) <= {"string", "str", "text"}

    def _convert(self, value: str, schema: dict | None, params: dict) -> Any:
        if value.lower() in self.null_words:
            return None
        types = self._types(schema, params)
        for t in ("integer", "int", "number", "float", "boolean", "bool", "object", "array", "string", "str", "text"):
            if t not in types:
                continue
            if t in ("string", "str", "text"):
                return value
            try:
                if t in ("integer", "int"):
                    return int(value)
                if t in ("number", "float"):
                    f = finite_float(value)
                    return int(f) if f.is_integer() else f
            except ValueError:
                continue
            if t in ("boolean", "bool"):
                low = value.strip().lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                continue
            if t in ("object", "array"):
                try:
                    v = json.loads(value)
                except ValueError:
                    continue
                if json_type(v) == t:
                    return v
        try:
            return json.loads(value)
        except ValueError:
            return value

    def _block(self, token: str):
        committed = False
        while True:
            if not (yield from self._next_call("<invoke name=", (self.END,), committed)):
                return committed
            name, end = yield from self._collect_until((">", "\n", "<"))
            name = name.strip().strip("\"'")
            if end != ">" or not self._known(name):
                yield from self._skip_past("</invoke>")  # an invalid call: dropped
                continue
            self._consume(1)
            self._begin_call(name)
            committed = True
            args = _ArgsBuilder(self._args)
            while True:
                yield from self._skip_ws()
                t = yield from self._match(("<parameter name=", "</invoke>", self.END))
                if t == "</invoke>":
                    self._consume(len(t))
                    break
                if t == self.END:
                    break
                if t is None:
                    if self._at_eof():
                        break
                    self._consume(1)
                    continue
                self._consume(len(t))
                key, end = yield from self._collect_until((">", "\n", "<"))
                if end != ">":
                    if end is None:
                        break
                    continue
                self._consume(1)
                end = yield from self._param(args, name, key.strip().strip("\"'"), self.VALUE_ENDS)
                if end is None:
                    break
                if end == "</parameter>":
                    self._consume(len(end))
            args.close()
            self._end_call()
