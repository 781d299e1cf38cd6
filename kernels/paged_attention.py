"""Attention over a paged KV cache: plain-torch path (the CPU path and the reference).

The cache of one layer is a pair of tensors shaped [num_blocks, block_size, num_kv_heads, head_dim].
A sequence's keys live in the blocks its block table lists, in order; token `t` of the sequence is
at block `table[t // block_size]`, offset `t % block_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SeqSlice:
    """One sequence's part of a flattened step."""

    query_start: int  # offset of its first new token in the step's flattened tokens
    query_len: int  # new tokens this step (a prefill chunk, or 1 when decoding)
    context_len: int  # tokens in its cache after this step, the new ones included
    block_table: torch.Tensor  # int64 block ids, at least ceil(context_len / block_size) of them


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the step's new keys/values ([N, kv_heads, head_dim]) at flat slots block*block_size+offset."""
    k_cache.flatten(0, 1).index_copy_(0, slot_mapping, k)
    v_cache.flatten(0, 1).index_copy_(0, slot_mapping, v)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """The first `context_len` cached entries of one sequence: [context_len, kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-context_len // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks])
    return blocks.flatten(0, 1)[:context_len]


def _decode_batched(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqs: list[SeqSlice],
    scale: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """One query per sequence: gather every sequence's blocks into one padded batch and attend in
    a single call, instead of one call per sequence. Returns [len(seqs), heads, v_dim]."""
    block_size = k_cache.shape[1]
    lengths = torch.tensor([s.context_len for s in seqs])
    max_blocks = -(-int(lengths.max()) // block_size)
    tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int64)  # padding points at block 0, masked below
    for row, seq in enumerate(seqs):
        used = -(-seq.context_len // block_size)
        tables[row, :used] = seq.block_table[:used]
    keys = k_cache[tables].flatten(1, 2).transpose(1, 2)  # [B, Hkv, L, D]
    values = v_cache[tables].flatten(1, 2).transpose(1, 2)
    group = q.shape[1] // k_cache.shape[2]
    positions = torch.arange(keys.shape[2]).unsqueeze(0)
    mask = positions < lengths.unsqueeze(1)
    if window is not None:
        mask &= positions >= (lengths - window).unsqueeze(1)
    mask = mask[:, None, None, :]  # [B, 1, 1, L]
    queries = q[[s.query_start for s in seqs]].unsqueeze(2)  # [B, H, 1, D]
    if softcap is None:
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=group > 1)
    else:
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * scale
        scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~mask, float("-inf"))
        out = torch.matmul(scores.softmax(-1).to(values.dtype), values)
    return out.squeeze(2)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqs: list[SeqSlice],
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of the new queries ([N, heads, head_dim]) over each sequence's cache.

    `window`: a query sees only the last `window` positions, itself included (sliding window).
    `softcap`: scores become softcap * tanh(scores / softcap) before the softmax (Gemma-2).
    """
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])  # values may be narrower (MLA)
    num_heads = q.shape[1]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    decoding = [s for s in seqs if s.query_len == 1]
    if len(decoding) > 1:
        rows = torch.tensor([s.query_start for s in decoding])
        out[rows] = _decode_batched(q, k_cache, v_cache, decoding, scale, window, softcap)
    for seq in seqs:
        if seq.query_len == 1 and len(decoding) > 1:
            continue
        qs = q[seq.query_start : seq.query_start + seq.query_len].transpose(0, 1)  # [H, Lq, D]
        keys = gather_kv(k_cache, seq.block_table, seq.context_len).transpose(0, 1)  # [Hkv, Lk, D]
        values = gather_kv(v_cache, seq.block_table, seq.context_len).transpose(0, 1)
        mask = None
        if seq.query_len > 1 or (window is not None and seq.context_len > window):
            # Query i sits at position context_len - query_len + i and sees keys up to it.
            q_pos = torch.arange(seq.context_len - seq.query_len, seq.context_len).unsqueeze(1)
            k_pos = torch.arange(seq.context_len).unsqueeze(0)
            mask = k_pos <= q_pos
            if window is not None:
                mask &= q_pos - k_pos < window
        if softcap is None:
            # 4-D inputs: torch's fused CPU attention kernel takes them; 3-D ones fall back to the
            # unfused math path (measured: ~5x slower per call, a third of a SmolLM2 decode step).
            attended = F.scaled_dot_product_attention(
                qs[None], keys[None], values[None], attn_mask=mask, scale=scale, enable_gqa=group > 1
            )[0]
        else:
            keys, values = keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0)
            scores = torch.matmul(qs, keys.transpose(-1, -2)).float() * scale
            scores = softcap * torch.tanh(scores / softcap)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            attended = torch.matmul(scores.softmax(-1).to(values.dtype), values)
        out[seq.query_start : seq.query_start + seq.query_len] = attended.transpose(0, 1)
    return out
