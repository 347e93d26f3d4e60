"""NSA kernels against the PyTorch reference: Triton selected attention, FlexAttention tiles, SDPA compressed.

On a machine without CUDA the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1,
set below before the kernel module is imported: Triton reads it when a kernel is decorated) at small
sizes; with CUDA the same tests run on the GPU at full size. Every run draws fresh random inputs
(the seed is printed on failure through the test id of `seed`). The oracle is the reference in
float64 on the same (rounded) inputs; errors are relative Frobenius norms, and a NaN never passes.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LSRM_NSA_AUTOTUNE", "0")  # correctness here; the benchmark tunes

from kernels import nsa  # noqa: E402
from kernels.nsa import block_lists, reference  # noqa: E402
from kernels.nsa import triton_selected as ts  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}
# (queries, keys, largest block, slots): interpreter sizes on the CPU, full sizes on the GPU.
SIZES = {"cpu": (11, 160, 70, 4), "cuda": (4096, 16384, 64, 16)}[DEVICE.type]
HEAD_DIM = 16 if not CUDA else 64


@pytest.fixture
def seed() -> int:
    value = random.randrange(2**31)
    print(f"seed {value}")
    return value


@dataclass
class Problem:
    q: torch.Tensor  # [Nq, Hq, D]
    k: torch.Tensor  # [Nk, Hkv, D]
    v: torch.Tensor
    block_offsets: torch.Tensor  # [Bk + 1]
    selected: torch.Tensor  # [Nq, Hkv, n]


def make_blocks(generator: torch.Generator, num_keys: int, largest: int) -> torch.Tensor:
    """Variable block sizes in [0, largest] (empty and one-token blocks included) covering num_keys keys."""
    sizes = []
    while sum(sizes) < num_keys:
        sizes.append(int(torch.randint(0, largest + 1, (1,), generator=generator)))
    sizes[-1] -= sum(sizes) - num_keys
    sizes += [0, 1]  # always an empty and a one-token block (the extra key is appended below)
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])


def make_selection(
    generator: torch.Generator, num_queries: int, kv_heads: int, slots: int, num_blocks: int, routed: bool
) -> torch.Tensor:
    """Random lists with -1 slots and repeats; `routed`: neighbouring queries share most blocks (as 3D routing)."""
    if routed:
        centre = torch.arange(num_queries) * num_blocks // max(num_queries, 1)
        spread = torch.randint(-slots, slots + 1, (num_queries, kv_heads, slots), generator=generator)
        selected = (centre[:, None, None] + spread // 2).clamp(0, num_blocks - 1)
    else:
        selected = torch.randint(0, num_blocks, (num_queries, kv_heads, slots), generator=generator)
    empty = torch.rand(selected.shape, generator=generator) < 0.15
    selected = selected.masked_fill(empty, -1)
    if slots > 1:
        selected[::3, :, -1] = selected[::3, :, 0]  # repeated entries count once
    selected[num_queries // 2, 0] = -1  # one query (head group) with no block at all
    return selected


def make_problem(
    seed: int,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    *,
    sizes: tuple[int, int, int, int] = SIZES,
    head_dim: int = HEAD_DIM,
    routed: bool = False,
) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    num_queries, num_keys, largest, slots = sizes
    block_offsets = make_blocks(generator, num_keys, largest)
    num_keys = int(block_offsets[-1])
    selected = make_selection(generator, num_queries, kv_heads, slots, block_offsets.numel() - 1, routed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)

    return Problem(
        randn(num_queries, heads, head_dim),
        randn(num_keys, kv_heads, head_dim),
        randn(num_keys, kv_heads, head_dim),
        block_offsets.to(DEVICE),
        selected.to(DEVICE),
    )


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    """||value - expected|| / ||expected|| over finite entries; fails on any NaN and on mismatched infinities."""
    assert not value.isnan().any(), "NaN in the kernel's result"
    value, expected = value.double(), expected.double()
    assert torch.equal(value.isinf(), expected.isinf()), "infinities differ"
    finite = expected.isfinite()
    difference = (value[finite] - expected[finite]).norm()
    return float(difference / expected[finite].norm().clamp_min(1e-12))


def oracle(problem: Problem, grad_out: torch.Tensor, grad_lse: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Reference out, lse, dq, dk, dv in float64 on the same inputs."""
    q, k, v = (x.detach().double().requires_grad_() for x in (problem.q, problem.k, problem.v))
    out, lse = reference.selected_attention(q, k, v, problem.block_offsets, problem.selected, return_lse=True)
    finite_lse = torch.where(lse.isfinite(), lse, 0.0)
    loss = (out * grad_out.double()).sum() + (finite_lse * grad_lse.double()).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v)))


