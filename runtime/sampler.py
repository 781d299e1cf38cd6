"""The sampler turns one step's logits into one token per sequence, honouring each one's settings.

Order, as in vLLM: logit_bias and penalties on the raw logits; then greedy argmax, or
temperature, min_p, top_k and top_p cuts and a draw. A sequence with a seed draws from its own
generator, so its text does not depend on what else is in the batch. Logprobs are of the model's
raw distribution (log_softmax of its logits), as OpenAI reports them.

It works on numpy arrays, so every backend (torch's or onnxruntime's) shares it and the serving
path needs no torch: a step's logits are a few KiB to a few MiB, and numpy on them costs far less
than the model step that made them.

A row that cannot be sampled (the model's logits hold NaN or inf, a grammar raises, no token is
left allowed) fails only its own sequence: `sample` reports it instead of raising, so one request
never takes the rest of the batch down with it.
"""

from __future__ import annotations

import numpy as np

from llmc.logs import get_logger
from llmc.runtime.sampling_params import SamplingParams, TokenLogprob
from llmc.runtime.sequence import Sequence, make_generator

log = get_logger("llmc.sampler")

FAILED = -1  # the token `sample` reports for a row that failed; never a vocabulary id
NON_FINITE_LOGITS = "the model produced non-finite logits (NaN or inf) for this request"
_NEG_INF = np.float32(-np.inf)


class RowError(Exception):
    """One row cannot be sampled; its message is what the request's client is told."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in the logits' dtype (NaN where a row's maximum is not finite)."""
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log(softmax) over the last axis, in float32: the max subtracted, then log-sum-exp (NaN
    where a row's maximum is not finite; callers skip such rows, so numpy need not warn)."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        shifted = logits.astype(np.float32, copy=False) - logits.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def apply_penalties(logits: np.ndarray, seq: Sequence) -> np.ndarray:
    """Repetition, presence and frequency penalties on one row, in place."""
    params = seq.params
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.asarray(seq.token_ids, dtype=np.int64))
        picked = logits[seen]
        logits[seen] = np.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and seq.output_ids:
        vocab = logits.shape[-1]
        counts = np.bincount(np.asarray(seq.output_ids, dtype=np.int64), minlength=vocab)[:vocab].astype(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).astype(logits.dtype)
    return logits


def filter_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, then min-p, top-k and top-p cuts, on one row of float32 logits (a new array)."""
    logits = (logits / params.temperature).astype(np.float32, copy=False)
    if params.min_p > 0.0:
        probs = softmax(logits)
        logits = np.where(probs < params.min_p * probs.max(), _NEG_INF, logits)
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        top = np.argpartition(logits, vocab - params.top_k)[vocab - params.top_k :]
        kth = logits[top].min()  # the k-th largest logit; ties with it stay, as with torch.topk
        logits = np.where(logits < kth, _NEG_INF, logits)
    if params.top_p < 1.0:
        order = np.argsort(-logits)  # numpy's default sort: ~7x faster than a stable one here
        sorted_logits = logits[order]
        probs = softmax(sorted_logits)
        # Drop a token when the mass before it already reaches top_p; the first token always stays
        # (said outright: a top_p below float32's smallest value compares as 0 with the mass
        # before the first token, 0, and would drop it too).
        drop = np.cumsum(probs) - probs >= params.top_p
        drop[0] = False
        sorted_logits[drop] = _NEG_INF
        logits = np.empty_like(logits)
        logits[order] = sorted_logits
    return logits


def draw(probs: np.ndarray, generator: np.random.Generator) -> int:
    """One token from a row of probabilities (they need not sum to exactly 1): inverse CDF."""
    cdf = np.cumsum(probs, dtype=np.float64)
    token = int(np.searchsorted(cdf, generator.random() * cdf[-1], side="right"))
    if token >= len(cdf):  # the uniform rounded up to the total: the last token with any mass
        token = int(np.flatnonzero(probs)[-1])
    return token


class Sampler:
    def __init__(self, seed: int | None = None) -> None:
        # Rows without a seed of their own draw from this one (seeded from the OS without `seed`).
        self._generator = make_generator(seed) if seed is not None else np.random.default_rng()

    def sample(
        self, logits: np.ndarray, seqs: list[Sequence]
    ) -> tuple[list[int], list[TokenLogprob | None], dict[int, str]]:
        """logits: [len(seqs), vocab] float32. Returns one token and its logprobs (if asked) per
        sequence, and {row: reason} for the rows that failed (their token is FAILED)."""
        # Overflow and NaN are expected (and handled per row) here: numpy's warnings would be noise.
        with np.errstate(all="ignore"):
            return self._sample(logits, seqs)

    def _sample(
        self, logits: np.ndarray, seqs: list[Sequence]
    ) -> tuple[list[int], list[TokenLogprob | None], dict[int, str]]:
        # A row's sum is finite exactly when all its logits are (they are far below float32's max):
        # one reduction for the batch rather than an elementwise check.
        finite = np.isfinite(logits.sum(-1)).tolist()
        failed: dict[int, str] = {row: NON_FINITE_LOGITS for row, ok in enumerate(finite) if not ok}
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
        for row, seq in enumerate(seqs):
            if seq.params.logprobs is not None and row not in failed:
                logprobs[row] = token_logprob(log_softmax(logits[row]), tokens[row], seq.params.logprobs)
        return tokens, logprobs, failed

    def _sample_row(self, row_logits: np.ndarray, seq: Sequence) -> int:
        params = seq.params
        if params.logit_bias or params.has_penalties:
            row_logits = row_logits.copy()
            for token, bias in params.logit_bias:
                row_logits[token] += bias
            apply_penalties(row_logits, seq)
        if seq.constraint is not None:
            row_logits = np.where(seq.constraint.allowed(), row_logits, _NEG_INF)
        if params.greedy:
            if not np.isfinite(row_logits.max()):
                raise RowError("no token can be sampled: every token is ruled out or its logit overflowed")
            token = int(row_logits.argmax())
        else:
            probs = softmax(filter_logits(row_logits, params))
            if not np.isfinite(probs).all() or not float(probs.sum()) > 0.0:
                raise RowError("no token can be sampled: the settings leave no finite probability")
            token = draw(probs, seq.generator or self._generator)
        if seq.constraint is not None:
            seq.constraint.accept(token)
        return token


def token_logprob(logprobs: np.ndarray, token: int, k: int) -> TokenLogprob:
    """One position's logprob of `token` and its `k` most likely alternatives (most likely first),
    from one row of log_softmax output."""
    pairs: list[tuple[int, float]] = []
    k = min(k, logprobs.shape[-1])
    if k > 0:
        top = np.argpartition(-logprobs, k - 1)[:k]
        top = top[np.argsort(-logprobs[top], kind="stable")]
        pairs = [(int(i), float(logprobs[i])) for i in top]
    return TokenLogprob(token_id=token, logprob=float(logprobs[token]), top=pairs)
