"""Tool-call formats whose arguments are JSON: qwen25 / hermes, llama3, deepseekv3, kimi_k2."""

from __future__ import annotations

import json
import re

from ember.parsers.base import ToolCallParser
from ember.parsers.jsonstream import CallEnvelope, JsonScanner


class _JsonCallParser(ToolCallParser):
    """Shared pieces for ``{"name": ..., "arguments": {...}}`` objects."""

    # Tolerant mode: an output that consists only of call JSON naming provided tools (no tags) is a call.
    tolerant = False
    tolerant_separators = ""  # allowed between the calls of a whole-output list

    def _run(self):
        if self.tolerant and self.tools:
            self._mark()
            calls = yield from self._whole_output_calls(separators=self.tolerant_separators)
            if calls:
                for name, args in calls:
                    self._emit_call(name, args)
                return
            self._seek(self._keep)
            self._unmark()
        yield from super()._run()

    def _read_envelope(self):
        """Read one call object at the cursor (which is on ``{``), streaming it.

        Returns "ok" (a call was emitted), "skip" (a complete object that is not a call to a
        provided tool: dropped), "bad" (not a call, and the JSON broke off: the cursor is at
        the bad character) or "broken" (a call was emitted, then the JSON broke off)."""

        def on_name(name: str) -> bool:
            if self._known(name):
                self._begin_call(name)
                return True
            return False

        env = CallEnvelope(on_name, self._args)
        status = yield from self._json(JsonScanner(env))
        if env.state == "accept":
            if status is not True:
                env.writer.close()
            self._end_call()
            return "ok" if status is not False else "broken"
        return "bad" if status is False else "skip"

    def _json_call(self, obj) -> tuple[str, str] | None:
        """A parsed object -> (name, arguments JSON) if it is a call to a provided tool."""
        if not isinstance(obj, dict):
            return None
        name = obj.get("name")
        if not isinstance(name, str) or not self._known(name):
            return None
        key = next((k for k in CallEnvelope.ARG_KEYS if k in obj), None)
        if key is None:
            return None
        args = obj[key]
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        return name, json.dumps(args, ensure_ascii=False)

    def _whole_output_calls(self, separators: str = ""):
        """Read the rest of the output as nothing but tool-call JSON: objects, lists of
        objects, optionally inside ``` fences, separated by whitespace (or ``separators``).
        Returns [(name, arguments)] or None as soon as the text cannot be that."""
        calls: list[tuple[str, str]] = []
        in_fence = False
        while True:
            yield from self._skip_ws()
            c = yield from self._char()
            if c is None:
                break
            if c in separators:
                self._consume(1)
            elif c in "{[":
                start = self._tell()
                if (yield from self._json(JsonScanner())) is not True:
                    return None
                try:
                    value = json.loads(self._slice(start, self._tell()), strict=False)
                except ValueError:
                    return None
                items = value if isinstance(value, list) else [value]
                if not items:
                    return None
                for item in items:
                    call = self._json_call(item)
                    if call is None:
                        return None
                    calls.append(call)
            elif c == "`":
                if not (yield from self._match(("```",))):
                    return None
                self._consume(3)
                if not in_fence:  # the language tag: ```json
                    yield from self._collect_while(lambda ch: ch.isalnum() or ch in "_-+")
                in_fence = not in_fence
            else:
                return None
        return calls or None


class Qwen25Parser(_JsonCallParser):
    """Qwen2.5 / Hermes: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.

    Tolerant mode (qwen25 / qwen, when tools were provided): if the WHOLE output (ignoring
    surrounding whitespace) is only tool-call JSON -- a bare object, several objects, a list
    of objects, or any of those in a ``` / ```json fence -- naming provided tools, those are
    the tool calls. Small Qwen2.5 models write calls like that. Output starting with ``{``,
    ``[`` or a backtick is therefore held back until it is decided (at the latest at
    ``finish``); any other output streams at once, and JSON mixed with prose stays text.
    """

    name = "qwen25"
    start_tokens = ("<tool_call>",)
    END = "</tool_call>"
    tolerant = True

    def _block(self, token: str):
        committed = False
        while True:
            yield from self._skip_ws()
            t = yield from self._match((self.END, "{"))
            if t == self.END:
                self._consume(len(t))
                return committed
            if t == "{":
                r = yield from self._read_envelope()
                committed = committed or r in ("ok", "broken")
                if r in ("ok", "skip"):
                    continue
            if not committed:
                return False
            yield from self._skip_past(self.END)  # junk after the call(s): dropped
            return True


