"""The compressed branch through `scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA).

Every query of an object attends to all of that object's compressed blocks, which is plain dense
attention per object over few keys; SDPA's fused kernels do it without the reference's float32
score matrix. Same semantics as `kernels.nsa.reference.compressed_attention`.
"""

from __future__ import annotations

import torch

from kernels.grouped_sdpa import grouped_attention


def compressed_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    q_token_cu: torch.Tensor,
    block_cu: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """q [Nq, Hq, D]; k_cmp, v_cmp [Bk, Hkv, D]; q_token_cu, block_cu [B + 1] -> [Nq, Hq, D] (zeros without blocks)."""
    if q_token_cu.numel() == 2:  # one object (a reconstruction): it spans both tensors, no host sync needed
        bounds = [(0, q.shape[0], 0, k_cmp.shape[0])]
    else:
        q_cu, b_cu = q_token_cu.tolist(), block_cu.tolist()
        bounds = [(q_cu[obj], q_cu[obj + 1], b_cu[obj], b_cu[obj + 1]) for obj in range(len(q_cu) - 1)]
    pieces = []
    for q_start, q_end, b_start, b_end in bounds:
        if q_end == q_start:
            continue
        if b_end == b_start:
            pieces.append(torch.zeros_like(q[q_start:q_end]))  # no block to attend to
            continue
        keys, values = k_cmp[None, b_start:b_end], v_cmp[None, b_start:b_end]
        pieces.append(grouped_attention(q[None, q_start:q_end], keys, values, scale)[0])
    return torch.cat(pieces) if pieces else torch.zeros_like(q)
