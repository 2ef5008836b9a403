"""Multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash) over the paged KV cache, weights absorbed.

MLA compresses each token's keys and values into one latent c (kv_lora_rank wide, after kv_a_layernorm) plus
one rotary key k_r shared by all heads (qk_rope_head_dim). Per head h the full key is [W_UK[h] c ; k_r] and the
value W_UV[h] c, with W_UK / W_UV the two halves of kv_b_proj. The pool stores only [c ; k_r] per token (one
"head" of kv_lora_rank + qk_rope_head_dim in the k pool, nothing in the v pool) and the up-projections are
absorbed into the query and the output instead of being applied to every cached token:

    score = q_nope . (W_UK c) + q_r . k_r = (W_UK^T q_nope) . c + q_r . k_r   -> query [W_UK^T q_nope ; q_r]
    out_h = W_UV[h] (sum_j p_j c_j)                                             -> values are c itself

so attention is multi-query over the cached rows (all heads share one key/value row); the torch backend runs it
as one SDPA call with the heads folded into the query length. Decode and short chunks take this path; long
prefill chunks instead up-project the gathered latents to per-head keys and values (fewer operations there, see
`up_project_from`). Either way the pool holds only the latent rows.
"""
from __future__ import annotations

import torch
from torch import nn

from ember.distributed import tp_rank, tp_size


class KvBProj(nn.Module):
    """kv_b_proj's weight for this rank's heads: per head dn rows of W_UK then dv rows of W_UV in the checkpoint.
    Stored regrouped as [W_UK of every head ; W_UV of every head], so that `split()` gives both as contiguous
    [H, d, r] blocks (a strided per-head slice made every bf16 decode step copy it). Not an nn.Linear: it is never
    applied to activations as one GEMM (MLA absorbs it), and CPU quantization must leave it in floating point."""

    def __init__(self, num_heads: int, qk_nope_head_dim: int, v_head_dim: int, kv_lora_rank: int):
        super().__init__()
        if num_heads % tp_size():
            raise ValueError(f"attention heads ({num_heads}) are not divisible by the tensor-parallel size {tp_size()}")
        self.num_heads = num_heads // tp_size()
        self.dn, self.dv = qk_nope_head_dim, v_head_dim
        self.weight = nn.Parameter(torch.empty(self.num_heads * (self.dn + self.dv), kv_lora_rank))

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, dn, r], W_UV [H, dv, r])."""
        H, r = self.num_heads, self.weight.shape[1]
        w_uk, w_uv = self.weight.split([H * self.dn, H * self.dv])
        return w_uk.view(H, self.dn, r), w_uv.view(H, self.dv, r)

    def weight_loader(self, param, loaded, shard_id=None) -> int:
        n = param.shape[0]  # column-parallel by heads: this rank's rows
        if loaded.shape != (n * tp_size(), *param.shape[1:]):
            raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not fit the model's "
                             f"{(n * tp_size(), *param.shape[1:])}")
        per_head = loaded.narrow(0, tp_rank() * n, n).view(self.num_heads, self.dn + self.dv, -1)
        w_uk, w_uv = self.split()
        w_uk.copy_(per_head[:, :self.dn])
        w_uv.copy_(per_head[:, self.dn:])
        return param.numel()


class MLAAttention(nn.Module):
    def __init__(self, num_heads: int, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 v_head_dim: int, scale: float, layer_id: int, group: str = "full"):
        super().__init__()
        self.num_heads, self.kv_lora_rank = num_heads, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.scale = scale  # softmax scale of the un-absorbed head (qk_nope + qk_rope), mscale included
        self.layer_id = layer_id
        self.group = group
        # Per (query, key) pair the absorbed form does (2r + dr) multiply-adds per head, the up-projected one
        # (dn + dr + dv) plus r * (dn + dv) per cached key for the up-projection: from this many new tokens per
        # request on (~400 for GLM-4.7-Flash) up-projecting is cheaper, and it is plain multi-head attention with
        # equal q/k/v head dims (what fused SDPA kernels take).
        saved = 2 * kv_lora_rank + qk_rope_head_dim - (qk_nope_head_dim + qk_rope_head_dim + v_head_dim)
        self.up_project_from = kv_lora_rank * (qk_nope_head_dim + v_head_dim) / saved if saved > 0 else float("inf")

    def forward(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                w_uk: torch.Tensor, w_uv: torch.Tensor, batch) -> torch.Tensor:
        """q_nope [T, H, dn], q_rope [T, H, dr] (rotated), latent [T, r] (normed), k_rope [T, dr] (rotated),
        w_uk [H, dn, r], w_uv [H, dv, r] (KvBProj.split()) -> [T, H * dv], by the batch's attention backend
        (the torch one: ember/attention/torch_sdpa.py; the paged Triton kernel: ember/attention/triton_mla.py)."""
        return batch.attn_backend.forward_mla(self, q_nope, q_rope, latent, k_rope, w_uk, w_uv,
                                              batch.attn[self.group], batch.kv_cache)
