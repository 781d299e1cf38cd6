"""Paged attention (batched decode and per-sequence prefill paths) against a naive dense reference."""

from __future__ import annotations

import pytest
import torch

from llmc.kernels.paged_attention import SeqSlice, decode_attention, kernel_takes, paged_attention, write_kv


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """q [Lq, H, D] at positions q_pos; k, v [Lk, Hkv, *] for positions 0..Lk-1; plain softmax math."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    k_pos = torch.arange(k.shape[0])
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= q_pos[:, None] - k_pos[None, :] < window
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).float()


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (7, None), (None, 5.0), (5, 3.0)])
@pytest.mark.parametrize("v_dim", [16, 12])
def test_matches_dense_reference(window: int | None, softcap: float | None, v_dim: int) -> None:
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block, blocks = 4, 2, 16, 4, 64
    k_cache = torch.zeros(blocks * block, kv_heads, dim)
    v_cache = torch.zeros(blocks * block, kv_heads, v_dim)
    free = list(torch.randperm(blocks, generator=gen).tolist())
    # (tokens already cached, new tokens this step): decodes, a prefill, a prefill chunk, a one-token prompt
    shapes = [(9, 1), (0, 13), (20, 1), (6, 5), (0, 1), (31, 1)]
    seqs, queries, refs = [], [], []
    start = 0
    for cached, new in shapes:
        total = cached + new
        table = torch.tensor([free.pop() for _ in range(-(-total // block))])
        k = torch.randn(total, kv_heads, dim, generator=gen)
        v = torch.randn(total, kv_heads, v_dim, generator=gen)
        slots = torch.tensor([int(table[p // block]) * block + p % block for p in range(total)])
        write_kv(k_cache, v_cache, k, v, slots)
        q = torch.randn(new, heads, dim, generator=gen)
        seqs.append(SeqSlice(query_start=start, query_len=new, context_len=total, block_table=table))
        queries.append(q)
        refs.append(_reference(q, k, v, 0.25, torch.arange(cached, total), window, softcap))
        start += new
    got = paged_attention(torch.cat(queries), k_cache, v_cache, block, seqs, 0.25, window, softcap)
    torch.testing.assert_close(got, torch.cat(refs), atol=1e-5, rtol=1e-5)


def _decode_case(
    gen: torch.Generator, lengths: list[int], heads: int = 6, kv_heads: int = 2, dim: int = 64, v_dim: int = 64
) -> tuple[torch.Tensor, ...]:
    """A random cache with one shuffled block table per sequence, and one query per sequence."""
    block, blocks = 4, 96
    k_cache = torch.randn(blocks * block, kv_heads, dim, generator=gen)
    v_cache = torch.randn(blocks * block, kv_heads, v_dim, generator=gen)
    width = max(-(-n // block) for n in lengths) + 1  # one padding column, pointing anywhere
    order = torch.randperm(blocks, generator=gen)
    tables = order[: len(lengths) * width].view(len(lengths), width)
    q = torch.randn(len(lengths), heads, dim, generator=gen)
    return q, k_cache, v_cache, tables, torch.tensor(lengths)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(6, 2, 64), (8, 8, 128), (16, 2, 64)])
def test_cpu_kernel_matches_the_torch_decode_attention(
    cpu_kernels_loaded: None, window: int | None, heads: int, kv_heads: int, dim: int
) -> None:
    gen = torch.Generator().manual_seed(1)
    q, k_cache, v_cache, tables, lens = _decode_case(gen, [1, 7, 16, 33, 40], heads, kv_heads, dim, dim)
    expected = decode_attention(q, k_cache, v_cache, 4, tables, lens, 0.2, window)
    got = decode_attention(q, k_cache, v_cache, 4, tables, lens, 0.2, window, cpu_kernel=True)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_cpu_kernel_gives_a_sequence_the_same_bits_in_any_batch(cpu_kernels_loaded: None) -> None:
    q, k_cache, v_cache, tables, lens = _decode_case(torch.Generator().manual_seed(2), [40, 33, 37, 5])
    full = decode_attention(q, k_cache, v_cache, 4, tables, lens, 0.2, cpu_kernel=True)
    for row in range(4):
        alone = decode_attention(
            q[row : row + 1], k_cache, v_cache, 4, tables[row : row + 1], lens[row : row + 1], 0.2, cpu_kernel=True
        )
        assert torch.equal(alone[0], full[row])


def test_cpu_kernel_is_not_taken_where_it_does_not_apply(cpu_kernels_loaded: None) -> None:
    q, k_cache, v_cache, tables, lens = _decode_case(torch.Generator().manual_seed(3), [9, 3])
    expected = decode_attention(q, k_cache, v_cache, 4, tables, lens, 0.2, softcap=4.0)
    got = decode_attention(q, k_cache, v_cache, 4, tables, lens, 0.2, softcap=4.0, cpu_kernel=True)
    assert torch.equal(got, expected)  # soft-capping: the torch path
    assert kernel_takes(q, k_cache, v_cache, None)
    for dims in ((32, 32), (64, 48)):  # head dims it is not built for
        q, k_cache, v_cache, tables, lens = _decode_case(torch.Generator().manual_seed(4), [9, 3], 6, 2, *dims)
        assert not kernel_takes(q, k_cache, v_cache, None)
    q, k_cache, v_cache, tables, lens = _decode_case(torch.Generator().manual_seed(4), [9, 3], 18, 2)
    assert not kernel_takes(q, k_cache, v_cache, None)  # 9 query heads per KV head


def test_cpu_kernel_refuses_lengths_and_blocks_outside_the_cache(cpu_kernels_loaded: None) -> None:
    q, k_cache, v_cache, tables, lens = _decode_case(torch.Generator().manual_seed(5), [9, 3])
    with pytest.raises(RuntimeError, match="outside its table"):
        torch.ops.llmc.paged_decode_attention(q, k_cache, v_cache, tables, lens * 100, 4, 0.2, 0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.llmc.paged_decode_attention(q, k_cache, v_cache, tables + 1000, lens, 4, 0.2, 0)


def test_cpu_kernel_refuses_a_block_id_whose_slot_would_overflow(cpu_kernels_loaded: None) -> None:
    q, k_cache, v_cache, tables, lens = _decode_case(torch.Generator().manual_seed(6), [9, 3])
    tables[0, 0] = 1 << 60  # times the block size, this wraps to a small slot in int64
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.llmc.paged_decode_attention(q, k_cache, v_cache, tables, lens, 4, 0.2, 0)
