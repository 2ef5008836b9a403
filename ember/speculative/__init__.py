"""Speculative decoding: drafts (NGRAM, a STANDALONE draft model, EAGLE/NEXTN on the model's MTP layers) verified
in one target forward per step (chains, or with topk > 1 trees under a tree attention mask: tree.py); see worker.py
for the step and verify.py for why acceptance is lossless."""
from __future__ import annotations


def make_spec_worker(core, args):
    """The speculative step for EngineCore, or None when --speculative-algorithm is not given."""
    from ember.speculative.config import resolve
    cfg, errors = resolve(args)
    if errors:
        raise ValueError("; ".join(errors))
    if cfg is None:
        return None
    from ember.speculative.worker import SpecWorker
    return SpecWorker(core, cfg)
