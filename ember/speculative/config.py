"""The speculative flags resolved with SGLang's defaults and constraints (one place for every check)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger("ember.speculative")
ALGORITHMS = ("EAGLE", "EAGLE3", "NEXTN", "STANDALONE", "NGRAM")


@dataclass(frozen=True)
class SpecConfig:
    algorithm: str  # EAGLE (NEXTN is an alias, as in SGLang), STANDALONE or NGRAM
    num_steps: int  # draft steps per verify (drafts proposed per request: num_draft_tokens - 1)
    topk: int  # 1: chains; > 1: trees (tree.py), for NGRAM the breadth of its match tree
    num_draft_tokens: int  # tokens per request in the verify forward: the last real token + the drafts
    draft_model_path: str | None = None
    multi_layer: bool = False  # EAGLE on MTP layers: step i runs layer i (else layer 0 for every step)
    ngram_min_window: int = 1
    ngram_max_window: int = 12
    draft_min_confidence: float = 0.0  # STANDALONE chains: a draft step whose top probability is below it is the last
    token_map: str | None = None  # STANDALONE: the file of token ids the draft's lm_head is cut to
    disable_by_batch_size: int | None = None  # a step with this many decoding requests or more runs without drafts

    @property
    def max_drafts(self) -> int:
        return self.num_draft_tokens - 1


def resolve(args) -> tuple[SpecConfig | None, list[str]]:
    """(config or None when speculation is off, errors)."""
    algo = args.speculative_algorithm
    if algo is None:
        given = [n for n in ("speculative_draft_model_path", "speculative_num_steps", "speculative_eagle_topk",
                             "speculative_num_draft_tokens", "speculative_token_map", "speculative_disable_by_batch_size")
                 if getattr(args, n) is not None]
        given += ["enable_multi_layer_eagle"] if args.enable_multi_layer_eagle else []
        return None, [f"--{n.replace('_', '-')} needs --speculative-algorithm" for n in given]
    algo = algo.upper()
    errors = []
    if algo not in ALGORITHMS:
        return None, [f"--speculative-algorithm must be one of {', '.join(ALGORITHMS)}, got {args.speculative_algorithm!r}"]
    if algo == "NEXTN":
        algo = "EAGLE"  # SGLang: NEXTN is EAGLE on the model's own MTP (nextn) layers
    if algo == "EAGLE3" or (algo == "EAGLE" and args.speculative_draft_model_path):
        errors.append("EAGLE draft heads from --speculative-draft-model-path are not implemented yet: use EAGLE/NEXTN "
                      "without a draft path (the model's own MTP layers), STANDALONE or NGRAM")
    if algo == "STANDALONE" and not args.speculative_draft_model_path:
        errors.append("--speculative-algorithm STANDALONE needs --speculative-draft-model-path")
    if algo == "NGRAM" and args.speculative_draft_model_path:
        errors.append("--speculative-algorithm NGRAM takes no --speculative-draft-model-path")
    steps, topk, ndraft = args.speculative_num_steps, args.speculative_eagle_topk, args.speculative_num_draft_tokens
    if algo == "NGRAM":
        # n-gram drafts are cut from the request's own tokens: one chain, or with --speculative-ngram-max-bfs-breadth
        # > 1 a tree merged from several matches (SGLang's knob; --speculative-eagle-topk does not apply)
        ndraft = ndraft if ndraft is not None else 8
        steps, topk = ndraft - 1, args.speculative_ngram_max_bfs_breadth
    else:
        # SGLang's automatic choice when nothing is given: 3 steps, a chain, 4 tokens per verify
        steps = steps if steps is not None else 3
        topk = topk if topk is not None else 1
        if topk == 1:
            ndraft = steps + 1  # SGLang: with topk 1 the draft token count follows num_steps
        elif ndraft is None:
            ndraft = steps * topk + 1
    if steps < 1:
        errors.append(f"--speculative-num-steps must be >= 1, got {steps}")
    if topk < 1:
        flag = "--speculative-ngram-max-bfs-breadth" if algo == "NGRAM" else "--speculative-eagle-topk"
        errors.append(f"{flag} must be >= 1, got {topk}")
    if ndraft is not None and ndraft < 2:
        errors.append(f"--speculative-num-draft-tokens must be >= 2, got {ndraft}")
    elif topk > 1 and algo != "NGRAM" and steps >= 1 and ndraft - 1 > topk + (steps - 1) * topk * topk:
        # the tree takes its nodes among the candidates: topk children of the root, then topk * topk per later step
        errors.append(f"--speculative-num-draft-tokens {ndraft} exceeds the tree's candidates plus the root "
                      f"({topk + (steps - 1) * topk * topk + 1} with {steps} steps and topk {topk})")
    lo, hi = args.speculative_ngram_min_match_window_size, args.speculative_ngram_max_match_window_size
    conf = args.speculative_draft_min_confidence
    if not 0.0 <= conf < 1.0:
        errors.append(f"--speculative-draft-min-confidence must be in [0, 1), got {conf}")
    if args.speculative_token_map is not None:
        import os
        if algo != "STANDALONE":
            errors.append("--speculative-token-map cuts a draft model's lm_head: it needs --speculative-algorithm "
                          "STANDALONE")
        elif not os.path.isfile(args.speculative_token_map):
            errors.append(f"--speculative-token-map {args.speculative_token_map!r}: no such file")
    off_at = args.speculative_disable_by_batch_size
    if off_at is not None and off_at < 1:
        errors.append(f"--speculative-disable-by-batch-size must be >= 1, got {off_at}")
    if not 1 <= lo <= hi:
        errors.append(f"--speculative-ngram-min/max-match-window-size need 1 <= min <= max, got {lo}, {hi}")
    if errors:
        return None, errors
    return SpecConfig(algo, steps, topk, ndraft, args.speculative_draft_model_path,
                      bool(args.enable_multi_layer_eagle), lo, hi, conf, args.speculative_token_map, off_at), []
