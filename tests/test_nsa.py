"""Native sparse attention: each reference branch against a naive per-query loop, and the NSA module."""

from dataclasses import dataclass

import pytest
import torch

from backend.model.blocks import partition
from backend.model.nsa import NSACrossAttention, nsa_attention
from backend.model.routing import per_kv_head
from kernels.nsa import Selection, block_pool, compressed_attention, selected_attention, window_attention


@dataclass
class Layout:
    """Packed keys in variable-sized blocks (some empty) of several objects, and queries per object."""

    block_offsets: torch.Tensor  # [Bk + 1]
    block_cu: torch.Tensor  # [B + 1]
    q_token_cu: torch.Tensor  # [B + 1]
    query_object: list[int]  # object of each query

    @property
    def num_keys(self) -> int:
        return int(self.block_offsets[-1])

    @property
    def num_queries(self) -> int:
        return int(self.q_token_cu[-1])

    def object_blocks(self, obj: int) -> list[int]:
        return list(range(int(self.block_cu[obj]), int(self.block_cu[obj + 1])))

    def rows(self, block: int) -> list[int]:
        return list(range(int(self.block_offsets[block]), int(self.block_offsets[block + 1])))


def random_layout(generator: torch.Generator, blocks_per_object=(3, 0, 5, 1), max_block=7) -> Layout:
    sizes, query_counts = [], []
    for count in blocks_per_object:
        sizes += torch.randint(0, max_block + 1, (count,), generator=generator).tolist()
        query_counts.append(int(torch.randint(1, 8, (1,), generator=generator)))
    if sizes:
        sizes[0] = max(sizes[0], 1)  # at least one key somewhere
    block_offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    block_cu = torch.tensor([0, *torch.tensor(blocks_per_object).cumsum(0).tolist()])
    q_token_cu = torch.tensor([0, *torch.tensor(query_counts).cumsum(0).tolist()])
    query_object = [obj for obj, count in enumerate(query_counts) for _ in range(count)]
    return Layout(block_offsets, block_cu, q_token_cu, query_object)


def random_selection(generator: torch.Generator, layout: Layout, kv_heads: int, slots: int) -> torch.Tensor:
    """Per query and KV head: random blocks of the query's object, some repeated, the rest -1."""
    selected = torch.full((layout.num_queries, kv_heads, slots), -1, dtype=torch.long)
    for i, obj in enumerate(layout.query_object):
        own = layout.object_blocks(obj)
        for h in range(kv_heads):
            for s in range(slots):
                if own and torch.rand(1, generator=generator) < 0.8:
                    selected[i, h, s] = own[int(torch.randint(len(own), (1,), generator=generator))]
    return selected


