"""Per-request sampling parameters: parsed once, used by every route and by the engine."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) disables
    min_p: float = 0.0
    top_a: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_new_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    # logprobs: number of top alternatives to return per output token (None = no logprobs)
    logprobs: int | None = None
    # reasoning budget: after this many output tokens an unfinished thinking block is closed by forcing
    # `think_end` (e.g. "</think>"), so an answer follows (reasoning effort; None = no budget)
    thinking_budget: int | None = None
    think_end: str = "</think>"
    # structured output (compiled by the engine's grammar backend)
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.top_k is None or self.top_k <= 0:
            self.top_k = -1
        if self.seed is not None and not -2**63 <= self.seed < 2**63:
            self.seed %= 2**63  # any integer is a seed; the sampler hashes it as a 64-bit tensor

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5

    @property
    def penalized(self) -> bool:
        """Whether any of the frequency, presence or repetition penalties applies."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the field when a value is out of range."""
        def bad(name, why):
            raise ValueError(f"{name} {why}")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            bad("max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", f"must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not 0.0 <= self.top_a <= 1.0:
            bad("top_a", f"must be in [0, 1], got {self.top_a}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        if self.min_new_tokens < 0:
            bad("min_tokens", f"must be >= 0, got {self.min_new_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("top_logprobs", f"must be in [0, 20], got {self.logprobs}")
        if vocab_size is not None:
            for tok in list(self.logit_bias) + list(self.stop_token_ids):
                if not 0 <= tok < vocab_size:
                    bad("logit_bias/stop_token_ids", f"token id {tok} is outside the vocabulary (size {vocab_size})")
            for tok, b in self.logit_bias.items():
                if not -100.0 <= b <= 100.0:
                    bad("logit_bias", f"values must be in [-100, 100], got {b} for token {tok}")


# Fields a model's generation_config.json may set as its recommended sampling.
MODEL_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def model_sampling_defaults(model_dir: str | Path) -> dict:
    """The sampling values the model's generation_config.json recommends (empty when it has none)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        gen = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: gen[k] for k in MODEL_DEFAULT_FIELDS if isinstance(gen.get(k), (int, float))}
