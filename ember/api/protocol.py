"""Pydantic models of the request bodies (OpenAI and SGLang-native). Unknown fields are ignored;
known fields with the wrong type fail validation (answered with 400)."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(_Lenient):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema", "structural_tag", "regex", "ebnf"] = "text"
    json_schema: dict | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    regex: str | None = None
    ebnf: str | None = None


class _SamplingFields(_Lenient):
    """Sampling fields shared by /v1/completions and /v1/chat/completions. The ranges are seed 002's
    (e.g. temperature 0.0 to 2.0): a value outside gets 400 naming the field. repetition_penalty 0 and
    top_p 0 pass here; SamplingParams.validate rejects the penalty (it divides by it), and top_p 0 means
    the most likely token only (build_sampling)."""
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # 0: off (seed 002's default)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_a: float | None = Field(default=None, ge=0.0, le=1.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, ge=0.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1
    best_of: int | None = None
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # SGLang extras for constrained decoding
    json_schema: str | dict | None = None
    regex: str | None = None
    ebnf: str | None = None
    rid: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None


class FunctionCall(_Lenient):
    name: str | None = None
    arguments: str | dict | None = None


class ToolCallIn(_Lenient):
    id: str | None = None
    type: str | None = "function"
    function: FunctionCall
    index: int | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Union[str, dict[str, Any]]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Lenient):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoiceFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


class ReasoningOptions(_Lenient):
    """`reasoning` (OpenRouter / seed 002): effort level, or an explicit thinking budget in tokens."""
    effort: str | None = None
    max_tokens: int | None = None
    enabled: bool | None = None
    exclude: bool | None = None


class OutputConfig(_Lenient):
    """Anthropic-style `output_config` (only `effort` is read)."""
    effort: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)  # seed 002: >= 1
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    structured_outputs: bool | None = None  # seed 002: a capability flag; response_format does the work
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = True
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    reasoning: ReasoningOptions | None = None
    output_config: OutputConfig | None = None
    separate_reasoning: bool = True
    stream_reasoning: bool = True
    # seed 002: accepted and validated; a hint to the model's own style, nothing for the engine to do
    verbosity: Literal["low", "medium", "high"] | None = None
    continue_final_message: bool = False
    add_generation_prompt: bool = True


class NativeSamplingParams(_Lenient):
    """SGLang's `sampling_params` for /generate."""
    max_new_tokens: int | None = 128
    min_new_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    top_a: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    n: int = 1
    seed: int | None = None
    sampling_seed: int | None = None
    json_schema: str | dict | None = None
    regex: str | None = None
    ebnf: str | None = None


class GenerateRequest(_Lenient):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: NativeSamplingParams | list[NativeSamplingParams] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    return_text_in_logprobs: bool = False
    rid: str | list[str] | None = None


class SeparateReasoningRequest(_Lenient):
    """POST /separate_reasoning (SGLang): split a finished output into reasoning and text."""
    text: str
    reasoning_parser: str | None = None  # default: the server's --reasoning-parser
    force_reasoning: bool | None = None  # default: what the chat route assumes without chat_template_kwargs


class ParseFunctionCallRequest(_Lenient):
    """POST /parse_function_call (SGLang): find the tool calls in a finished output."""
    text: str
    tool_call_parser: str | None = None  # default: the server's --tool-call-parser (or the model's)
    tools: list[Tool] = Field(default_factory=list)


class AbortRequest(_Lenient):
    rid: str = ""
    abort_all: bool = False