def naive_attention(q_i: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One query head q_i [D] over keys, values [L, D], in float64; zeros when there is no key."""
    if len(keys) == 0:
        return torch.zeros_like(q_i, dtype=torch.float64)
    weights = torch.softmax((keys.double() @ q_i.double()) * scale, dim=0)
    return weights @ values.double()


def naive_selected(q, k, v, layout: Layout, selected, scale) -> torch.Tensor:
    heads, kv_heads = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            blocks = sorted({b for b in selected[i, kv].tolist() if b >= 0})
            rows = [r for b in blocks for r in layout.rows(b)]
            out[i, h] = naive_attention(q[i, h], k[rows, kv], v[rows, kv], scale)
    return out


def naive_compressed(q, k_cmp, v_cmp, layout: Layout, scale) -> torch.Tensor:
    heads, kv_heads = q.shape[1], k_cmp.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, obj in enumerate(layout.query_object):
        blocks = layout.object_blocks(obj)
        for h in range(heads):
            kv = h // (heads // kv_heads)
            out[i, h] = naive_attention(q[i, h], k_cmp[blocks, kv], v_cmp[blocks, kv], scale)
    return out


def random_qkv(generator, layout: Layout, heads: int, kv_heads: int, dim: int, dtype=torch.float32):
    q = torch.randn(layout.num_queries, heads, dim, generator=generator).to(dtype)
    k = torch.randn(layout.num_keys, kv_heads, dim, generator=generator).to(dtype)
    v = torch.randn(layout.num_keys, kv_heads, dim, generator=generator).to(dtype)
    return q, k, v


GQA = [(1, 1), (4, 2), (6, 1), (16, 1)]  # (query heads, KV heads)


@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_selected_attention_matches_naive_loop(heads: int, kv_heads: int, chunk_size) -> None:
    generator = torch.Generator().manual_seed(heads * 10 + kv_heads)
    layout = random_layout(generator)
    q, k, v = random_qkv(generator, layout, heads, kv_heads, dim=8)
    selected = random_selection(generator, layout, kv_heads, slots=4)
    scale = 0.7
    out = selected_attention(q, k, v, layout.block_offsets, selected, scale, chunk_size=chunk_size)
    expected = naive_selected(q, k, v, layout, selected, scale)
    assert out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_compressed_attention_matches_naive_loop(heads: int, kv_heads: int, chunk_size) -> None:
    generator = torch.Generator().manual_seed(heads * 10 + kv_heads + 1)
    layout = random_layout(generator)
    blocks = int(layout.block_cu[-1])
    q = torch.randn(layout.num_queries, heads, 8, generator=generator)
    k_cmp, v_cmp = torch.randn(2, blocks, kv_heads, 8, generator=generator)
    out = compressed_attention(q, k_cmp, v_cmp, layout.q_token_cu, layout.block_cu, chunk_size=chunk_size)
    expected = naive_compressed(q, k_cmp, v_cmp, layout, scale=8**-0.5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # The object with no block (object 1) gets zeros.
    first, last = int(layout.q_token_cu[1]), int(layout.q_token_cu[2])
    assert (out[first:last] == 0).all()


@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
def test_window_attention_matches_naive_loop(heads: int, kv_heads: int) -> None:
    generator = torch.Generator().manual_seed(heads * 10 + kv_heads + 2)
    layout = random_layout(generator)
    q, k, v = random_qkv(generator, layout, heads, kv_heads, dim=8)
    query_block = torch.tensor(
        [
            layout.object_blocks(obj)[int(torch.randint(len(layout.object_blocks(obj)), (1,), generator=generator))]
            if layout.object_blocks(obj)
            else -1
            for obj in layout.query_object
        ]
    )
    out = window_attention(q, k, v, layout.block_offsets, query_block, chunk_size=4)
    expected = naive_selected(q, k, v, layout, query_block.view(-1, 1, 1).expand(-1, kv_heads, 1), 8**-0.5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_block_pool_is_the_block_mean() -> None:
    generator = torch.Generator().manual_seed(5)
    layout = random_layout(generator)
    x = torch.randn(layout.num_keys, 2, 3, generator=generator)
    pooled = block_pool(x, layout.block_offsets)
    for b in range(len(layout.block_offsets) - 1):
        rows = layout.rows(b)
        expected = x[rows].mean(0) if rows else torch.zeros(2, 3)
        torch.testing.assert_close(pooled[b], expected, rtol=1e-6, atol=1e-6)


def test_reference_gradients_match_the_naive_loop() -> None:
    """Chunked (recomputed) backward equals the gradient of the naive loop."""
    generator = torch.Generator().manual_seed(7)
    layout = random_layout(generator)
    q, k, v = (t.double().requires_grad_() for t in random_qkv(generator, layout, 4, 2, dim=4))
    selected = random_selection(generator, layout, 2, slots=3)
    weights = torch.randn(q.shape, generator=generator, dtype=torch.float64)
    out = selected_attention(q, k, v, layout.block_offsets, selected, chunk_size=2)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected = torch.autograd.grad((naive_selected(q, k, v, layout, selected, 0.5) * weights).sum(), (q, k, v))
    for got, want in zip(grads, expected, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_bf16_reference_is_finite_and_close() -> None:
    generator = torch.Generator().manual_seed(8)
    layout = random_layout(generator, blocks_per_object=(6, 0, 4), max_block=16)
    q, k, v = random_qkv(generator, layout, 16, 1, dim=16)
    selected = random_selection(generator, layout, 1, slots=3)
    reference = selected_attention(q, k, v, layout.block_offsets, selected)
    out = selected_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout.block_offsets, selected)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


# The NSA module and its functional core.


def dense_attention(q, k, v, q_token_cu, k_token_cu) -> torch.Tensor:
    """Plain softmax attention of each object's queries over all of that object's keys (GQA expanded)."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for obj in range(len(q_token_cu) - 1):
        qs, qe = int(q_token_cu[obj]), int(q_token_cu[obj + 1])
        ks, ke = int(k_token_cu[obj]), int(k_token_cu[obj + 1])
        keys = k[ks:ke].double().repeat_interleave(group, dim=1)  # [L, Hq, D]
        values = v[ks:ke].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[qs:qe].double(), keys) * q.shape[-1] ** -0.5
        out[qs:qe] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
    return out


