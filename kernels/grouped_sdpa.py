"""Dense grouped-query attention through `scaled_dot_product_attention`, without copying keys per query head.

The G query heads that share a KV head are folded into G times the query rows of one head: softmax
is per query row, so the scores are exactly those of attention with K/V repeated over the group, but
K/V are read as they are, any SDPA backend takes the input (no `enable_gqa`), and with one KV head q
and the output are views. Stage 1's dense attention and stage 2's compressed branch both use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q [B, Nq, Hq, D]; k, v [B, Nk, Hkv, D], Hkv dividing Hq (query head h reads KV head h // G) -> [B, Nq, Hq, D]."""
    batch, num_queries, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    rows = q.view(batch, num_queries, kv_heads, group, head_dim).transpose(1, 2).flatten(2, 3)  # [B, Hkv, Nq*G, D]
    out = F.scaled_dot_product_attention(rows, k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.view(batch, kv_heads, num_queries, group, head_dim).transpose(1, 2).flatten(2, 3)
