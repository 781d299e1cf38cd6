"""The sampler turns one step's logits into one token per sequence, honouring each one's settings.

Order, as in vLLM: logit_bias and penalties on the raw logits; then greedy argmax, or
temperature, min_p, top_k and top_p cuts and a draw. A sequence with a seed draws from its own
generator, so its text does not depend on what else is in the batch. Logprobs are of the model's
raw distribution (log_softmax of its logits), as OpenAI reports them.

A row that cannot be sampled (the model's logits hold NaN or inf, a grammar raises, no token is
left allowed) fails only its own sequence: `sample` reports it instead of raising, so one request
never takes the rest of the batch down with it.
"""

from __future__ import annotations

import torch

from llmc.logs import get_logger
from llmc.runtime.sampling_params import SamplingParams, TokenLogprob
from llmc.runtime.sequence import Sequence

log = get_logger("llmc.sampler")

FAILED = -1  # the token `sample` reports for a row that failed; never a vocabulary id
NON_FINITE_LOGITS = "the model produced non-finite logits (NaN or inf) for this request"


class RowError(Exception):
    """One row cannot be sampled; its message is what the request's client is told."""


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    params = seq.params
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.int64)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and seq.output_ids:
        counts = torch.bincount(torch.tensor(seq.output_ids, dtype=torch.int64), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then min-p, top-k and top-p cuts, on one row of float32 logits."""
    logits = logits / params.temperature
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if 0 < params.top_k < logits.shape[-1]:
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
        self, logits: torch.Tensor, seqs: list[Sequence]
    ) -> tuple[list[int], list[TokenLogprob | None], dict[int, str]]:
        """logits: [len(seqs), vocab] float32. Returns one token and its logprobs (if asked) per
        sequence, and {row: reason} for the rows that failed (their token is FAILED)."""
        # A row's sum is finite exactly when all its logits are (they are far below float32's max):
        # one reduction for the batch rather than an elementwise check.
        finite = torch.isfinite(logits.sum(-1)).tolist()
        failed: dict[int, str] = {row: NON_FINITE_LOGITS for row, ok in enumerate(finite) if not ok}
        raw_logprobs = logits.log_softmax(-1) if any(s.params.logprobs is not None for s in seqs) else None
        # Plain greedy rows (most of a busy batch) take one argmax call for the whole batch.
        plain = [s.params.greedy and not (s.params.logit_bias or s.params.has_penalties or s.constraint) for s in seqs]
        argmax = logits.argmax(-1).tolist() if any(plain) else []
        tokens: list[int] = []
        for row, seq in enumerate(seqs):
            if row in failed:
                tokens.append(FAILED)
            elif plain[row]:
                tokens.append(argmax[row])
            else:
                try:
                    tokens.append(self._sample_row(logits[row], seq))
                except RowError as exc:
                    failed[row] = str(exc)
                    tokens.append(FAILED)
                except Exception as exc:  # a grammar or a bug: this request fails, the batch goes on
                    log.exception("sampler.row_failed", request_id=seq.request_id, error=type(exc).__name__)
                    failed[row] = f"internal error while sampling ({type(exc).__name__}); see the server log"
                    tokens.append(FAILED)
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            for row, seq in enumerate(seqs):
                if seq.params.logprobs is not None and row not in failed:
                    logprobs[row] = token_logprob(raw_logprobs[row], tokens[row], seq.params.logprobs)
        return tokens, logprobs, failed

    def _sample_row(self, row_logits: torch.Tensor, seq: Sequence) -> int:
        params = seq.params
        if params.logit_bias or params.has_penalties:
            row_logits = row_logits.clone()
            for token, bias in params.logit_bias:
                row_logits[token] += bias
            apply_penalties(row_logits, seq)
        if seq.constraint is not None:
            row_logits = row_logits.masked_fill(~seq.constraint.allowed(), float("-inf"))
        if params.greedy:
            if not bool(torch.isfinite(row_logits.max())):
                raise RowError("no token can be sampled: every token is ruled out or its logit overflowed")
            token = int(row_logits.argmax())
        else:
            probs = filter_logits(row_logits, params).softmax(-1)
            if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0.0:
                raise RowError("no token can be sampled: the settings leave no finite probability")
            generator = seq.generator or self._generator
            token = int(torch.multinomial(probs, 1, generator=generator).item())
        if seq.constraint is not None:
            seq.constraint.accept(token)
        return token


def token_logprob(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """One position's logprob of `token` and its `k` most likely alternatives, from log_softmax output."""
    top = torch.topk(logprobs, k) if k > 0 else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    return TokenLogprob(token_id=token, logprob=float(logprobs[token]), top=pairs)
