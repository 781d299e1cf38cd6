"""Attention over a paged KV cache: plain-torch path (the CPU path and the reference).

The cache of one layer is a pair of flat tensors shaped [num_slots, num_kv_heads, head_dim], read as
num_slots / block_size blocks. A sequence's keys live in the blocks its block table lists, in order;
token `t` of the sequence is at slot `table[t // block_size] * block_size + t % block_size`. The
cache is flat so that a compiled step can update it in place with one `index_copy_` on its input
(a write through a reshaped view of an input compiles into a copy of the whole cache).

`decode_attention` is the tensor-only form (one new token per sequence, fixed-shape inputs) that the
ahead-of-time compiled decode step traces; `paged_attention` handles any mix of prefill chunks and
decodes, eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# What kernels/cpu/paged_attention_cpu.cpp is compiled for (its accumulators live in registers).
_KERNEL_HEAD_DIMS = (64, 128)
_KERNEL_MAX_GROUP = 8


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
    """Store the step's new keys/values ([N, kv_heads, head_dim]) at their slots."""
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


def _blocks(cache: torch.Tensor, block_size: int) -> torch.Tensor:
    return cache.view(-1, block_size, *cache.shape[1:])


def gather_kv(cache: torch.Tensor, block_size: int, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """The first `context_len` cached entries of one sequence: [context_len, kv_heads, head_dim]."""
    num_blocks = -(-context_len // block_size)
    blocks = _blocks(cache, block_size).index_select(0, block_table[:num_blocks])
    return blocks.flatten(0, 1)[:context_len]


def block_tables_tensor(seqs: list[SeqSlice], block_size: int) -> torch.Tensor:
    """The sequences' block tables as one [B, max blocks] tensor; padding points at block 0 (masked)."""
    max_blocks = max(-(-s.context_len // block_size) for s in seqs)
    tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int64)
    for row, seq in enumerate(seqs):
        used = -(-seq.context_len // block_size)
        tables[row, :used] = seq.block_table[:used]
    return tables


def kernel_takes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, softcap: float | None) -> bool:
    """Whether llmc's CPU decode attention kernel covers this call: float32 on the CPU, keys and
    values of one head dimension it is built for, at most _KERNEL_MAX_GROUP query heads per KV
    head, no soft-capping."""
    tensors = (q, k_cache, v_cache)
    return (
        softcap is None
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and q.shape[-1] == v_cache.shape[-1] in _KERNEL_HEAD_DIMS
        and q.shape[1] % k_cache.shape[1] == 0
        and q.shape[1] // k_cache.shape[1] <= _KERNEL_MAX_GROUP
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_size: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    cpu_kernel: bool = False,
) -> torch.Tensor:
    """One query per sequence (q [B, heads, head_dim]) over its first context_lens[b] cached
    entries, all sequences in one padded call. block_tables [B, max blocks] int64; entries past a
    sequence's length may point at any valid block. Returns [B, heads, v_dim]. `cpu_kernel`: llmc's
    CPU kernel library is loaded (kernels/cpu/cpu_kernels.py); its kernel reads the cache in place and
    gives each sequence the same numbers in any batch, and this function is its reference."""
    if cpu_kernel and kernel_takes(q, k_cache, v_cache, softcap):
        out: torch.Tensor = torch.ops.llmc.paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, block_size, scale, window or 0
        )
        return out
    # Gather by slot, not by block: the cache is read without reshaping it into blocks, which
    # keeps its length a free dimension when the step is traced (a multiple-of-block_size length
    # made export's shape reasoning take minutes).
    offsets = torch.arange(block_size, device=block_tables.device)
    slots = (block_tables.unsqueeze(-1) * block_size + offsets).flatten(1)  # [B, L]
    keys = k_cache[slots].transpose(1, 2)  # [B, Hkv, L, D]
    values = v_cache[slots].transpose(1, 2)
    group = q.shape[1] // k_cache.shape[1]
    positions = torch.arange(keys.shape[2], device=q.device).unsqueeze(0)
    lengths = context_lens.unsqueeze(1)
    mask = positions < lengths
    if window is not None:
        mask &= positions >= lengths - window
    mask = mask[:, None, None, :]  # [B, 1, 1, L]
    queries = q.unsqueeze(2)  # [B, H, 1, D]
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
    block_size: int,
    seqs: list[SeqSlice],
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    cpu_kernel: bool = False,
) -> torch.Tensor:
    """Causal attention of the new queries ([N, heads, head_dim]) over each sequence's cache.

    `window`: a query sees only the last `window` positions, itself included (sliding window).
    `softcap`: scores become softcap * tanh(scores / softcap) before the softmax (Gemma-2).
    """
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])  # values may be narrower (MLA)
    num_heads = q.shape[1]
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    decoding = [s for s in seqs if s.query_len == 1]
    if decoding:  # the same code as the compiled decode step, so that both give equal numbers
        rows = torch.tensor([s.query_start for s in decoding])
        lengths = torch.tensor([s.context_len for s in decoding])
        tables = block_tables_tensor(decoding, block_size)
        out[rows] = decode_attention(
            q[rows], k_cache, v_cache, block_size, tables, lengths, scale, window, softcap, cpu_kernel
        )
    for seq in seqs:
        if seq.query_len == 1:
            continue
        qs = q[seq.query_start : seq.query_start + seq.query_len].transpose(0, 1)  # [H, Lq, D]
        keys = gather_kv(k_cache, block_size, seq.block_table, seq.context_len).transpose(0, 1)  # [Hkv, Lk, D]
        values = gather_kv(v_cache, block_size, seq.block_table, seq.context_len).transpose(0, 1)
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


@dataclass(frozen=True)
class PagedAttention:
    """The attention implementation a model computes with (model/attention.py's StepContext): the
    torch paths above, with llmc's CPU decode kernel where `cpu_kernel` (its library is loaded).
    The device chooses it (runtime/backends/, the builder's target), the model only calls it; a
    device with kernels of its own overrides `decode` and `mixed` in a subclass."""

    cpu_kernel: bool = False

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_size: int,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
        window: int | None,
        softcap: float | None,
    ) -> torch.Tensor:
        return decode_attention(
            q, k_cache, v_cache, block_size, block_tables, context_lens, scale, window, softcap, self.cpu_kernel
        )

    def mixed(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_size: int,
        seqs: list[SeqSlice],
        scale: float,
        window: int | None,
        softcap: float | None,
    ) -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, block_size, seqs, scale, window, softcap, self.cpu_kernel)
