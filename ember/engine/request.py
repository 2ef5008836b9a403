"""One request's state inside the engine."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ember.engine.detokenizer import IncrementalDetokenizer
from ember.engine.sampling_params import SamplingParams


class OutputTokens:
    """What a request's output is, read off token_ids (prompt then output) and prompt_ids."""
    __slots__ = ()
    token_ids: list[int]
    prompt_ids: list[int]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]


@dataclass(eq=False)  # a request is itself: `in` / remove / index on the scheduler's lists compare identity (the
class Req(OutputTokens):  # generated field-by-field __eq__ made them cost ~2 ms a step at 64 running requests)
    rid: str
    prompt_ids: list[int]
    sampling: SamplingParams
    detok: IncrementalDetokenizer | None = None
    return_prompt_logprobs: bool = False
    token_ids: list[int] = field(init=False)  # prompt + output so far
    kv_len: int = 0  # leading tokens whose KV is in the cache
    page_tables: dict[str, list[int]] = field(default_factory=dict)  # group -> page ids (0 = released)
    prefix_nodes: list = field(default_factory=list)  # locked radix nodes shared with the prefix cache
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache (first admission)
    finished: bool = False
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    num_preemptions: int = 0
    arrival: float = field(default_factory=time.monotonic)
    queue_time: float | None = None  # seconds from arrival to its first forward (the /metrics histogram)
    # outputs produced since the last report
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    grammar: object | None = None  # structured-output matcher, when the request has one
    error: str | None = None
    forced_ids: list[int] = field(default_factory=list)  # tokens to emit next regardless of sampling
    thinking_closed: bool = False
    mm: object = None  # ember.multimodal.inputs.MultimodalInputs; token_ids then hold its keyed placeholder ids

    def __post_init__(self):
        self.token_ids = list(self.prompt_ids)


    @property
    def extend_len(self) -> int:
        """Tokens still to be run through the model before the next sample."""
        return len(self.token_ids) - self.kv_len
