"""The engine side of images and video: for one scheduled batch, encode the items whose placeholder tokens
it covers (once per item, all requests' items in one encoder pass), and hand the model the embedding rows
to write over those placeholders and the M-RoPE positions of every token."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BatchMultimodal:
    rows: torch.Tensor  # [R] token indices (into the batch's T tokens) to overwrite
    embeds: torch.Tensor  # [R, hidden]
    positions: torch.Tensor | None  # [3, T] M-RoPE positions, or None where batch.positions is right


def attach_multimodal(model, batch, reqs, extend_lens) -> None:
    """Sets batch.mm (and, for decode-like steps of M-RoPE requests, shifts batch.positions by the request's
    delta so that every path, the fused decode step included, sees the right position)."""
    spans = [(r, r.kv_len, r.kv_len + n) for r, n in zip(reqs, extend_lens)]
    need = []
    for r, a, b in spans:
        if r.mm is None:
            continue
        for it in r.mm.items:
            if it.offset + it.length <= a:
                it.embeds = None  # its KV is written: the embeddings are not needed again (preemption recomputes)
            elif it.embeds is None and it.offset < b:
                need.append(it)
    if need:
        for it, emb in zip(need, model.encode_items(need)):
            it.embeds = emb
    device = batch.input_ids.device
    rows, embeds, pos_rows, t0, equal = [], [], [], 0, True
    for r, a, b in spans:
        mm = r.mm
        if mm is not None:
            for it in mm.items:
                lo, hi = max(a, it.offset), min(b, it.offset + it.length)
                if lo >= hi:
                    continue
                if it.embed_index is None:
                    rows.append(torch.arange(lo - a + t0, hi - a + t0))
                    embeds.append(it.embeds[lo - it.offset:hi - it.offset])
                else:  # rows i0..i1 of its embeddings belong to the tokens of this chunk
                    idx = torch.as_tensor(it.embed_index)
                    i0, i1 = (int(torch.searchsorted(idx, v - it.offset)) for v in (lo, hi))
                    rows.append(idx[i0:i1] + it.offset - a + t0)
                    embeds.append(it.embeds[i0:i1])
        p = torch.arange(a, b)
        if mm is not None and mm.mrope_positions is not None:
            prompt = torch.as_tensor(mm.mrope_positions)
            n_prompt = prompt.shape[1]
            inside = p[p < n_prompt]
            beyond = p[p >= n_prompt] + mm.mrope_delta
            part = torch.cat([prompt[:, inside], beyond.view(1, -1).expand(3, -1)], dim=1)
            equal = equal and bool((part == part[0]).all())
        else:
            part = p.view(1, -1).expand(3, -1)
        pos_rows.append(part)
        t0 += b - a
    positions = torch.cat(pos_rows, dim=1)
    if equal:  # all rows equal (text and generated tokens): plain positions, shifted by the deltas
        batch.positions = positions[0].to(device)
        positions = None
    else:
        positions = positions.to(device)
    if rows:
        batch.mm = BatchMultimodal(torch.cat(rows).to(device), torch.cat(embeds).to(device), positions)
    else:
        batch.mm = BatchMultimodal(torch.empty(0, dtype=torch.long, device=device), None, positions)
