"""Paged attention (batched decode and per-sequence prefill paths) against a naive dense reference."""

from __future__ import annotations

import pytest
import torch

from llmc.kernels.paged_attention import SeqSlice, paged_attention, write_kv


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
