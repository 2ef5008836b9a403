"""Small typed messages between the API process and the engine process (sent over ZMQ with pickle).

The API process never touches tensors; the engine never parses user JSON.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ember.engine.sampling_params import SamplingParams


@dataclass
class GenerateReq:
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    # return logprobs of the prompt tokens too (completions echo)
    return_prompt_logprobs: bool = False
    # images/video: ember.multimodal.inputs.MultimodalInputs (placeholder spans, processed pixels, M-RoPE)
    mm: object = None


@dataclass
class AbortReq:
    rid: str


@dataclass
class ControlReq:
    """flush_cache | get_stats | health; answered by a ControlOut with the same id."""
    kind: str
    cid: str = ""


@dataclass
class ControlOut:
    cid: str
    ok: bool
    data: dict = field(default_factory=dict)


@dataclass
class TokenOut:
    """What the engine reports for one request after a step: the new tokens and text since the last report."""
    rid: str
    new_token_ids: list[int]
    text_delta: str  # detokenized, stop strings removed, held back while a stop string may be forming
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None
    matched_stop: int | str | None = None  # the stop token id or stop string that ended it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # per new token: (logprob of the chosen token, [(token_id, logprob), ...top-k])
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    prompt_logprobs: list[float | None] | None = None
    error: str | None = None
    queue_time: float | None = None  # seconds the request waited before its first forward
    spec_verify_ct: int = 0  # speculative decoding: verify forwards so far, and the tokens they produced
    spec_verified_tokens: int = 0
