"""Reasoning effort for chat requests: the template switches, the state of the reasoning parser and the
thinking budget the engine enforces.

Request fields, the first one given wins:
  `reasoning: {effort | enabled: false | max_tokens | exclude}` (seed 002, OpenRouter),
  `reasoning_effort` (OpenAI), `output_config: {effort}` (Anthropic; `max` = xhigh).
Levels (seed 002): the thinking budget is a share of the request's max_tokens (the resolved one when
the request gave none) -- xhigh 95%, high 80%, medium 50%, low 20%, minimal 10% -- and `none` turns
thinking off. `reasoning.max_tokens` gives the budget in tokens.

How a level is applied (only with --reasoning-parser, which names the end tag, e.g. `</think>`,
kimi's `◁/think▷`; gpt-oss is left to its template, which reads `reasoning_effort`):
- The chat template gets `reasoning_effort` (low/medium/high: xhigh -> high, minimal -> low) unless the
  request set it in chat_template_kwargs.
- Budget levels: when the output starts inside a thinking block (the prompt ends with an open start
  tag, or the parser assumes it, e.g. deepseek-r1 / qwen3 by default), the engine writes the end tag
  itself once the budget is spent, so an answer follows. Not when thinking is off for the request,
  nor under constrained decoding (tool_choice required / named, response_format): the grammar
  applies from the first token, so there is no thinking block to bound.
- `none`: the template gets `enable_thinking=False` and `thinking=False` (Qwen3, GLM, DeepSeek-V3,
  Kimi switches; explicit chat_template_kwargs win). If the rendered prompt still ends inside an open
  thinking block (a template that always opens it, like Step-3.5's), the block is closed in the
  prompt (end tag + blank line, as Qwen3's template does for enable_thinking=False): a thinking
  budget of zero, without a single thinking token. The parser then expects no reasoning
  (force_reasoning=False); minimax-append-think adds nothing to the content.
  A model that opens a thinking block on its own despite that still gets it split out.
"""
from __future__ import annotations

from dataclasses import dataclass

from ember.api.errors import APIError

EFFORT_SHARE = {"xhigh": 0.95, "high": 0.80, "medium": 0.50, "low": 0.20, "minimal": 0.10}
EFFORTS = (*EFFORT_SHARE, "none")
ANTHROPIC_EFFORTS = {"max": "xhigh", "xhigh": "xhigh", "high": "high", "medium": "medium", "low": "low",
                     "minimal": "minimal", "none": "none"}
TEMPLATE_EFFORT = {"xhigh": "high", "high": "high", "medium": "medium", "low": "low", "minimal": "low"}
# reasoning parsers whose format has no single end tag to force (harmony channels)
NO_BUDGET_PARSERS = {"gpt-oss"}


@dataclass
class ReasoningRequest:
    effort: str | None = None  # a key of EFFORT_SHARE, "none", or None (the model's default)
    budget: int | None = None  # reasoning.max_tokens
    exclude: bool = False  # reasoning.exclude: think, but leave the reasoning out of the response


def _effort(value, param: str, allowed=EFFORTS) -> str:
    if not isinstance(value, str) or value.lower() not in allowed:
        raise APIError(f"{param} must be one of {', '.join(allowed)}; got {value!r}", 400, param)
    value = value.lower()
    return ANTHROPIC_EFFORTS.get(value, value)


def parse_reasoning_request(req) -> ReasoningRequest:
    """The reasoning options of a ChatCompletionRequest; 400 naming the field for a bad value."""
    out = ReasoningRequest()
    r = req.reasoning
    if r is not None:
        out.exclude = bool(r.exclude)
        if r.max_tokens is not None:
            if r.max_tokens < 0:
                raise APIError(f"reasoning.max_tokens must be >= 0, got {r.max_tokens}", 400, "reasoning.max_tokens")
            out.budget = r.max_tokens
        if r.effort is not None:
            out.effort = _effort(r.effort, "reasoning.effort")
        elif r.enabled is False:
            out.effort = "none"
        if out.effort is not None or out.budget is not None:
            if out.effort == "none":
                out.budget = None
            return out
    if req.reasoning_effort is not None:
        out.effort = _effort(req.reasoning_effort, "reasoning_effort")
    elif req.output_config is not None and req.output_config.effort is not None:
        out.effort = _effort(req.output_config.effort, "output_config.effort", tuple(ANTHROPIC_EFFORTS))
    return out


def template_switches(rr: ReasoningRequest, template_kwargs: dict) -> dict:
    """The chat template kwargs with the effort's switches added (explicit ones are kept)."""
    kw = dict(template_kwargs)
    if rr.effort == "none":
        kw.setdefault("enable_thinking", False)
        kw.setdefault("thinking", False)
    elif rr.effort in TEMPLATE_EFFORT:
        kw.setdefault("reasoning_effort", TEMPLATE_EFFORT[rr.effort])
    return kw


def prompt_opens_thinking(prompt: str, start: str, end: str) -> bool:
    """Whether the prompt ends inside a thinking block the template opened (`...<think>\\n`)."""
    i = prompt.rfind(start)
    return i >= 0 and not prompt[i + len(start):].strip() and end not in prompt[i:]


@dataclass
class ReasoningPlan:
    prompt_suffix: str = ""  # appended to the rendered prompt (closes a thinking block for `none`)
    force_reasoning: bool | None = None  # for the reasoning parser (None: its default)
    use_parser: bool = True  # False: no reasoning parser for this request
    thinking: bool = False  # the output starts inside a thinking block
    think_end: str | None = None  # the end tag the engine forces when the budget is spent


def plan_reasoning(rr: ReasoningRequest, parser_name: str | None, prompt: str, template_kwargs: dict) -> ReasoningPlan:
    """What the request's reasoning options mean for this prompt and this server's reasoning parser."""
    plan = ReasoningPlan()
    if not parser_name:
        return plan
    from ember.parsers import REASONING_PARSERS
    cls = REASONING_PARSERS.get(parser_name)
    if cls is None:
        return plan
    enable, thinking = template_kwargs.get("enable_thinking"), template_kwargs.get("thinking")
    if enable is False or thinking is False:
        plan.force_reasoning = False
    elif parser_name == "deepseek-v3" and (thinking is True or enable is True):
        plan.force_reasoning = True
    if parser_name in NO_BUDGET_PARSERS:
        return plan
    start, end = cls.start_token, cls.end_token
    opens = prompt_opens_thinking(prompt, start, end)
    if rr.effort == "none":
        if opens:
            plan.prompt_suffix = end + "\n\n"
        plan.force_reasoning = False
        if parser_name == "minimax-append-think":
            plan.use_parser = False
        return plan
    if opens and plan.force_reasoning is not False:
        plan.force_reasoning = True
    force = cls.default_force if plan.force_reasoning is None else plan.force_reasoning
    plan.thinking = opens or force
    plan.think_end = end
    return plan


def thinking_budget(rr: ReasoningRequest, plan: ReasoningPlan, max_new_tokens: int) -> int | None:
    """Output tokens of thinking allowed before the engine closes the block (None: no limit)."""
    if not plan.thinking or plan.think_end is None:
        return None
    if rr.budget is not None:
        return min(rr.budget, max_new_tokens)
    share = EFFORT_SHARE.get(rr.effort or "")
    if share is None:
        return None
    return int(max_new_tokens * share)