class HermesParser(Qwen25Parser):
    """Same tags as qwen25, without the tolerant bare-JSON mode."""

    name = "hermes"
    tolerant = False


class Llama3Parser(_JsonCallParser):
    """Llama 3.x JSON calls: ``<|python_tag|>{"name": ..., "parameters": {...}}`` with ``;``
    between parallel calls; or the whole output being such JSON without the tag."""

    name = "llama3"
    start_tokens = ("<|python_tag|>",)
    tolerant = True
    tolerant_separators = ";"

    def _block(self, token: str):
        committed = False
        while True:
            yield from self._skip_ws()
            c = yield from self._char()
            if c == ";":
                self._consume(1)
                continue
            if c != "{":
                return committed  # the end, or text: back to content
            r = yield from self._read_envelope()
            committed = committed or r in ("ok", "broken")
            if r not in ("ok", "skip"):
                return committed


_DS_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
_DS_CALLS_END = "<｜tool▁calls▁end｜>"
_DS_CALL_BEGIN = "<｜tool▁call▁begin｜>"
_DS_CALL_END = "<｜tool▁call▁end｜>"
_DS_SEP = "<｜tool▁sep｜>"


class DeepSeekV3Parser(_JsonCallParser):
    """DeepSeek-V3: ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json {...} ```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>``. The V3.1 layout
    (``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>``) is accepted too."""

    name = "deepseekv3"
    start_tokens = (_DS_CALLS_BEGIN,)

    def _block(self, token: str):
        committed = False
        while True:
            yield from self._skip_ws()
            t = yield from self._match((_DS_CALL_BEGIN, _DS_CALLS_END))
            if t == _DS_CALLS_END:
                self._consume(len(t))
                return committed
            if t is None:
                if self._at_eof() or not committed:
                    return committed
                self._consume(1)  # junk between calls
                continue
            self._consume(len(t))
            head, end = yield from self._collect_until((_DS_SEP, _DS_CALL_END, _DS_CALLS_END))
            name = None
            if end == _DS_SEP:
                self._consume(len(end))
                if head.strip() == "function":  # V3: the name follows the separator
                    name, _ = yield from self._collect_until(("\n", "```", "{", _DS_CALL_END))
                else:  # V3.1: the name precedes it
                    name = head
                name = name.strip()
            if name is None or not self._known(name):
                yield from self._skip_past(_DS_CALL_END)  # an invalid call: dropped
                continue
            self._begin_call(name)
            committed = True
            yield from self._skip_ws()
            if (yield from self._match(("```",))):
                self._consume(3)
                yield from self._collect_while(str.isalnum)
                yield from self._skip_ws()
            yield from self._read_args()
            self._end_call()
            yield from self._skip_past(_DS_CALL_END)  # drops the closing fence


_K2_SECTION_BEGIN = "<|tool_calls_section_begin|>"
_K2_SECTION_ENDS = ("<|tool_calls_section_end|>", "<|tool_call_section_end|>")
_K2_CALL_BEGIN = "<|tool_call_begin|>"
_K2_ARG_BEGIN = "<|tool_call_argument_begin|>"
_K2_CALL_END = "<|tool_call_end|>"
_K2_ID = re.compile(r"^(?:functions\.)?(?P<name>[\w.\-]+?)(?::(?P<index>\d+))?$")


class KimiK2Parser(_JsonCallParser):
    """Kimi-K2: ``<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
    <|tool_call_argument_begin|>{...}<|tool_call_end|>...<|tool_calls_section_end|>``.
    The call id is the model's own ``functions.NAME:IDX`` (what the chat template writes back)."""

    name = "kimi_k2"
    start_tokens = (_K2_SECTION_BEGIN,)

    def _block(self, token: str):
        committed = False
        while True:
            if not (yield from self._next_call(_K2_CALL_BEGIN, _K2_SECTION_ENDS, committed)):
                return committed
            head, end = yield from self._collect_until((_K2_ARG_BEGIN, _K2_CALL_END, *_K2_SECTION_ENDS))
            m = _K2_ID.match(head.strip())
            if end != _K2_ARG_BEGIN or not m or not self._known(m["name"]):
                yield from self._skip_past(_K2_CALL_END)  # an invalid call: dropped
                continue
            self._consume(len(end))
            name = m["name"]
            index = m["index"] if m["index"] is not None else str(len(self._calls))
            self._begin_call(name, f"functions.{name}:{index}")
            committed = True
            yield from self._skip_ws()
            yield from self._read_args()
            self._end_call()
            yield from self._skip_past(_K2_CALL_END)
