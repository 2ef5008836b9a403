"""Reasoning parsers: split ``<think>...</think>`` from the answer.

``force_reasoning=None`` means the default SGLang's server uses for a request without
``chat_template_kwargs`` (``default_force`` below). The serving layer should pass
``force_reasoning=False`` when the template was told not to think
(``enable_thinking=False`` for qwen3 / glm45, ``thinking=False`` for kimi_k2) and
``force_reasoning=True`` for deepseek-v3 with ``thinking=True``.
"""

from __future__ import annotations

from ember.parsers.base import ReasoningParser


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1, Step-3, Step-3.5: the template opens the block, so everything up to
    ``</think>`` is reasoning (a leading ``<think>`` is dropped)."""

    name = "deepseek-r1"
    default_force = True


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3: ``<think>...</think>``; ``<tool_call>`` also ends the reasoning."""

    name = "qwen3"
    default_force = True  # enable_thinking is on unless the request turns it off
    tool_start_tokens = ("<tool_call>",)


class Qwen3ThinkingReasoningParser(Qwen3ReasoningParser):
    """Qwen3 thinking-only models (the template opens ``<think>``)."""

    name = "qwen3-thinking"
    default_force = True


class Glm45ReasoningParser(Qwen3ReasoningParser):
    """GLM-4.5 / 4.6 / 4.7: the template opens ``<think>`` unless thinking is disabled;
    ``<tool_call>`` also ends the reasoning."""

    name = "glm45"


class MinimaxReasoningParser(Qwen3ReasoningParser):
    """MiniMax-M2 with the reasoning split off (the template opens ``<think>``)."""

    name = "minimax"
    default_force = True


class DeepSeekV3ReasoningParser(Qwen3ReasoningParser):
    """DeepSeek-V3.1+ hybrid thinking: reasoning only when the request asked for it."""

    name = "deepseek-v3"
    default_force = False
    tool_start_tokens = ()


class KimiReasoningParser(ReasoningParser):
    """Kimi (thinking preview): ``◁think▷...◁/think▷``."""

    name = "kimi"
    start_token = "◁think▷"
    end_token = "◁/think▷"
    default_force = False


class KimiK2ReasoningParser(ReasoningParser):
    """Kimi-K2 thinking: ``<think>...</think>``; the tool-call section also ends it."""

    name = "kimi_k2"
    default_force = True  # thinking unless the request says thinking=False
    tool_start_tokens = ("<|tool_calls_section_begin|>",)


class MinimaxAppendThinkReasoningParser(ReasoningParser):
    """MiniMax-M2 ``minimax-append-think``: nothing is split off; the ``<think>`` the
    template put in the prompt is prepended to the content (MiniMax wants the thinking sent
    back in the history)."""

    name = "minimax-append-think"

    def _run(self):
        self._emit_content("<think>")
        yield from self._until((), self._emit_content)
