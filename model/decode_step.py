"""The decode step as one tensor-only module: what `llmc build` compiles ahead of time.

Every sequence of the batch brings one new token. Inputs are fixed-form tensors (no Python lists),
so torch.export can trace the step once for every batch size and context length: the batch and
the block-table width are the only dynamic dimensions. The KV caches are inputs, one flat
[slots, kv_heads, head_dim] tensor per layer and per K/V, updated in place.
"""

from __future__ import annotations

import torch
from torch import nn

from llmc.model.attention import StepContext
from llmc.model.decoder import CausalLM


class DecodeStep(nn.Module):
    def __init__(self, model: CausalLM, block_size: int) -> None:
        super().__init__()
        self.model = model
        self.block_size = block_size

    def forward(
        self,
        input_ids: torch.Tensor,  # [B] int64
        positions: torch.Tensor,  # [B] int64
        slot_mapping: torch.Tensor,  # [B] int64, where each new token's key and value go
        block_tables: torch.Tensor,  # [B, max blocks] int64
        context_lens: torch.Tensor,  # [B] int64, the new token included
        kv_caches: list[torch.Tensor],  # k0, v0, k1, v1, ...
    ) -> torch.Tensor:
        """Float32 logits [B, vocab] of each sequence's next token."""
        ctx = StepContext(
            slot_mapping=slot_mapping,
            block_size=self.block_size,
            seqs=[],
            block_tables=block_tables,
            context_lens=context_lens,
            attention=self.model.attention,
        )
        pairs = list(zip(kv_caches[0::2], kv_caches[1::2], strict=True))
        hidden = self.model(input_ids, positions, pairs, ctx)
        return self.model.compute_logits(hidden)
