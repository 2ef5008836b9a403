"""gpt-oss (Harmony) output::

    <|channel|>analysis<|message|>User wants weather.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>
    <|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>

(the newlines are not part of the format). Needs the special tokens in the decoded text.
"""

from __future__ import annotations

import re

from ember.parsers.base import ReasoningParser, ToolCallParser

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
END, CALL, RETURN = "<|end|>", "<|call|>", "<|return|>"
BODY_ENDS = (END, CALL, RETURN, START)
_CHANNEL = re.compile(r"<\|channel\|>\s*([\w-]+)")
_RECIPIENT = re.compile(r"to=([^\s<]+)")


class _Harmony:
    """Reads the message stream: text outside messages goes to ``_outside``; for each message
    ``_message(header, channel, recipient)`` (a generator) reads the body, with the cursor
    after ``<|message|>``; the body's end token is consumed afterwards."""

    def _harmony(self):
        while True:
            tok = yield from self._until((START, CHANNEL, MESSAGE), self._outside)
            if tok is None:
                return
            header = ""
            if tok != MESSAGE:
                self._consume(len(tok))
                rest, end = yield from self._collect_until((MESSAGE, *BODY_ENDS))
                header = tok + rest
                if end != MESSAGE:  # a header without a body: dropped
                    if end in (END, CALL, RETURN):
                        self._consume(len(end))
                    if end is None:
                        return
                    continue
            self._consume(len(MESSAGE))
            ch = _CHANNEL.search(header)
            rcpt = _RECIPIENT.search(header)
            yield from self._message(header, ch[1] if ch else "", rcpt[1] if rcpt else None)
            end = yield from self._match((END, CALL, RETURN))
            if end:
                self._consume(len(end))


class GptOssReasoningParser(_Harmony, ReasoningParser):
    """analysis -> reasoning; final and plain commentary -> content; a commentary message to
    a recipient (a tool call) is passed on to the content verbatim, for the tool parser."""

    name = "gpt-oss"

    def _run(self):
        yield from self._harmony()

    def _outside(self, s: str) -> None:
        self._emit_content(s)

    def _message(self, header: str, channel: str, recipient: str | None):
        if recipient is not None:
            self._emit_content(header + MESSAGE)
            yield from self._until(BODY_ENDS, self._emit_content)
            self._emit_content(CALL)
        elif channel == "analysis":
            yield from self._until(BODY_ENDS, self._emit_reasoning)
        else:
            yield from self._until(BODY_ENDS, self._emit_content)


class GptOssParser(_Harmony, ToolCallParser):
    """A message to ``functions.NAME`` (or ``NAME``) with a JSON body is a tool call; the
    bodies of other messages are content."""

    name = "gpt-oss"
    reasoning_break_tokens = ()

    def _run(self):
        yield from self._harmony()

    def _outside(self, s: str) -> None:
        self._text(s)

    def _message(self, header: str, channel: str, recipient: str | None):
        name = recipient.rsplit(".", 1)[-1] if recipient else None
        if name is None or not self._known(name):
            yield from self._until(BODY_ENDS, self._text)
            return
        self._begin_call(name)
        yield from self._skip_ws()
        yield from self._read_args()
        self._end_call()
        yield from self._until(BODY_ENDS)
