"""Stage 1's building blocks: GQA attention between two token sets and the gated dense block (eq. 5-8).

A dense block updates volume tokens V and image tokens I together. Each set attends to itself and to
the other; the two updates are summed through learned per-channel sigmoid gates; then an MLP:

    V' = V + sigmoid(a_vv) * Attn(V, V) + sigmoid(a_vi) * Attn(V, I)      I' likewise with I and V
    V'' = V' + MLP(V')                                                    (pre-norm everywhere)

Keeping the four attentions apart (rather than one self-attention over V and I together) lets stage 2
give each its own sparse pattern and number of selected blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.grouped_sdpa import grouped_attention

from .config import ModelConfig

PAIRS = ("vv", "vi", "ii", "iv")  # query set, key set: volume or image


class Attention(nn.Module):
    """Multi-head attention from queries of one token set to keys/values of another, with grouped KV heads."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = nn.Linear(hidden, heads * head_dim, bias=False)
        self.kv = nn.Linear(hidden, 2 * kv_heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, hidden, bias=False)

    def project(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [..., Nq, heads, D]; k, v [..., Nk, kv_heads, D]."""
        q = self.q(x_q).unflatten(-1, (self.heads, self.head_dim))
        k, v = self.kv(x_kv).unflatten(-1, (2, self.kv_heads, self.head_dim)).unbind(-3)
        return q, k, v

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        """x_q [B, Nq, C], x_kv [B, Nk, C] -> [B, Nq, C]."""
        return self.out(grouped_attention(*self.project(x_q, x_kv)).flatten(-2))


class MLP(nn.Module):
    def __init__(self, hidden: int, ratio: float) -> None:
        super().__init__()
        width = int(hidden * ratio)
        self.up = nn.Linear(hidden, width)
        self.down = nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class TokenBlock(nn.Module):
    """The parameters of one block, shared in shape by stage 1 (dense) and stage 2 (sparse attention).

    Stage 2's block subclasses this with NSA attention modules whose q / kv / out weights have the same
    names and shapes, so its state dict starts from stage 1's (LSRM §3.3).
    """

    def __init__(self, config: ModelConfig, attention: dict[str, nn.Module]) -> None:
        """attention: one module per pair of PAIRS, or only "vv" and "vi" for a block that updates the
        volume tokens alone (the last block of stage 2, whose image tokens nothing reads)."""
        super().__init__()
        hidden = config.hidden
        self.pairs = tuple(pair for pair in PAIRS if pair in attention)
        self.updates_images = "ii" in attention
        self.norm_v, self.norm_i = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attention = nn.ModuleDict(attention)
        # One per-channel gate per update; sigmoid(0) = 1/2 at start.
        self.gates = nn.ParameterDict({pair: nn.Parameter(torch.zeros(hidden)) for pair in self.pairs})
        self.mlp_norm_v, self.mlp_v = nn.LayerNorm(hidden), MLP(hidden, config.mlp_ratio)
        if self.updates_images:
            self.mlp_norm_i, self.mlp_i = nn.LayerNorm(hidden), MLP(hidden, config.mlp_ratio)

    def gated(self, updates: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The summed gated updates of the volume and (when this block updates them) the image tokens."""
        gate = {pair: torch.sigmoid(value) for pair, value in self.gates.items()}
        dv = gate["vv"] * updates["vv"] + gate["vi"] * updates["vi"]
        di = gate["ii"] * updates["ii"] + gate["iv"] * updates["iv"] if self.updates_images else None
        return dv, di

    def feed_forward(self, v: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = v + self.mlp_v(self.mlp_norm_v(v))
        return v, i + self.mlp_i(self.mlp_norm_i(i)) if self.updates_images else i


class DenseBlock(TokenBlock):
    """Stage 1: every token attends to every token of the set it looks at (eq. 5-8)."""

    def __init__(self, config: ModelConfig) -> None:
        args = (config.hidden, config.heads, config.kv_heads, config.head_dim)
        super().__init__(config, {pair: Attention(*args) for pair in PAIRS})

    def forward(self, v: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v [B, Nv, C] volume tokens, i [B, Ni, C] image tokens."""
        nv, ni = self.norm_v(v), self.norm_i(i)
        sets = {"v": nv, "i": ni}
        updates = {pair: self.attention[pair](sets[pair[0]], sets[pair[1]]) for pair in PAIRS}
        dv, di = self.gated(updates)
        return self.feed_forward(v + dv, i + di)