def voxel_keys(generator: torch.Generator, counts=(40, 25, 33)):
    """Random voxels of several objects, partitioned into 3D blocks of variable occupancy."""
    coords = torch.cat([torch.randint(0, 8, (n, 3), generator=generator) for n in counts])
    object_index = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    return partition(coords, (4, 4, 4), object_index)


def all_blocks(blocks, query_cu: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Selection lists [Nq, Hkv, n] that hold every block of the query's object (-1 padded)."""
    per_object = (blocks.block_cu[1:] - blocks.block_cu[:-1]).tolist()
    lists = []
    for obj, count in enumerate(per_object):
        own = list(range(int(blocks.block_cu[obj]), int(blocks.block_cu[obj + 1])))
        own += [-1] * (max(per_object) - count)
        lists += [own] * int(query_cu[obj + 1] - query_cu[obj])
    return per_kv_head(torch.tensor(lists), kv_heads)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (16, 1)])
def test_nsa_equals_dense_attention_when_selection_covers_every_block(heads: int, kv_heads: int) -> None:
    generator = torch.Generator().manual_seed(heads)
    keys = voxel_keys(generator)
    query_cu = torch.tensor([0, 7, 12, 20])
    q = torch.randn(20, heads, 8, generator=generator)
    k, v = torch.randn(2, int(keys.token_cu[-1]), kv_heads, 8, generator=generator)
    k_cmp, v_cmp = block_pool(k, keys.block_offsets), block_pool(v, keys.block_offsets)
    gates = torch.zeros(20, 3, heads, 8)
    gates[:, 1] = 1.0  # only the selected branch
    out = nsa_attention(
        q,
        k,
        v,
        k_cmp,
        v_cmp,
        gates,
        block_offsets=keys.block_offsets,
        block_cu=keys.block_cu,
        query_cu=query_cu,
        selected=all_blocks(keys, query_cu, kv_heads),
        query_block=torch.full((20,), -1),
        chunk_size=5,
    )
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, query_cu, keys.token_cu), rtol=1e-5, atol=1e-5)


def test_module_reduces_to_the_dense_module_it_is_loaded_from() -> None:
    """With the selected gate saturated open and the others shut, the module is dense attention
    with the same q, kv and out weights: the stage-1 to stage-2 initialisation path."""
    generator = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    hidden, heads, kv_heads, dim = 32, 8, 2, 8
    module = NSACrossAttention(hidden, heads, kv_heads, dim)
    with torch.no_grad():
        module.gate.weight.zero_()
        module.gate.bias.view(3, heads * dim)[:] = torch.tensor([-100.0, 100.0, -100.0])[:, None]
    keys = voxel_keys(generator)
    query_cu = torch.tensor([0, 5, 11, 18])
    x_q = torch.randn(18, hidden, generator=generator)
    x_kv = torch.randn(int(keys.token_cu[-1]), hidden, generator=generator)
    query_block = torch.randint(0, keys.num_blocks, (18,), generator=generator)
    selected = all_blocks(keys, query_cu, 1)[:, 0]  # [Nq, n], shared by the KV heads
    out = module(x_q, x_kv, keys=keys, query_cu=query_cu, selected=selected, query_block=query_block)

    q = module.q(x_q).view(18, heads, dim)
    k, v = module.kv(x_kv).view(-1, 2, kv_heads, dim).unbind(1)
    dense = dense_attention(q, k, v, query_cu, keys.token_cu).float()
    torch.testing.assert_close(out, module.out(dense.reshape(18, heads * dim)), rtol=1e-5, atol=1e-5)


