"""The sampler turns one step's logits into one token per sequence, honouring each one's settings."""

from __future__ import annotations

import torch

from llmc.runtime.sampling_params import SamplingParams


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k and top-p cuts, on one row of float32 logits."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p; the first token always stays.
        drop = probs.cumsum(-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


class Sampler:
    def __init__(self, seed: int | None = None) -> None:
        self._generator = torch.Generator()
        if seed is not None:
            self._generator.manual_seed(seed)
        else:
            self._generator.seed()

    def sample(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        out: list[int] = []
        for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
            if p.greedy:
                out.append(int(greedy[row]))
                continue
            probs = _filter(logits[row], p).softmax(-1)
            out.append(int(torch.multinomial(probs, 1, generator=gen or self._generator).item()))
        return out
