"""The decode step as tensor-only modules: what `llmc build` compiles ahead of time.

Every sequence of the batch brings one new token. Inputs are fixed-form tensors (no Python lists),
so torch.export can trace a step once for every batch size and context length: the batch and
the block-table width are the only dynamic dimensions. The KV caches are inputs, one flat
[slots, kv_heads, head_dim] tensor per layer and per K/V, updated in place.

DecodeStep is the whole step. A compiled step is programs of its parts: DecodeLayers, a run of
consecutive decoder layers (runs of the same form share one program, builder/layer_programs.py),
and DecodeLogits, the final norm and the logits; the runtime chains them after the embedding
(runtime/backends/aoti_step.py).
"""

from __future__ import annotations

import torch
from torch import nn

from llmc.model.attention import StepContext
from llmc.model.decoder import CausalLM, head_logits


def _context(
    model: CausalLM,
    block_size: int,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> StepContext:
    return StepContext(
        slot_mapping=slot_mapping,
        block_size=block_size,
        seqs=[],
        block_tables=block_tables,
        context_lens=context_lens,
        attention=model.attention,
    )


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
        ctx = _context(self.model, self.block_size, slot_mapping, block_tables, context_lens)
        pairs = list(zip(kv_caches[0::2], kv_caches[1::2], strict=True))
        hidden = self.model(input_ids, positions, pairs, ctx)
        return self.model.compute_logits(hidden)


class DecodeLayers(nn.Module):
    """Decoder layers [first, first + count) of the decode step. Its parameters are named from the
    run's first layer (`layers.0...`), so that runs of the same form have the same names and one
    compiled program serves them all, each with its own layers' tensors."""

    def __init__(
        self,
        model: CausalLM,
        first: int,
        count: int,
        block_size: int,
        logits: bool = False,
        embed: bool = False,
        embed_select: bool = False,
        logits_select: bool = False,
    ) -> None:
        super().__init__()
        # The step's first run starts from the token ids, by the embedding lookup in its program:
        # with `embed` the ids come in place of the hidden state (a program of that run alone);
        # with `embed_select` beside it, with a flag (a program other runs share, whose calls for
        # them pass the flag unset and keep their input).
        self.embed_tokens = model.model.embed_tokens if embed or embed_select else None
        self.embed_select = embed_select
        self.layers = nn.ModuleList(model.model.layers[first : first + count])
        self.block_size = block_size
        self._model = [model]  # not a submodule: its other weights are not this program's
        # The step's last run may end with the final norm and the logits (one call fewer): with
        # `logits` alone (a program of that run alone), or with `logits_select` where a flag beside
        # its input says (a program other runs share, whose calls for them pass the flag unset and
        # get an unwritten tensor of the logits' shape beside their output).
        self.logits = DecodeLogits(model) if logits or logits_select else None
        self.logits_select = logits_select

    def forward(
        self,
        hidden: torch.Tensor,  # [B, hidden] the run's input in the compute dtype; with embed, [B] token ids
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        kv_caches: list[torch.Tensor],  # k, v of each of the run's layers
        input_ids: torch.Tensor | None = None,  # with embed_select: [B] token ids
        take_ids: torch.Tensor | None = None,  # with embed_select: [1] bool, whether to embed them
        take_logits: torch.Tensor | None = None,  # with logits_select: [1] bool, whether to compute them
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The run's output [B, hidden], the next layer's input; or with `logits`, the float32
        logits [B, vocab]; or with `logits_select`, both (the logits unwritten where the flag is
        unset)."""
        ctx = _context(self._model[0], self.block_size, slot_mapping, block_tables, context_lens)
        if self.embed_select:
            assert input_ids is not None and take_ids is not None
            hidden = torch.where(take_ids, self._model[0].embed(input_ids), hidden)
        elif self.embed_tokens is not None:
            hidden = self._model[0].embed(hidden)
        for layer, k, v in zip(self.layers, kv_caches[0::2], kv_caches[1::2], strict=True):
            hidden = layer(hidden, positions, (k, v), ctx)
        if self.logits is None:
            return hidden
        if not self.logits_select:
            return self.logits(hidden)
        assert take_logits is not None
        # A conditional, not a select: the logits (the lm_head's whole matrix) are computed only in
        # the call that wants them; the others allocate their shape and write nothing.
        logits = torch.cond(take_logits, self.logits, self._no_logits, (hidden,))
        return hidden, logits

    def _no_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_empty((hidden.shape[0], self._model[0].spec.vocab_size), dtype=torch.float32)


class DecodeLogits(nn.Module):
    """The step's end: the final norm and the float32 logits of the last layer's output."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.softcap = model.spec.final_softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_logits(self.lm_head, self.norm(hidden), self.softcap)