def kernel_run(
    problem: Problem, grad_out: torch.Tensor, grad_lse: torch.Tensor, tile: int | None, pack: bool | None = None
):
    q, k, v = (x.detach().requires_grad_() for x in (problem.q, problem.k, problem.v))
    out, lse = ts.selected_attention(q, k, v, problem.block_offsets, problem.selected, tile=tile, pack=pack)
    finite_lse = torch.where(lse.isfinite(), lse, 0.0)
    loss = (out.float() * grad_out.float()).sum() + (finite_lse * grad_lse).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v)))


def check_against_oracle(problem: Problem, tile: int | None, generator_seed: int, pack: bool | None = None) -> None:
    generator = torch.Generator().manual_seed(generator_seed)
    grad_out = torch.randn(problem.q.shape, generator=generator).to(DEVICE, problem.q.dtype)
    grad_lse = torch.randn(problem.q.shape[:2], generator=generator).to(DEVICE)
    expected = oracle(problem, grad_out, grad_lse)
    got = kernel_run(problem, grad_out, grad_lse, tile, pack)
    tolerance = TOLERANCE[problem.q.dtype]
    for name, value, want in zip(("out", "lse", "dq", "dk", "dv"), got, expected, strict=True):
        assert value.dtype == (torch.float32 if name == "lse" else problem.q.dtype), name
        error = relative_error(value, want)
        assert error < tolerance, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("heads", "kv_heads"), [(16, 1), (8, 2)])
