"""NSA cross-attention (LSRM §3.1, §3.3): compressed, selected and window branches with gates.

For each query the layer combines three attention branches over key tokens grouped in spatial
blocks (`backend.model.blocks`):
- compressed: attention to one pooled key/value per block of the query's object (global context);
- selected: attention to the tokens of the query's top-n blocks (fine detail where it matters);
- window: attention to the tokens of the query's own block (local context; self-attention only).
The branch outputs are mixed by per-channel sigmoid gates predicted from the query token (Qiu et
al., gated attention): o = sum_b sigmoid(g_b) * o_b, then the output projection.

The projections `q`, `kv` and `out` are named and shaped like the stage-1 dense attention so that
stage 2 loads stage-1 weights; `compress` and `gate` are the new parameters. `compress` starts as
the identity (zero-initialised output layer), i.e. as plain mean pooling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from backend.model.blocks import TokenBlocks
from backend.model.routing import per_kv_head, score_routing
from kernels.nsa import Selection, block_pool, compressed_attention, selected_attention, window_attention

BRANCHES = ("compressed", "selected", "window")


class KeyShard(Protocol):
    """This rank's whole key blocks under sequence parallelism (`backend.parallel.TokenShard`)."""

    local_offsets: torch.Tensor  # [b + 1] block offsets within this rank's key rows

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's key rows -> all key rows, block order (differentiable)."""
        ...

    def gather_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """One row per block of this rank -> one row per block of all ranks (differentiable)."""
        ...


def nsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor | None,
    v_cmp: torch.Tensor | None,
    gates: torch.Tensor,
    *,
    block_offsets: torch.Tensor,
    block_cu: torch.Tensor,
    query_cu: torch.Tensor,
    selected: torch.Tensor | Selection | None = None,
    query_block: torch.Tensor | Selection | None = None,
    branches: Sequence[str] = BRANCHES,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Gated sum of the NSA branches: [Nq, Hq, D].

    q [Nq, Hq, D]; k, v [Nk, Hkv, D] in block order; k_cmp, v_cmp [Bk, Hkv, D] (needed for the
    compressed branch); gates [Nq, len(branches), Hq, D] are the branch weights themselves (already
    through the sigmoid), in the order of `branches`. block_offsets [Bk + 1], block_cu [B + 1] and
    query_cu [B + 1] as in `kernels.nsa`; selected [Nq, Hkv, n] for the selected branch;
    query_block [Nq] (the key block of each query) for the window branch; either may be a
    `Selection` (`Selection.window` for the window) that carries the kernels' walks across calls.
    """
    if gates.shape != (q.shape[0], len(branches), *q.shape[1:]):
        raise ValueError(f"gates must be [Nq, {len(branches)}, Hq, D], got {tuple(gates.shape)}")
    out = None
    for index, branch in enumerate(branches):
        if branch == "compressed":
            if k_cmp is None or v_cmp is None:
                raise ValueError("the compressed branch needs k_cmp and v_cmp")
            branch_out = compressed_attention(q, k_cmp, v_cmp, query_cu, block_cu, scale, chunk_size=chunk_size)
        elif branch == "selected":
            if selected is None:
                raise ValueError("the selected branch needs the block lists `selected`")
            branch_out = selected_attention(q, k, v, block_offsets, selected, scale, chunk_size=chunk_size)
        elif branch == "window":
            if query_block is None:
                raise ValueError("the window branch needs `query_block`")
            branch_out = window_attention(q, k, v, block_offsets, query_block, scale, chunk_size=chunk_size)
        else:
            raise ValueError(f"unknown NSA branch {branch!r}; expected some of {BRANCHES}")
        gated = gates[:, index] * branch_out
        out = gated if out is None else out + gated
    if out is None:
        raise ValueError("NSA needs at least one branch")
    return out


class ResidualMLP(nn.Module):
    """x + MLP(LayerNorm(x)) over the last dim; the output layer starts at zero (identity map)."""

    def __init__(self, dim: int, expansion: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.hidden = nn.Linear(dim, expansion * dim)
        self.output = nn.Linear(expansion * dim, dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.output(torch.nn.functional.gelu(self.hidden(self.norm(x))))


class BlockCompression(nn.Module):
    """LSRM's block compression: a residual MLP per token (per KV head) on keys and on values, then the block mean."""

    def __init__(self, head_dim: int, expansion: int = 2) -> None:
        super().__init__()
        self.key = ResidualMLP(head_dim, expansion)
        self.value = ResidualMLP(head_dim, expansion)

    def forward(
        self, k: torch.Tensor, v: torch.Tensor, block_offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [Nk, Hkv, D] in block order -> k_cmp, v_cmp [Bk, Hkv, D]."""
        return block_pool(self.key(k), block_offsets), block_pool(self.value(v), block_offsets)


class NSACrossAttention(nn.Module):
    """Native sparse attention from query tokens to block-partitioned key tokens (GQA)."""

    def __init__(
        self,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        branches: Sequence[str] = BRANCHES,
        *,
        compress_expansion: int = 2,
    ) -> None:
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        unknown = set(branches) - set(BRANCHES)
        if unknown or not branches or len(set(branches)) != len(branches):
            raise ValueError(f"branches must be distinct names from {BRANCHES}, got {tuple(branches)}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.branches = tuple(branches)
        self.q = nn.Linear(hidden, heads * head_dim, bias=False)
        self.kv = nn.Linear(hidden, 2 * kv_heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, hidden, bias=False)
        # Also used by score routing, so it exists even without the compressed branch.
        self.compress = BlockCompression(head_dim, compress_expansion)
        self.gate = nn.Linear(hidden, len(self.branches) * heads * head_dim)

    def forward(
        self,
        x_q: torch.Tensor,
        x_kv: torch.Tensor,
        *,
        keys: TokenBlocks,
        query_cu: torch.Tensor,
        selected: torch.Tensor | Selection | None = None,
        top_n: int = 16,
        query_block: torch.Tensor | Selection | None = None,
        chunk_size: int | None = None,
        shard: KeyShard | None = None,
    ) -> torch.Tensor:
        """x_q [Nq, C] and x_kv [Nk, C], both in block order -> [Nq, C].

        keys: the partition of the key tokens; query_cu [B + 1]: the queries of each object.
        selected: block lists [Nq, Hkv, n] or [Nq, n] (shared by the KV heads), e.g. from 3D-aware
        routing, or a `Selection` of [Nq, Hkv, n] lists fixed for a whole forward (the kernels then
        build their walks once); when None, NSA's score routing picks top_n blocks from the compressed keys.
        query_block [Nq]: each query's own key block (or its `Selection.window`), required exactly
        when "window" is a branch.
        shard: under sequence parallelism, x_kv holds only this rank's whole key blocks: they are
        compressed here, then keys, values and compressed ones are gathered from every rank; `keys`,
        `selected` and `query_block` stay global (block indices of all ranks).
        """
        if ("window" in self.branches) != (query_block is not None):
            raise ValueError("query_block must be given exactly when the window branch is on")
        num_queries = x_q.shape[0]
        q = self.q(x_q).view(num_queries, self.heads, self.head_dim)  # [Nq, Hq, D]
        kv = self.kv(x_kv).view(x_kv.shape[0], 2, self.kv_heads, self.head_dim)
        k, v = kv.unbind(1)  # [Nk, Hkv, D]
        need_scores = "selected" in self.branches and selected is None
        k_cmp = v_cmp = None
        if "compressed" in self.branches or need_scores:
            k_cmp, v_cmp = self.compress(k, v, keys.block_offsets if shard is None else shard.local_offsets)
            if shard is not None:
                k_cmp, v_cmp = shard.gather_blocks(torch.stack([k_cmp, v_cmp], 1)).unbind(1)  # [Bk, Hkv, D]
        if shard is not None:
            k, v = shard.gather_tokens(kv).unbind(1)
        if need_scores:
            selected = score_routing(q.detach(), k_cmp.detach(), query_cu, keys.block_cu, top_n)
        elif isinstance(selected, torch.Tensor) and selected.ndim == 2:
            selected = per_kv_head(selected, self.kv_heads)
        gates = torch.sigmoid(self.gate(x_q)).view(num_queries, len(self.branches), self.heads, self.head_dim)
        out = nsa_attention(
            q,
            k,
            v,
            k_cmp,
            v_cmp,
            gates.to(q.dtype),
            block_offsets=keys.block_offsets,
            block_cu=keys.block_cu,
            query_cu=query_cu,
            selected=selected,
            query_block=query_block,
            branches=self.branches,
            chunk_size=chunk_size,
        )
        return self.out(out.reshape(num_queries, self.heads * self.head_dim))