def test_gradients_reach_inputs_and_every_parameter() -> None:
    generator = torch.Generator().manual_seed(12)
    torch.manual_seed(12)
    hidden, heads, kv_heads, dim = 32, 8, 2, 8
    module = NSACrossAttention(hidden, heads, kv_heads, dim)
    with torch.no_grad():  # away from the zero init, where the compression MLP's inner layers get no gradient
        module.compress.key.output.weight.normal_(0.0, 0.1)
        module.compress.value.output.weight.normal_(0.0, 0.1)
    keys = voxel_keys(generator)
    x = torch.randn(int(keys.token_cu[-1]), hidden, generator=generator, requires_grad=True)
    # Self-attention with score routing (selected=None), small chunks to exercise recomputation.
    out = module(x, x, keys=keys, query_cu=keys.token_cu, top_n=3, query_block=keys.token_block, chunk_size=40)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name

    # The functional core passes gradients to q, k and v through every branch.
    q = torch.randn(10, heads, dim, generator=generator, requires_grad=True)
    k, v = (torch.randn(int(keys.token_cu[-1]), kv_heads, dim, generator=generator).requires_grad_() for _ in "kv")
    query_cu = torch.tensor([0, 4, 4, 10])
    nsa_attention(
        q,
        k,
        v,
        block_pool(k, keys.block_offsets),
        block_pool(v, keys.block_offsets),
        torch.rand(10, 3, heads, dim, generator=generator),
        block_offsets=keys.block_offsets,
        block_cu=keys.block_cu,
        query_cu=query_cu,
        selected=all_blocks(keys, query_cu, kv_heads),
        query_block=torch.tensor([0, 1, 0, 1, 3, 3, 3, 4, 4, 5]),
    ).sum().backward()
    for tensor in (q, k, v):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_cross_attention_without_window_and_bf16() -> None:
    generator = torch.Generator().manual_seed(13)
    torch.manual_seed(13)
    hidden, heads, kv_heads, dim = 64, 16, 1, 16
    module = NSACrossAttention(hidden, heads, kv_heads, dim, branches=("compressed", "selected")).bfloat16()
    keys = voxel_keys(generator)
    query_cu = torch.tensor([0, 6, 9, 15])
    x_q = torch.randn(15, hidden, generator=generator).bfloat16().requires_grad_()
    x_kv = torch.randn(int(keys.token_cu[-1]), hidden, generator=generator).bfloat16()
    selected = all_blocks(keys, query_cu, 1)[:, 0, :2]
    out = module(x_q, x_kv, keys=keys, query_cu=query_cu, selected=selected)
    assert out.dtype == torch.bfloat16 and out.shape == (15, hidden) and torch.isfinite(out).all()
    out.float().square().sum().backward()
    assert torch.isfinite(x_q.grad).all()
    routed = module(x_q, x_kv, keys=keys, query_cu=query_cu, top_n=2)  # score routing in bf16
    assert torch.isfinite(routed).all()
    with pytest.raises(ValueError, match="window"):
        module(x_q, x_kv, keys=keys, query_cu=query_cu, query_block=torch.zeros(15, dtype=torch.long))
    assert set(dict(module.named_parameters())) >= {"q.weight", "kv.weight", "out.weight", "gate.weight"}


def test_module_takes_selections_that_calls_share() -> None:
    """Routing's lists and the window lists as `Selection`s (built once per forward) give what plain lists give."""
    generator = torch.Generator().manual_seed(21)
    torch.manual_seed(21)
    module = NSACrossAttention(32, 8, 2, 8)
    keys = voxel_keys(generator)
    x = torch.randn(int(keys.token_cu[-1]), 32, generator=generator)
    lists = all_blocks(keys, keys.token_cu, 2)
    expected = module(x, x, keys=keys, query_cu=keys.token_cu, selected=lists, query_block=keys.token_block)
    selection, window = Selection(lists), Selection.window(keys.token_block, 2)
    for _ in range(2):
        got = module(x, x, keys=keys, query_cu=keys.token_cu, selected=selection, query_block=window)
        assert torch.equal(got, expected)