def test_per_query_kernel_matches_the_reference(seed: int, dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    check_against_oracle(make_problem(seed, dtype, heads, kv_heads), tile=1, generator_seed=seed + 1)


@pytest.mark.parametrize(("heads", "kv_heads", "tile"), [(16, 1, 4), (16, 1, 8), (4, 1, 16), (8, 2, 3)])
def test_tiled_kernel_matches_the_reference_on_shared_lists(seed: int, heads: int, kv_heads: int, tile: int) -> None:
    """T queries per program walking the union of their lists, masked per row; odd T leaves a ragged last tile."""
    problem = make_problem(seed, torch.bfloat16, heads, kv_heads, routed=True)
    check_against_oracle(problem, tile=tile, generator_seed=seed + 1)


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("tile", [1, 4])
def test_packed_and_per_block_walks_match_the_reference(seed: int, tile: int, pack: bool) -> None:
    """Small blocks (0-12 keys): packed, several blocks share a step; per block, each starts its own."""
    num_queries, num_keys, _, slots = SIZES
    problem = make_problem(seed, torch.bfloat16, 16, 1, sizes=(num_queries, num_keys // 2, 12, slots), routed=tile > 1)
    steps = ts.plan(problem.selected, problem.block_offsets, HEAD_DIM, tile, pack)
    assert steps.packed == pack and steps.direct == (not pack)  # blocks of <= 12 keys: one step each
    check_against_oracle(problem, tile=tile, generator_seed=seed + 1, pack=pack)


def test_key_steps_cover_each_programs_keys_once(seed: int) -> None:
    """Reading the step walk back in Python gives each tile's union of keys, and no step needs over WINDOW blocks."""
    generator = torch.Generator().manual_seed(seed)
    offsets = make_blocks(generator, 300, 20)
    selected = make_selection(generator, 10, 2, 6, offsets.numel() - 1, routed=False)
    for tile, pack in ((1, True), (3, True), (3, False)):
        steps = block_lists.key_steps(selected, offsets, tile, pack=pack, step=16)
        for program in range(steps.counts.numel()):
            t, h = divmod(program, 2)
            members = {}
            for query in range(t * tile, min(t * tile + tile, 10)):
                for block in set(selected[query, h].tolist()) - {-1}:
                    for key in range(int(offsets[block]), int(offsets[block + 1])):
                        members[key] = members.get(key, 0) | 1 << (query - t * tile)
            count = int(steps.counts[program])
            start, shift, size = (x[program, :count].tolist() for x in (steps.start, steps.shift, steps.size))
            walked = {}
            for step in range(int(steps.steps[program])):
                first = int(steps.first[program, step])
                lanes = range(step * 16, step * 16 + 16)
                entries = [max(e for e in range(count) if start[e] <= lane) for lane in lanes]
                assert first == entries[0] and entries[-1] - first < steps.window
                for lane, e in zip(lanes, entries, strict=True):
                    if lane - start[e] < size[e]:
                        walked[lane + shift[e]] = int(steps.members[program, e]) if tile > 1 else 1
            assert sorted(walked) == sorted(members)
            if tile > 1:
                assert walked == members


@pytest.mark.parametrize("tile", [1, 4])
def test_one_query_and_one_token_blocks(seed: int, tile: int) -> None:
    problem = make_problem(seed, torch.bfloat16, 16, 1, sizes=(1, 9, 1, 5))
    check_against_oracle(problem, tile=tile, generator_seed=seed + 1)


@pytest.mark.parametrize("pack", [True, False])
def test_blocks_longer_than_a_key_chunk_and_head_dim_128(seed: int, pack: bool) -> None:
    """Blocks up to 150 keys span several 64-key steps; D = 128."""
    sizes = (5, 400, 150, 3) if not CUDA else (1024, 16384, 150, 8)
    problem = make_problem(seed, torch.bfloat16, 4, 1, sizes=sizes, head_dim=128)
    longest = int(problem.block_offsets.diff().argmax())
    problem.selected[0, 0, 0] = longest  # chosen, so the walk has a block over one step (when one is drawn)
    steps = ts.plan(problem.selected, problem.block_offsets, 128, 1, pack)
    assert steps.direct == (not pack and int(problem.block_offsets.diff()[longest]) <= 64)
    check_against_oracle(problem, tile=1, generator_seed=seed + 1, pack=pack)


def test_a_query_without_keys_gets_zeros_minus_infinity_and_no_gradient(seed: int) -> None:
    problem = make_problem(seed, torch.bfloat16, 8, 2)
    problem.selected[0] = -1
    empty = int((problem.block_offsets[1:] == problem.block_offsets[:-1]).nonzero()[0])
    problem.selected[1] = empty  # only an empty block
    q = problem.q.detach().requires_grad_()
    out, lse = ts.selected_attention(q, problem.k, problem.v, problem.block_offsets, problem.selected, tile=1)
    assert torch.all(out[:2] == 0) and torch.all(lse[:2] == float("-inf"))
    (dq,) = torch.autograd.grad(out.float().sum() + torch.where(lse.isfinite(), lse, 0.0).sum(), (q,))
    assert torch.all(dq[:2] == 0) and not dq.isnan().any()


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("tile", [1, 4])
def test_every_output_element_is_written(seed: int, tile: int, pack: bool) -> None:
    """Buffers poisoned with NaN: forward and backward must overwrite every element, packed or not."""
    problem = make_problem(seed, torch.bfloat16, 16, 1, routed=tile > 1)
    q, k, v, offsets, selected = problem.q, problem.k, problem.v, problem.block_offsets, problem.selected
    steps = ts.plan(selected, offsets, q.shape[-1], tile, pack)
    out, lse = torch.full_like(q, float("nan")), torch.full(q.shape[:2], float("nan"), device=DEVICE)
    ts.forward(q, k, v, steps, q.shape[-1] ** -0.5, tile, out=out, lse=lse)
    assert not out.isnan().any() and not lse.isnan().any()
    grads = tuple(torch.full_like(x, float("nan")) for x in (q, k, v))
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    ts.backward(q, k, v, out, lse, grad_out, grad_lse, offsets, selected, steps, q.shape[-1] ** -0.5, tile, grads=grads)
    for grad in grads:
        assert not grad.isnan().any()


def test_nan_inputs_are_not_hidden(seed: int) -> None:
    problem = make_problem(seed, torch.bfloat16, 16, 1)
    problem.k[:] = float("nan")
    out, _ = ts.selected_attention(problem.q, problem.k, problem.v, problem.block_offsets, problem.selected)
    with pytest.raises(AssertionError, match="NaN"):
        relative_error(out, torch.zeros_like(out))


def test_backward_is_deterministic(seed: int) -> None:
    problem = make_problem(seed, torch.bfloat16, 16, 1, routed=True)
    grad_out = torch.randn_like(problem.q)
    grad_lse = torch.randn(problem.q.shape[:2], device=DEVICE)
    first = kernel_run(problem, grad_out, grad_lse, tile=4)
    second = kernel_run(problem, grad_out, grad_lse, tile=4)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_window_attention_through_the_kernel(seed: int) -> None:
    problem = make_problem(seed, torch.bfloat16, 16, 1)
    offsets = problem.block_offsets
    token_block = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=DEVICE), offsets.diff())
    query_block = token_block[: problem.q.shape[0]]  # self-attention: each query's own block
    selected = reference.window_selection(query_block, 1)
    got, _ = ts.selected_attention(problem.q, problem.k, problem.v, offsets, selected)
    expected = reference.window_attention(
        problem.q.double(), problem.k.double(), problem.v.double(), offsets, query_block
    )
    assert relative_error(got, expected) < TOLERANCE[torch.bfloat16]


def test_tile_lists_and_block_queries_match_python_sets(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    selected = make_selection(generator, 13, 2, 5, 9, routed=False)
    blocks, counts = block_lists.tile_lists(selected, 4)
    for t in range(blocks.shape[0]):
        for h in range(2):
            union = sorted({b for b in selected[4 * t : 4 * t + 4, h].flatten().tolist() if b >= 0})
            assert blocks[t, h, : counts[t, h]].tolist() == union
    pointers, queries = block_lists.block_queries(selected, 9)
    for h in range(2):
        for b in range(9):
            chosen = [i for i in range(13) if b in selected[i, h].tolist()]
            assert queries[pointers[h * 9 + b] : pointers[h * 9 + b + 1]].tolist() == chosen


def test_sharing_estimate_tells_shared_from_random_lists() -> None:
    same = torch.arange(16).repeat(256, 1)[:, None, :]  # every query the same 16 blocks
    assert block_lists.sharing(same, 4) == pytest.approx(0.25)
    random_lists = torch.randint(0, 100000, (1024, 1, 16))
    assert block_lists.sharing(random_lists, 4) > 0.9
    assert ts.choose_tile(same, 16) == 4 and ts.choose_tile(random_lists, 16) == 1


def test_dispatch_uses_the_reference_off_cuda_or_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1, device=DEVICE)
    assert nsa.kernels_enabled(x) == CUDA
    with nsa.reference_only():
        assert not nsa.kernels_enabled(x)
    assert nsa.kernels_enabled(x) == CUDA
    monkeypatch.setenv("LSRM_NSA_REFERENCE", "1")
    assert not nsa.kernels_enabled(x)


def test_dispatch_matches_the_reference(seed: int) -> None:
    """The package's functions (kernels on CUDA, the reference elsewhere) against the float64 reference."""
    problem = make_problem(seed, torch.bfloat16, 16, 1, routed=True)
    out, lse = nsa.selected_attention(
        problem.q, problem.k, problem.v, problem.block_offsets, problem.selected, return_lse=True
    )
    want_out, want_lse = reference.selected_attention(
        problem.q.double(), problem.k.double(), problem.v.double(), problem.block_offsets, problem.selected,
        return_lse=True,
    )  # fmt: skip
    assert relative_error(out, want_out) < 1e-2 and relative_error(lse, want_lse) < 1e-2


def test_compressed_attention_through_sdpa(seed: int) -> None:
    from kernels.nsa.sdpa_compressed import compressed_attention

    generator = torch.Generator().manual_seed(seed)
    q_token_cu, block_cu = torch.tensor([0, 5, 5, 12, 20]), torch.tensor([0, 3, 6, 6, 10])
    dtype = torch.bfloat16 if CUDA else torch.float32
    q = torch.randn(20, 8, 32, generator=generator).to(DEVICE, dtype)
    k_cmp, v_cmp = (torch.randn(10, 2, 32, generator=generator).to(DEVICE, dtype) for _ in range(2))
    got = compressed_attention(q, k_cmp, v_cmp, q_token_cu, block_cu)
    want = reference.compressed_attention(q.double(), k_cmp.double(), v_cmp.double(), q_token_cu, block_cu)
    assert relative_error(got, want) < TOLERANCE[dtype]
    whole = torch.tensor([0, 20]), torch.tensor([0, 10])  # one object: bounds without a host sync
    got = compressed_attention(q, k_cmp, v_cmp, *whole)
    want = reference.compressed_attention(q.double(), k_cmp.double(), v_cmp.double(), *whole)
    assert relative_error(got, want) < TOLERANCE[dtype]
    empty = compressed_attention(q, k_cmp[:0], v_cmp[:0], torch.tensor([0, 20]), torch.tensor([0, 0]))
    assert torch.equal(empty, torch.zeros_like(q))


@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (16, 1)])
def test_flex_tile_mode_matches_the_reference(seed: int, heads: int, kv_heads: int) -> None:
    """One list per query tile through FlexAttention = selected attention over fixed key tiles (16/1: one mask head)."""
    from kernels.nsa.flex_tiles import tile_attention

    generator = torch.Generator().manual_seed(seed)
    num_queries, num_keys, q_tile, kv_tile = (300, 520, 64, 128) if not CUDA else (8192, 16384, 128, 128)
    dtype = torch.bfloat16 if CUDA else torch.float32
    q = torch.randn(num_queries, heads, 64, generator=generator).to(DEVICE, dtype)
    k, v = (torch.randn(num_keys, kv_heads, 64, generator=generator).to(DEVICE, dtype) for _ in range(2))
    key_tiles = -(-num_keys // kv_tile)
    tile_selected = torch.randint(-1, key_tiles, (-(-num_queries // q_tile), kv_heads, 4), generator=generator)
    tile_selected = tile_selected.to(DEVICE)
    tile_selected[:, :, 0] = tile_selected[:, :, 0].clamp_min(0)  # every tile attends somewhere
    out, lse = tile_attention(q, k, v, tile_selected, q_tile=q_tile, kv_tile=kv_tile)
    offsets = torch.tensor([*range(0, num_keys, kv_tile), num_keys], device=DEVICE)
    per_query = tile_selected.repeat_interleave(q_tile, 0)[:num_queries]
    want_out, want_lse = reference.selected_attention(
        q.double(), k.double(), v.double(), offsets, per_query, return_lse=True
    )
    assert relative_error(out, want_out) < TOLERANCE[dtype]
    assert relative_error(lse, want_lse) < TOLERANCE[dtype]


def test_compiled_flex_runs_under_a_recompile_limit_new_shapes_do_not_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past dynamo's default limit (8 shapes) FlexAttention would silently run unfused (v1's 16/1 collapse)."""
    import torch._dynamo

    from kernels.nsa import flex_tiles

    limits = []

    def recording_flex(*args, **kwargs):  # stands in for the compiled function (compiling takes ~1 min on CPU)
        limits.append(torch._dynamo.config.recompile_limit)
        return flex_tiles.flex.flex_attention(*args, **kwargs)

    monkeypatch.setattr(flex_tiles, "_compiled", recording_flex)
    default = torch._dynamo.config.recompile_limit
    q, k = torch.randn(1, 16, 128, 16), torch.randn(1, 1, 128, 16)
    out = flex_tiles.compiled_flex(q, k, k, enable_gqa=True)
    assert out.shape == q.shape and limits == [flex_tiles.RECOMPILE_LIMIT] and limits[0] > 8
    assert torch._dynamo.config.recompile_limit == default  # restored after the call


def test_launch_configurations_fit_the_tile() -> None:
    """The autotune spaces after pruning: few warps for 16-row tiles, and dk/dv rows holding whole queries."""
    small = ts._fitting_warps(ts._CONFIGS, {}, ROWS=16)
    wide = ts._fitting_warps(ts._CONFIGS, {}, ROWS=128)
    assert {c.num_warps for c in small} == {1, 2, 4} and {c.num_warps for c in wide} == {4, 8}
    for group in (1, 3, 4, 16, 256):
        configs = ts._query_rows(ts._DKDV_CONFIGS, {}, G=group)
        assert configs and all(c.kwargs["QB"] == c.kwargs["ROWS"] // group >= 1 for c in configs)


@pytest.mark.parametrize("tile", [None, 4])
def test_a_reused_selection_builds_its_walks_once_and_gives_the_same_results(seed: int, tile, monkeypatch) -> None:
    """Every layer of a forward reads the same routed lists: the first call builds the walks, later ones reuse them."""
    built = {"walks": 0, "inversions": 0}

    def counted(function, name):
        def wrapper(*args, **kwargs):
            built[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(ts, "key_steps", counted(ts.key_steps, "walks"))
    monkeypatch.setattr(ts, "block_queries", counted(ts.block_queries, "inversions"))
    problem = make_problem(seed, torch.bfloat16, 16, 1, routed=True)
    grad_out = torch.randn_like(problem.q)
    grad_lse = torch.randn(problem.q.shape[:2], device=DEVICE)
    fresh = kernel_run(problem, grad_out, grad_lse, tile=tile)
    assert built == {"walks": 1, "inversions": 1}
    reused = dataclasses.replace(problem, selected=block_lists.Selection(problem.selected))
    for _ in range(3):
        for a, b in zip(kernel_run(reused, grad_out, grad_lse, tile=tile), fresh, strict=True):
            assert torch.equal(a, b)
    assert built == {"walks": 2, "inversions": 2}


def test_a_window_selection_is_the_window_branch(seed: int) -> None:
    problem = make_problem(seed, torch.bfloat16, 16, 1)
    offsets = problem.block_offsets
    query_block = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=DEVICE), offsets.diff())
    query_block = query_block[: problem.q.shape[0]]
    window = block_lists.Selection.window(query_block, 1)
    nsa.prepare(window, offsets, 16, problem.q.shape[-1])  # builds the kernels' walk on CUDA, nothing elsewhere
    expected = nsa.window_attention(problem.q, problem.k, problem.v, offsets, query_block)
    for _ in range(2):
        assert torch.equal(nsa.window_attention(problem.q, problem.k, problem.v, offsets, window), expected)


@pytest.mark.slow  # about 50 s in the interpreter on a busy 2-core machine
def test_model_forward_through_the_kernels_builds_each_walk_once(monkeypatch) -> None:
    """The tiny model's stage 2 through the kernels equals the reference; routing's lists are walked out once."""
    from backend.model.config import CONFIGS
    from backend.model.lsrm import LSRM, Views
    from tests.fields import UniformSphere
    from tests.test_model import tiny_views

    torch.manual_seed(0)
    model = LSRM(CONFIGS["tiny"]).to(DEVICE).eval()
    with torch.no_grad():
        model.sparse.unpatchify.weight.normal_(0.0, 0.02)  # a non-zero residual, so stage 2 shows in the output
    views = tiny_views(views=1)
    views = Views(views.images.to(DEVICE), views.masks.to(DEVICE), [c.to(DEVICE) for c in views.cameras])
    guide = [UniformSphere(0.6)]
    with torch.no_grad(), nsa.reference_only():
        expected = model(views, stages=2, guide=guide).fields[0].sparse_features
    if not CUDA:
        monkeypatch.setattr(nsa, "kernels_enabled", lambda x: True)  # CPU tensors through the interpreter
    walks = []
    monkeypatch.setattr(
        ts, "key_steps", lambda *args, **kwargs: walks.append(1) or block_lists.key_steps(*args, **kwargs)
    )
    with torch.no_grad():
        got = model(views, stages=2, guide=guide).fields[0].sparse_features
    assert len(walks) == 6  # 4 routed pairs and 2 windows, for every block of stage 2
    assert relative_error(got, expected) < TOLERANCE[torch.float32]
