"""The target's forward for drafting on its MTP layers (EAGLE / NEXTN, mtp.py): logits as ModelRunner.forward gives
them, and the last pre-norm hidden states at every token, which the MTP layers read. (Imported by model_runner.py:
it must not import the runner back.)"""
from __future__ import annotations

import torch

from ember.engine.logit_rows import logit_rows, split_rows
from ember.models.residual import run_layers


def target_hidden(model, batch) -> torch.Tensor:
    """The target's last pre-norm hidden state at every token of the batch [T, H] (model.model.forward, unnormed)."""
    inner = model.model
    return run_layers(inner.layers, batch.positions, inner.embed_tokens(batch.input_ids), batch)


def forward_with_hidden(runner, reqs, lens, full_rows):
    """ModelRunner.forward_hidden: the target on the torch path, keeping its last hidden states for the drafter."""
    batch = runner.build_batch(reqs, lens)
    model = runner.model
    with torch.inference_mode():
        hidden = target_hidden(model, batch)
        index, spans = logit_rows(lens, full_rows)
        rows = hidden.index_select(0, torch.tensor(index, device=hidden.device))
        logits = model.compute_logits(model.model.norm(rows))
    return (*split_rows(logits, spans, full_rows), hidden)
