"""Attention layers over the paged KV cache: grouped-query attention and DeepSeek's multi-head
latent attention (MLA). How attention is computed (torch's paths or a device kernel) is the
device's choice, handed in through StepContext.attention (kernels/paged_attention.py's
PagedAttention, or a device's subclass of it); the layers only project, rotate, store keys and
values, and call it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llmc.artifacts.manifest import ModelSpec
from llmc.kernels.paged_attention import PagedAttention, SeqSlice, write_kv
from llmc.model.layers import RMSNorm, make_norm
from llmc.model.quant_linear import FusedQuantLinear
from llmc.model.rope import RotaryEmbedding


@dataclass
class StepContext:
    """What attention needs to know about one step's flattened batch.

    Two forms: `seqs` describes any mix of prefill chunks and decodes (eager only); the decode
    form, `block_tables` and `context_lens` with one new token per sequence, is all tensors so
    that the compiled decode step can trace it.
    """

    slot_mapping: torch.Tensor  # [N] int64 cache slot for each new token
    block_size: int
    seqs: list[SeqSlice]
    rope_long: torch.Tensor | None = None  # [N] bool: longrope's long factors apply (Phi-3)
    block_tables: torch.Tensor | None = None  # decode form: [N, max blocks] int64
    context_lens: torch.Tensor | None = None  # decode form: [N] int64, the new token included
    attention: PagedAttention = field(default_factory=PagedAttention)  # the device's (torch's by default)

    def attend(
        self,
        q: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        k_cache, v_cache = kv
        if self.block_tables is not None:
            assert self.context_lens is not None
            return self.attention.decode(
                q, k_cache, v_cache, self.block_size, self.block_tables, self.context_lens, scale, window, softcap
            )
        return self.attention.mixed(q, k_cache, v_cache, self.block_size, self.seqs, scale, window, softcap)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, rope: RotaryEmbedding, sliding: bool) -> None:
        super().__init__()
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.scale = spec.attn_scale if spec.attn_scale is not None else spec.head_dim**-0.5
        self.window = spec.sliding_window if sliding else None
        self.softcap = spec.attn_softcap
        self.q_proj = nn.Linear(spec.hidden_size, spec.num_heads * spec.head_dim, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * spec.head_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * spec.head_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, spec.hidden_size, bias=spec.o_bias)
        self.q_norm = make_norm(spec, spec.head_dim) if spec.qk_norm else None
        self.k_norm = make_norm(spec, spec.head_dim) if spec.qk_norm else None
        self.rope = rope
        self.qkv: FusedQuantLinear | None = None  # q/k/v as one matmul (fuse_projections)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        ctx: StepContext,
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x) if self.qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(positions, q, k, ctx.rope_long)
        write_kv(kv[0], kv[1], k, v, ctx.slot_mapping)
        out = ctx.attend(q, kv, self.scale, self.window, self.softcap)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values come from a low-rank latent,
    and only qk_rope_head_dim channels carry position. The cache holds the expanded per-head keys
    (nope + rope channels) and values (v_head_dim channels)."""

    def __init__(self, spec: ModelSpec, rope: RotaryEmbedding) -> None:
        super().__init__()
        heads, hidden = spec.num_heads, spec.hidden_size
        self.num_heads = heads
        self.nope, self.rope_dim, self.v_dim = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
        self.kv_lora_rank = spec.kv_lora_rank
        self.scale = spec.attn_scale if spec.attn_scale is not None else spec.head_dim**-0.5
        qk = self.nope + self.rope_dim
        bias = spec.qkv_bias
        self.q_proj = nn.Linear(hidden, heads * qk, bias=False) if not spec.q_lora_rank else None
        self.q_a_proj = nn.Linear(hidden, spec.q_lora_rank, bias=bias) if spec.q_lora_rank else None
        self.q_a_layernorm = RMSNorm(spec.q_lora_rank, spec.rms_norm_eps) if spec.q_lora_rank else None
        self.q_b_proj = nn.Linear(spec.q_lora_rank, heads * qk, bias=False) if spec.q_lora_rank else None
        self.kv_a_proj_with_mqa = nn.Linear(hidden, spec.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(spec.kv_lora_rank, spec.rms_norm_eps)
        self.kv_b_proj = nn.Linear(spec.kv_lora_rank, heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_dim, hidden, bias=spec.o_bias)
        self.rope = rope

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        ctx: StepContext,
    ) -> torch.Tensor:
        n, heads = x.shape[0], self.num_heads
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            assert self.q_a_proj is not None and self.q_a_layernorm is not None and self.q_b_proj is not None
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(n, heads, self.nope + self.rope_dim)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        expanded = self.kv_b_proj(self.kv_a_layernorm(latent)).view(n, heads, self.nope + self.v_dim)
        k_nope, v = expanded.split([self.nope, self.v_dim], dim=-1)
        q_rot, k_rot = self.rope(positions, q[..., self.nope :], k_rot.view(n, 1, self.rope_dim), ctx.rope_long)
        q = torch.cat([q[..., : self.nope], q_rot], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(n, heads, self.rope_dim)], dim=-1)
        write_kv(kv[0], kv[1], k, v.contiguous(), ctx.slot_mapping)
        out = ctx.attend(q, kv, self.scale)
        return self.o_proj(out.reshape(n, heads * self.v_dim))
