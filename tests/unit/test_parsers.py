"""Tool-call and reasoning parsers (ember/parsers): the wire formats of FORMATS.md, type
recovery, and the streaming == one-shot property for any chunking.

Every example in CASES is checked three ways: its expected one-shot result, character by
character streaming, and hypothesis-chosen random chunk boundaries (which split tags,
escapes, emoji / ZWJ / combining sequences anywhere). Decisions the cases pin down:
JSON mixed with prose stays text for qwen25 (only an output that is nothing but calls is
a call); invalid calls are dropped and a block without a valid call stays text; a call
cut off after its name is complete is returned with its arguments closed as valid JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.parsers import (
    REASONING_PARSERS, TOOL_CALL_PARSERS, OutputParser, ParsedDelta, ToolCall, ToolCallDelta,
    get_reasoning_parser, get_tool_call_parser, make_output_parser, parse_full,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                   "metric": {"type": "boolean"},
                   "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["city"]}}}
LIST_FILES = {"type": "function", "function": {"name": "list_files", "parameters": {
    "type": "object", "properties": {}}}}
WRITE_FILE = {"type": "function", "function": {"name": "write_file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}}}
SET_CONFIG = {"type": "function", "function": {"name": "set_config", "parameters": {
    "type": "object",
    "properties": {"value": {"type": ["integer", "null"]}, "ratio": {"type": "number"},
                   "opts": {"type": "object"}, "mode": {"enum": ["a", "b"]},
                   "label": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                   "flag": {"type": "boolean"}}}}}
TOOLS = [WEATHER, LIST_FILES, WRITE_FILE, SET_CONFIG]


@dataclass
class Case:
    id: str
    tool: str | None
    text: str
    content: str = ""
    calls: list = field(default_factory=list)  # [(name, arguments dict)]
    reasoning: str = ""
    rparser: str | None = None
    force: bool | None = None
    tools: list = field(default_factory=lambda: TOOLS)


def W(**kw):
    return ("get_weather", kw)


# ---------------------------------------------------------------------------------------
# Examples (verbatim from FORMATS.md where it has them)

QWEN3_CODER_ONE = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                   "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
QWEN3_CODER_TWO = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n"
                   "</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nLondon\n</parameter>\n"
                   "</function>\n</tool_call>")
STEP3_TWO = ('<｜tool_calls_begin｜>\n<｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="get_weather">\n'
             '<steptml:parameter name="city">Paris</steptml:parameter>\n'
             '<steptml:parameter name="days">3</steptml:parameter>\n'
             '</steptml:invoke><｜tool_call_end｜>\n'
             '<｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="get_weather">\n'
             '<steptml:parameter name="city">London</steptml:parameter>\n'
             '</steptml:invoke><｜tool_call_end｜>\n<｜tool_calls_end｜>')
GLM47_ONE = ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
             "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>")
GLM47_TWO = ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value><arg_key>date</arg_key>"
             "<arg_value>2024-06-27</arg_value></tool_call><tool_call>get_weather<arg_key>city</arg_key>"
             "<arg_value>上海</arg_value><arg_key>date</arg_key><arg_value>2024-06-27</arg_value></tool_call>")
GLM45_ONE = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n<arg_key>date</arg_key>\n"
             "<arg_value>2024-06-27</arg_value>\n</tool_call>")
MINIMAX_ONE = ('<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
               '<parameter name="days">3</parameter>\n</invoke>\n</minimax:tool_call>')
MINIMAX_TWO = ('<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
               '</invoke>\n<invoke name="get_weather">\n<parameter name="city">London</parameter>\n</invoke>\n'
               '</minimax:tool_call>')
QWEN25_ONE = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
QWEN25_TWO = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_weather", "arguments": {"city": "London"}}\n</tool_call>')
LLAMA3_ONE = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'
LLAMA3_TWO = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}};'
              '{"name": "get_weather", "parameters": {"city": "London"}}')
DSV3_TWO = ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Tokyo"}\n'
            '```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n'
            '```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
KIMI_TWO = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
            '{"city": "Paris"}<|tool_call_end|><|tool_call_begin|>functions.get_weather:1'
            '<|tool_call_argument_begin|>{"city": "London"}<|tool_call_end|><|tool_calls_section_end|>')
HARMONY = ('<|channel|>analysis<|message|>User wants weather.<|end|><|start|>assistant<|channel|>commentary '
           'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>')

UNI = "北京 🌧️ naïve e\u0301 👩‍👩‍👧 \"q\" \\ tab\t"


def q3c(name, params, wrap=True):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    s = f"<function={name}>\n{body}</function>"
    return f"<tool_call>\n{s}\n</tool_call>" if wrap else s


def glm(name, params, sep=""):
    body = "".join(f"<arg_key>{k}</arg_key>{sep}<arg_value>{v}</arg_value>{sep}" for k, v in params)
    return f"<tool_call>{name}{sep}{body}</tool_call>"


def mm(calls):
    inv = "".join(f'<invoke name="{n}">\n' + "".join(f'<parameter name="{k}">{v}</parameter>\n' for k, v in ps)
                  + "</invoke>\n" for n, ps in calls)
    return f"<minimax:tool_call>\n{inv}</minimax:tool_call>"


def st3(calls):
    body = "".join('<｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="%s">\n' % n
                   + "".join(f'<steptml:parameter name="{k}">{v}</steptml:parameter>\n' for k, v in ps)
                   + "</steptml:invoke><｜tool_call_end｜>\n" for n, ps in calls)
    return f"<｜tool_calls_begin｜>\n{body}<｜tool_calls_end｜>"


def q25(name, args, key="arguments"):
    return "<tool_call>\n" + json.dumps({"name": name, key: args}, ensure_ascii=False) + "\n</tool_call>"


NESTED = {"city": "Paris", "tags": ["a", "b"], "opts": {"k": [1, {"z": None, "t": True}], "s": "x"}}

CASES: list[Case] = [
    # ---------------- qwen3_coder / step3p5
    Case("q3c-one", "qwen3_coder", QWEN3_CODER_ONE, calls=[W(city="Paris", days=3)]),
    Case("q3c-two", "qwen3_coder", QWEN3_CODER_TWO, calls=[W(city="Paris"), W(city="London")]),
    Case("q3c-two-nosep", "step3p5", QWEN3_CODER_TWO.replace("</tool_call>\n<tool_call>", "</tool_call><tool_call>"),
         calls=[W(city="Paris"), W(city="London")]),
    Case("q3c-text-before", "qwen3_coder", "Let me check the weather.\n\n" + QWEN3_CODER_ONE,
         "Let me check the weather.", [W(city="Paris", days=3)]),
    Case("q3c-text-after", "qwen3_coder", "A\n" + QWEN3_CODER_ONE + "\nB", "A\nB", [W(city="Paris", days=3)]),
    Case("q3c-unicode", "qwen3_coder", q3c("get_weather", [("city", UNI)]), calls=[W(city=UNI)]),
    Case("q3c-nested", "qwen3_coder",
         q3c("set_config", [("opts", json.dumps(NESTED["opts"])), ("value", "7")]),
         calls=[("set_config", {"opts": NESTED["opts"], "value": 7})]),
    Case("q3c-array", "qwen3_coder", q3c("get_weather", [("city", "x"), ("tags", '["a", "b"]')]),
         calls=[W(city="x", tags=["a", "b"])]),
    Case("q3c-types", "qwen3_coder", q3c("set_config", [
        ("value", "null"), ("ratio", "2.50"), ("flag", "True"), ("mode", "a"), ("label", "12"),
        ("opts", "{'py': True}"), ("extra", "5")]),
         calls=[("set_config", {"value": None, "ratio": 2.5, "flag": True, "mode": "a", "label": "12",
                                "opts": {"py": True}, "extra": "5"})]),
    Case("q3c-types2", "qwen3_coder", q3c("get_weather", [("days", "abc"), ("metric", "false"), ("city", "Null")]),
         calls=[W(days="abc", metric=False, city=None)]),
    Case("q3c-ratio-int", "qwen3_coder", q3c("set_config", [("ratio", "3")]), calls=[("set_config", {"ratio": 3})]),
    Case("q3c-multiline", "qwen3_coder", q3c("write_file", [("path", "a.py"), ("content", "\ndef f():\n    return 1\n\n")]),
         calls=[("write_file", {"path": "a.py", "content": "\ndef f():\n    return 1\n\n"})]),
    Case("q3c-no-params", "qwen3_coder", "<tool_call>\n<function=list_files>\n</function>\n</tool_call>",
         calls=[("list_files", {})]),
    Case("q3c-missing-close-tags", "qwen3_coder",
         "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n3\n</function>\n</tool_call>",
         calls=[W(city="Paris", days=3)]),
    Case("q3c-missing-gt", "qwen3_coder",
         "<tool_call>\n<function=get_weather>\n<parameter=city\nParis\n</parameter>\n</function>\n</tool_call>",
         calls=[W(city="Paris")]),
    Case("q3c-unknown-tool", "qwen3_coder", "<tool_call>\n<function=rm_rf>\n</function>\n</tool_call>",
         "<tool_call>\n<function=rm_rf>\n</function>\n</tool_call>"),
    Case("q3c-no-tools", "qwen3_coder", QWEN3_CODER_ONE, QWEN3_CODER_ONE, tools=[]),
    Case("q3c-truncated-value", "qwen3_coder",
         "<tool_call>\n<function=get_weather>\n<parameter=days>\n3\n</parameter>\n<parameter=city>\nPar",
         calls=[W(days=3, city="Par")]),
    Case("q3c-truncated-name", "qwen3_coder", "Hi <tool_call>\n<function=get_wea", "Hi <tool_call>\n<function=get_wea"),
    Case("q3c-lookalike-text", "qwen3_coder", "a < b and <tool> or <tool_cal", "a < b and <tool> or <tool_cal"),
    # ---------------- step3
    Case("step3-two", "step3", STEP3_TWO, calls=[W(city="Paris", days=3), W(city="London")]),
    Case("step3-text", "step3", "Hi " + st3([("get_weather", [("city", "Rome")])]) + " Bye", "Hi Bye",
         [W(city="Rome")]),
    Case("step3-types", "step3", st3([("get_weather", [("city", " 北京 "), ("days", "3"), ("metric", "true"),
                                                       ("tags", "['x', 'y']")])]),
         calls=[W(city="北京", days=3, metric=True, tags=["x", "y"])]),
    Case("step3-nested", "step3", st3([("set_config", [("opts", json.dumps(NESTED["opts"]))])]),
         calls=[("set_config", {"opts": NESTED["opts"]})]),
    Case("step3-unicode", "step3", st3([("get_weather", [("city", UNI)])]), calls=[W(city=UNI.strip())]),
    Case("step3-truncated", "step3",
         '<｜tool_calls_begin｜>\n<｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="get_weather">\n'
         '<steptml:parameter name="days">2</steptml:parameter>\n<steptml:parameter name="city">Ro',
         calls=[W(days=2, city="Ro")]),
    # ---------------- glm47 / glm45
    Case("glm47-one", "glm47", GLM47_ONE, calls=[W(city="Paris", days=3)]),
    Case("glm47-two", "glm47", GLM47_TWO, calls=[W(city="北京", date="2024-06-27"), W(city="上海", date="2024-06-27")]),
    Case("glm47-no-args", "glm47", "<tool_call>list_files</tool_call>", calls=[("list_files", {})]),
    Case("glm47-text", "glm47", "Checking.\n" + GLM47_ONE + "\nDone.", "Checking.\nDone.", [W(city="Paris", days=3)]),
    Case("glm47-types", "glm47", glm("set_config", [("ratio", '"2.5"'), ("value", "null"), ("label", "123"),
                                                    ("opts", json.dumps(NESTED["opts"], ensure_ascii=False)),
                                                    ("flag", "true"), ("extra", "[1, 2]")]),
         calls=[("set_config", {"ratio": 2.5, "value": None, "label": "123", "opts": NESTED["opts"],
                                "flag": True, "extra": [1, 2]})]),
    Case("glm47-string-stays", "glm47", glm("write_file", [("path", "{\"a\": 1}"), ("content", " x\n")]),
         calls=[("write_file", {"path": '{"a": 1}', "content": " x\n"})]),
    Case("glm47-unicode", "glm47", glm("get_weather", [("city", UNI), ("tags", '["é", "🙂"]')]),
         calls=[W(city=UNI, tags=["é", "🙂"])]),
    Case("glm47-truncated", "glm47", "<tool_call>get_weather<arg_key>days</arg_key><arg_value>4</arg_value>"
                                     "<arg_key>city</arg_key><arg_value>Lon", calls=[W(days=4, city="Lon")]),
    Case("glm47-unknown", "glm47", "<tool_call>nope<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
         "<tool_call>nope<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>"),
    Case("glm45-one", "glm45", GLM45_ONE, calls=[W(city="北京", date="2024-06-27")]),
    Case("glm45-two", "glm", GLM45_ONE + "\n" + glm("get_weather", [("city", "上海"), ("days", "2")], sep="\n")
         .replace("<tool_call>get_weather", "<tool_call>get_weather"),
         calls=[W(city="北京", date="2024-06-27"), W(city="上海", days=2)]),
    # ---------------- minimax-m2
    Case("mm-one", "minimax-m2", MINIMAX_ONE, calls=[W(city="Paris", days=3)]),
    Case("mm-two", "minimax-m2", MINIMAX_TWO, calls=[W(city="Paris"), W(city="London")]),
    Case("mm-text", "minimax-m2", "Sure!\n\n" + MINIMAX_ONE, "Sure!", [W(city="Paris", days=3)]),
    Case("mm-types", "minimax-m2", mm([("set_config", [("value", "none"), ("ratio", "2.0"), ("flag", "yes"),
                                                       ("opts", json.dumps(NESTED["opts"])), ("mode", "b"),
                                                       ("extra", " 5 ")]),
                                       ("get_weather", [("city", "\nParis\n"), ("tags", '["x"]')])]),
         calls=[("set_config", {"value": None, "ratio": 2, "flag": True, "opts": NESTED["opts"], "mode": "b",
                                "extra": " 5 "}), W(city="Paris", tags=["x"])]),
    Case("mm-unicode", "minimax-m2", mm([("get_weather", [("city", UNI)])]), calls=[W(city=UNI)]),
    Case("mm-truncated", "minimax-m2", '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Pa',
         calls=[W(city="Pa")]),
    Case("mm-unknown", "minimax-m2", mm([("nope", [("a", "1")])]), mm([("nope", [("a", "1")])])),
    # ---------------- qwen25 / hermes
    Case("q25-one", "qwen25", QWEN25_ONE, calls=[W(city="Paris", days=3)]),
    Case("q25-two", "qwen25", QWEN25_TWO, calls=[W(city="Paris"), W(city="London")]),
    Case("q25-text-before", "qwen25", "I'll look it up.\n" + QWEN25_ONE, "I'll look it up.", [W(city="Paris", days=3)]),
    Case("q25-unicode", "qwen25", q25("get_weather", {"city": UNI}), calls=[W(city=UNI)]),
    Case("q25-escapes", "hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "\\u5317\\ud83d\\ude00'
                                  '</tool_call>\\n\\"x\\"", "days": 1e1}}</tool_call>',
         calls=[W(city="北😀</tool_call>\n\"x\"", days=10.0)]),
    Case("q25-nested", "qwen25", q25("set_config", NESTED), calls=[("set_config", NESTED)]),
    Case("q25-parameters-key", "hermes", q25("get_weather", {"city": "Oslo"}, key="parameters"), calls=[W(city="Oslo")]),
    Case("q25-args-first", "qwen25", '<tool_call>\n{"arguments": {"city": "Rome"}, "name": "get_weather"}\n</tool_call>',
         calls=[W(city="Rome")]),
    Case("q25-string-args", "qwen25",
         '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>',
         calls=[W(city="Rome")]),
    Case("q25-truncated", "qwen25", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
         calls=[W(city="Par")]),
    Case("q25-truncated-number", "qwen25", '<tool_call>\n{"name": "get_weather", "arguments": {"days": 12',
         calls=[W(days=12)]),
    Case("q25-truncated-name", "qwen25", '<tool_call>\n{"name": "get_wea', '<tool_call>\n{"name": "get_wea'),
    Case("q25-unknown-tagged", "qwen25", q25("nope", {"a": 1}), q25("nope", {"a": 1})),
    # qwen25 tolerant mode
    Case("q25-bare", "qwen25", ' {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n',
         calls=[W(city="Paris", days=3)]),
    Case("q25-fenced", "qwen25", '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
         calls=[W(city="Paris")]),
    Case("q25-fenced-plain", "qwen25", '```\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
         calls=[W(city="Paris")]),
    Case("q25-list", "qwen25", '[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                               '{"name": "get_weather", "arguments": {"city": "Rome"}}]',
         calls=[W(city="Paris"), W(city="Rome")]),
    Case("q25-several", "qwen25", '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                  '{"name": "list_files", "arguments": {}}',
         calls=[W(city="Paris"), ("list_files", {})]),
    Case("q25-bare-unknown", "qwen25", '{"name": "nope", "arguments": {"city": "Paris"}}',
         '{"name": "nope", "arguments": {"city": "Paris"}}'),
    Case("q25-bare-no-tools", "qwen25", '{"name": "get_weather", "arguments": {"city": "Paris"}}',
         '{"name": "get_weather", "arguments": {"city": "Paris"}}', tools=[]),
    Case("q25-bare-mixed-prose", "qwen25", 'Call: {"name": "get_weather", "arguments": {"city": "Paris"}}',
         'Call: {"name": "get_weather", "arguments": {"city": "Paris"}}'),
    Case("q25-bare-then-prose", "qwen25", '{"name": "get_weather", "arguments": {"city": "Paris"}} done',
         '{"name": "get_weather", "arguments": {"city": "Paris"}} done'),
    Case("q25-fence-then-prose", "qwen25", '```json\n{"name": "get_weather", "arguments": {"city": "P"}}\n```\nOK',
         '```json\n{"name": "get_weather", "arguments": {"city": "P"}}\n```\nOK'),
    Case("q25-code-block", "qwen25", "```python\nprint({'a': 1})\n```", "```python\nprint({'a': 1})\n```"),
    Case("q25-plain-json", "qwen25", '{"a": 1}', '{"a": 1}'),
    Case("q25-bare-truncated", "qwen25", '{"name": "get_weather", "arguments": {"city": "Pa',
         '{"name": "get_weather", "arguments": {"city": "Pa'),
    Case("hermes-no-tolerant", "hermes", '{"name": "get_weather", "arguments": {"city": "Paris"}}',
         '{"name": "get_weather", "arguments": {"city": "Paris"}}'),
    # ---------------- llama3
    Case("llama3-one", "llama3", LLAMA3_ONE, calls=[W(city="Paris")]),
    Case("llama3-two", "llama3", LLAMA3_TWO, calls=[W(city="Paris"), W(city="London")]),
    Case("llama3-bare", "llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', calls=[W(city="Paris")]),
    Case("llama3-text", "llama3", "Let me check. " + LLAMA3_ONE, "Let me check.", [W(city="Paris")]),
    Case("llama3-nested", "llama3", '<|python_tag|>' + json.dumps({"name": "set_config", "parameters": NESTED}),
         calls=[("set_config", NESTED)]),
    Case("llama3-unknown", "llama3", '{"name": "nope", "parameters": {}}', '{"name": "nope", "parameters": {}}'),
    # ---------------- deepseekv3
    Case("dsv3-two", "deepseekv3", DSV3_TWO, calls=[W(city="Tokyo"), W(city="Paris")]),
    Case("dsv3-text", "deepseekv3", "Checking…\n" + DSV3_TWO, "Checking…", [W(city="Tokyo"), W(city="Paris")]),
    Case("dsv31", "deepseekv3", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "'
                                + UNI.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t")
                                + '"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>', calls=[W(city=UNI)]),
    Case("dsv3-truncated", "deepseekv3", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>'
                                         'get_weather\n```json\n{"city": "To', calls=[W(city="To")]),
    # ---------------- kimi_k2
    Case("kimi-two", "kimi_k2", KIMI_TWO, calls=[W(city="Paris"), W(city="London")]),
    Case("kimi-nested", "kimi_k2", "Sure. " + KIMI_TWO.replace('{"city": "Paris"}', json.dumps(NESTED)),
         "Sure.", [("get_weather", NESTED), W(city="London")]),
    # ---------------- pythonic
    Case("py-two", "pythonic", '[get_weather(city="Paris", days=3), get_weather(city="London")]',
         calls=[W(city="Paris", days=3), W(city="London")]),
    Case("py-text", "pythonic", "Calling [get_weather(city='Pa]ris', tags=['a'])] now. See [1] and [x](y).",
         "Calling now. See [1] and [x](y).", [W(city="Pa]ris", tags=["a"])]),
    Case("py-llama4", "pythonic", "<|python_start|>[set_config(opts={'k': [1, None]}, value=-3, flag=true)]<|python_end|>",
         calls=[("set_config", {"opts": {"k": [1, None]}, "value": -3, "flag": True})]),
    Case("py-unknown", "pythonic", "[nope(a=1)]", "[nope(a=1)]"),
    Case("py-positional", "pythonic", "[get_weather('Paris')]", "[get_weather('Paris')]"),
    # ---------------- gpt-oss
    Case("gptoss", "gpt-oss", HARMONY, calls=[W(city="Paris")], reasoning="User wants weather.", rparser="gpt-oss"),
    Case("gptoss-final", "gpt-oss", "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final"
                                    "<|message|>It is 4.<|return|>", "It is 4.", reasoning="Easy.", rparser="gpt-oss"),
    # ---------------- reasoning (+ tools)
    Case("r1-force", None, "Let me think.\n</think>\nThe answer is 4.", "\nThe answer is 4.",
         reasoning="Let me think.\n", rparser="step3p5"),
    Case("r1-start-tag", None, "<think>Hmm.</think>42", "42", reasoning="Hmm.", rparser="deepseek-r1"),
    Case("r1-unterminated", None, "Still thinking 🤔 about it", reasoning="Still thinking 🤔 about it",
         rparser="deepseek-r1"),
    Case("step3p5-tool", "step3p5", "I need weather.\n</think>\n" + QWEN3_CODER_ONE.replace("<parameter=days>\n3\n</parameter>\n", ""),
         calls=[W(city="Paris")], reasoning="I need weather.\n", rparser="step3p5"),
    Case("step3p5-tool-in-think", "step3p5", "I need weather.\n" + QWEN3_CODER_ONE,
         calls=[W(city="Paris", days=3)], reasoning="I need weather.\n", rparser="step3p5"),
    Case("qwen3-force", None, "<think>\nA\n</think>\n\nB", "\n\nB", reasoning="\nA\n", rparser="qwen3"),
    Case("qwen3-no-tags", None, "Just an answer.", "Just an answer.", rparser="qwen3", force=False),
    Case("qwen3-tags-not-forced", None, "\n<think>x</think>y", "y", reasoning="x", rparser="qwen3", force=False),
    Case("qwen3-later-think-is-text", None, "a <think>x</think>", "a <think>x</think>", rparser="qwen3", force=False),
    Case("qwen3-tool-after", "qwen25", "<think>\nweather?\n</think>\n\n" + QWEN25_ONE, calls=[W(city="Paris", days=3)],
         reasoning="\nweather?\n", rparser="qwen3"),
    Case("qwen3-tool-inside", "qwen25", "<think>\nweather?\n" + QWEN25_ONE, calls=[W(city="Paris", days=3)],
         reasoning="\nweather?\n", rparser="qwen3"),
    Case("qwen3-bare-json-after", "qwen25", "<think>hm</think>\n\n" + '{"name": "get_weather", "arguments": {"city": "X"}}',
         calls=[W(city="X")], reasoning="hm", rparser="qwen3"),
    Case("qwen3-thinking", None, "deep thought</think>ok", "ok", reasoning="deep thought", rparser="qwen3-thinking"),
    Case("glm45-tool-after", "glm45", "Check weather.</think>" + glm("get_weather", [("city", "Paris")]),
         calls=[W(city="Paris")], reasoning="Check weather.", rparser="glm45"),
    Case("glm45-tool-inside", "glm47", "Check weather." + glm("get_weather", [("city", "Paris")]),
         calls=[W(city="Paris")], reasoning="Check weather.", rparser="glm45"),
    Case("glm45-implicit-end", None, "hmm<tool_call>x</tool_call>", "<tool_call>x</tool_call>",
         reasoning="hmm", rparser="glm45"),
    Case("glm45-thinking-off", None, "Hello", "Hello", rparser="glm45", force=False),
    Case("minimax-append", None, "Reasoning here\n</think>\n\nHi!", "<think>Reasoning here\n</think>\n\nHi!",
         rparser="minimax-append-think"),
    Case("minimax-append-tool", "minimax-m2", "Why\n</think>\n\n" + MINIMAX_ONE, "<think>Why\n</think>",
         [W(city="Paris", days=3)], rparser="minimax-append-think"),
    Case("minimax-split", "minimax-m2", "Why\n</think>\n\n" + MINIMAX_ONE, calls=[W(city="Paris", days=3)],
         reasoning="Why\n", rparser="minimax"),
    Case("kimi-think", None, "◁think▷abc◁/think▷def", "def", reasoning="abc", rparser="kimi"),
    Case("kimi-k2-tools", "kimi_k2", "<think>plan</think>" + KIMI_TWO, calls=[W(city="Paris"), W(city="London")],
         reasoning="plan", rparser="kimi_k2"),
    Case("kimi-k2-tools-inside", "kimi_k2", "plan" + KIMI_TWO, calls=[W(city="Paris"), W(city="London")],
         reasoning="plan", rparser="kimi_k2"),
    Case("dsv3-reasoning", "deepseekv3", "<think>hmm</think>" + DSV3_TWO, calls=[W(city="Tokyo"), W(city="Paris")],
         reasoning="hmm", rparser="deepseek-r1"),
    Case("plain", None, "Hello, world! 👋", "Hello, world! 👋"),
    # ---------------- odd corners
    Case("q3c-null-prefix", "qwen3_coder", q3c("get_weather", [("city", "nullable")]) + q3c("get_weather", [("city", "Nu")]),
         calls=[W(city="nullable"), W(city="Nu")]),
    Case("q3c-empty-value", "qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\n</parameter>\n"
                                          "</function>\n</tool_call>", calls=[W(city="")]),
    Case("q3c-two-functions-one-block", "qwen3_coder",
         "<tool_call>\n" + q3c("get_weather", [("city", "A")], wrap=False) + "\n"
         + q3c("nope", [("x", "1")], wrap=False) + "\n" + q3c("get_weather", [("city", "B")], wrap=False) + "\n</tool_call>",
         calls=[W(city="A"), W(city="B")]),
    Case("mm-whitespace-kept", "minimax-m2", mm([("get_weather", [("city", "\n\n  x \n")])]), calls=[W(city="  x ")]),
    Case("step3-blank", "step3", st3([("get_weather", [("city", "   ")])]), calls=[W(city="")]),
    Case("glm-empty", "glm47", glm("get_weather", [("city", "")]), calls=[W(city="")]),
    Case("q25-junk-after-call", "hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "A"}} junk</tool_call>ok',
         "ok", [W(city="A")]),
    Case("q25-two-objects-one-block", "hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}\n'
                                              '{"name": "nope", "arguments": {}}\n'
                                              '{"name": "get_weather", "arguments": {"city": "B"}}</tool_call>',
         calls=[W(city="A"), W(city="B")]),
    Case("q25-broken-json", "qwen25", '<tool_call>{"name": "get_weather", "arguments": {"city": "A" "x"}}</tool_call>B',
         "B", [W(city="A")]),
    Case("kimi-no-prefix", "kimi_k2", "<|tool_calls_section_begin|><|tool_call_begin|>get_weather:3"
                                      '<|tool_call_argument_begin|>{"city": "P"}<|tool_call_end|><|tool_calls_section_end|>',
         calls=[W(city="P")]),
    Case("dsv3-unknown", "deepseekv3", DSV3_TWO.replace("get_weather", "nope", 1), calls=[W(city="Paris")]),
    Case("r1-double-think", None, "<think><think>a</think>b", "b", reasoning="a", rparser="deepseek-r1"),
    Case("r1-empty", None, "", rparser="deepseek-r1"),
    Case("empty", "qwen25", ""),
]
CASE_IDS = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS)


# ---------------------------------------------------------------------------------------
# Helpers


def new_parser(case: Case) -> OutputParser:
    return make_output_parser(case.rparser, case.tool, case.tools, force_reasoning=case.force)


def summary(content: str, reasoning: str, calls: list[ToolCall]):
    return content, reasoning, [(c.name, json.loads(c.arguments)) for c in calls]


def run_stream(case: Case, chunks: list[str]):
    """Feed the chunks; check the delta protocol; return (content, reasoning, calls)."""
    p = new_parser(case)
    content, reasoning, deltas = [], [], []
    for ch in chunks + [None]:
        d = p.feed(ch) if ch is not None else p.finish()
        assert isinstance(d, ParsedDelta)
        content.append(d.content)
        reasoning.append(d.reasoning)
        deltas.extend(d.tool_calls)
    streamed: dict[int, list] = {}
    for d in deltas:
        assert isinstance(d, ToolCallDelta)
        if d.index not in streamed:
            assert d.index == len(streamed), "indexes must be 0, 1, ... in order"
            assert d.name is not None and d.id is not None, "the first delta of a call carries name and id"
            streamed[d.index] = [d.name, d.id, d.arguments]
        else:
            assert d.name is None and d.id is None, "name/id only on the first delta"
            assert d.index == len(streamed) - 1, "calls are streamed one after the other"
            streamed[d.index][2] += d.arguments
    calls = p.tool_calls
    assert [[c.name, c.id, c.arguments] for c in calls] == [streamed[i] for i in range(len(streamed))]
    for c in calls:
        assert isinstance(json.loads(c.arguments), dict)
    assert "".join(content) == p.content and "".join(reasoning) == p.reasoning
    return p.content, p.reasoning, calls


def split(text: str, cuts) -> list[str]:
    cuts = sorted(set(cuts))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


# ---------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_example_one_shot(case: Case):
    content, reasoning, calls = new_parser(case).parse_full(case.text)
    assert (content, reasoning) == (case.content, case.reasoning)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [(n, a) for n, a in case.calls]
    for c in calls:  # arguments are serialised like SGLang: json.dumps(..., ensure_ascii=False)
        assert c.arguments == json.dumps(json.loads(c.arguments), ensure_ascii=False)
        if case.tool == "kimi_k2":
            assert re.fullmatch(r"functions\.get_weather:\d+", c.id)
        else:
            assert re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_example_char_by_char(case: Case):
    ref = summary(*new_parser(case).parse_full(case.text))
    assert summary(*run_stream(case, list(case.text))) == ref


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_chunking_gives_the_one_shot_result(case: Case, data):
    n = len(case.text)
    cuts = data.draw(st.lists(st.integers(0, n), max_size=min(n, 24)), label="cuts")
    ref = summary(*new_parser(case).parse_full(case.text))
    assert summary(*run_stream(case, split(case.text, cuts))) == ref


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_200_random_splits_give_the_one_shot_result(case: Case):
    """The acceptance bar: 200 random chunkings per example (seeded; hypothesis above explores more)."""
    import random
    import zlib
    rng = random.Random(zlib.crc32(case.text.encode()))
    ref = summary(*new_parser(case).parse_full(case.text))
    n = len(case.text)
    for _ in range(200):
        cuts = [rng.randint(0, n) for _ in range(rng.randint(1, min(n, 24) or 1))]
        assert summary(*run_stream(case, split(case.text, cuts))) == ref


def test_kimi_ids_and_ids_unique():
    p = make_output_parser(None, "kimi_k2", TOOLS)
    _, _, calls = p.parse_full(KIMI_TWO)
    assert [c.id for c in calls] == ["functions.get_weather:0", "functions.get_weather:1"]
    p = make_output_parser(None, "qwen25", TOOLS)
    _, _, calls = p.parse_full(QWEN25_TWO)
    assert len({c.id for c in calls}) == 2


def test_qwen3_coder_streams_fragments_like_sglang():
    p = get_tool_call_parser("qwen3_coder", TOOLS)
    deltas = []
    for ch in re.split(r"(?<=\n)", QWEN3_CODER_ONE):  # line by line
        deltas += p.feed(ch).tool_calls
    deltas += p.finish().tool_calls
    assert deltas[0].name == "get_weather" and deltas[0].arguments == ""
    assert "".join(d.arguments for d in deltas) == '{"city": "Paris", "days": 3}'


def test_string_values_stream_before_the_value_is_complete():
    p = get_tool_call_parser("qwen3_coder", TOOLS)
    out = p.feed("<tool_call>\n<function=write_file>\n<parameter=content>\nhello wor")
    assert "".join(d.arguments for d in out.tool_calls) == '{"content": "hello wor'
    out = p.feed("ld\n</parameter>\n</function>\n</tool_call>")
    p.finish()
    assert p.tool_calls[0].arguments == '{"content": "hello world"}'


def test_ordinary_text_streams_immediately():
    for tool in TOOL_CALL_PARSERS:
        p = get_tool_call_parser(tool, TOOLS)
        assert p.feed("Hello world.").content == "Hello world.", tool
    p = get_tool_call_parser("qwen3_coder", TOOLS)
    assert p.feed("a <tool_").content == "a"  # " <tool_" may start a tag: held
    assert p.feed("x> b").content == " <tool_x> b"


def test_qwen25_holds_json_until_decided():
    p = get_tool_call_parser("qwen25", TOOLS)
    d = p.feed('{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert d.content == "" and d.tool_calls == []
    d = p.finish()
    assert d.content == "" and [t.name for t in d.tool_calls if t.name] == ["get_weather"]
    # released as soon as it cannot be a call
    p = get_tool_call_parser("qwen25", TOOLS)
    assert p.feed('{"name": "nope", "arguments": {}} and more').content.startswith('{"name": "nope"')
    p = get_tool_call_parser("qwen25", TOOLS)
    assert p.feed("```python\nprint(1)").content == "```python\nprint(1)"


def test_reasoning_think_split_across_chunks():
    p = get_reasoning_parser("qwen3", force_reasoning=False)
    out = [p.feed(x) for x in ["<th", "ink>abc</th", "ink>de", "f"]] + [p.finish()]
    assert "".join(o.reasoning for o in out) == "abc"
    assert "".join(o.content for o in out) == "def"
    assert out[0] == ParsedDelta("", "", [])  # "<th" could still be "<think>"


def test_reasoning_force_and_unterminated():
    assert get_reasoning_parser("qwen3", force_reasoning=True).parse_full("no tags") == ("no tags", "")
    assert get_reasoning_parser("qwen3", force_reasoning=False).parse_full("no tags") == ("", "no tags")
    assert get_reasoning_parser("deepseek-r1").parse_full("<think>cut off") == ("cut off", "")
    assert get_reasoning_parser("kimi").parse_full("◁think▷cut off") == ("cut off", "")
    # reasoning streams as it arrives, content after the end tag
    p = get_reasoning_parser("step3p5")
    assert p.feed("Let me ").reasoning == "Let me "
    d = p.feed("think.</think>Yes")
    assert (d.reasoning, d.content) == ("think.", "Yes")


def test_reasoning_without_tool_parser_keeps_tool_text():
    out = parse_full("think<tool_call>\n{}\n</tool_call>", reasoning="qwen3")
    assert out == ("<tool_call>\n{}\n</tool_call>", "think", [])


def test_registry_and_errors():
    for name in ["qwen25", "qwen", "hermes", "qwen3_coder", "step3p5", "step3", "glm45", "glm", "glm47",
                 "minimax-m2", "llama3", "deepseekv3", "kimi_k2", "pythonic", "gpt-oss"]:
        assert get_tool_call_parser(name, TOOLS).feed("hi").content == "hi"
    for name in ["deepseek-r1", "step3p5", "step3", "qwen3", "qwen3-thinking", "glm45", "minimax",
                 "minimax-append-think", "kimi", "kimi_k2", "deepseek-v3", "gpt-oss"]:
        assert name in REASONING_PARSERS
        get_reasoning_parser(name, force_reasoning=False)
    with pytest.raises(ValueError, match="qwen3_coder"):
        get_tool_call_parser("nope", TOOLS)
    with pytest.raises(ValueError, match="deepseek-r1"):
        get_reasoning_parser("nope")


def test_feed_after_finish_raises():
    p = OutputParser(get_reasoning_parser("qwen3"), get_tool_call_parser("qwen25", TOOLS))
    p.feed("x")
    p.finish()
    with pytest.raises(RuntimeError):
        p.feed("y")


def test_openai_shapes():
    d = ToolCallDelta(0, "call_x", "f", "")
    assert d.to_openai() == {"index": 0, "id": "call_x", "type": "function", "function": {"name": "f", "arguments": ""}}
    assert ToolCall("call_x", "f", "{}").to_openai()["function"] == {"name": "f", "arguments": "{}"}


def test_pydantic_like_and_bare_tool_shapes():
    bare = [{"name": "get_weather", "parameters": WEATHER["function"]["parameters"]}]
    _, _, calls = parse_full(GLM47_ONE, tool="glm47", tools=bare)
    assert json.loads(calls[0].arguments) == {"city": "Paris", "days": 3}


def test_parse_full_needs_a_fresh_parser():
    p = make_output_parser(None, "qwen25", TOOLS)
    p.feed("x")
    with pytest.raises(RuntimeError):
        p.parse_full("y")


@pytest.mark.parametrize("tool,text", [
    ("qwen3_coder", q3c("write_file", [("content", "x" * 60000)])),
    ("qwen25", q25("write_file", {"content": "é" * 60000})),
    ("glm47", glm("write_file", [("content", "x" * 60000)])),
    ("qwen25", '{"name": "write_file", "arguments": {"content": "' + "x" * 60000 + '"}}'),  # held until finish
])
def test_long_outputs_stream_in_linear_time(tool, text):
    import time
    case = Case("long", tool, text)
    t0 = time.perf_counter()
    _, _, calls = run_stream(case, [text[i:i + 3] for i in range(0, len(text), 3)])
    assert len(json.loads(calls[0].arguments)["content"]) == 60000
    assert time.perf_counter() - t0 < 5  # ~0.2 s; quadratic behaviour would take minutes
