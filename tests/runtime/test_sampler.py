"""The sampler fails only the row that cannot be sampled; every other row gets its usual token."""

from __future__ import annotations

import torch

from llmc.runtime.sampler import FAILED, NON_FINITE_LOGITS, Sampler
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import Sequence
from llmc.runtime.structured_output import Constraint

VOCAB = 32
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
SEEDED = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7)


class _FakeConstraint(Constraint):
    """A grammar that allows `allowed` tokens and raises on accept when `raise_on_accept`."""

    def __init__(self, allowed: torch.Tensor, raise_on_accept: bool = False) -> None:
        self._mask = allowed
        self._raise = raise_on_accept

    def allowed(self) -> torch.Tensor:
        return self._mask

    def accept(self, token: int) -> None:
        if self._raise:
            raise RuntimeError("grammar engine exploded")


def _logits(rows: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0))


def _seq(params: SamplingParams, constraint: Constraint | None = None) -> Sequence:
    seq = Sequence("r", [1, 2, 3], params)
    seq.constraint = constraint
    return seq


def _expected(logits: torch.Tensor, params: list[SamplingParams]) -> list[int]:
    """What each row samples alone, in a batch of one healthy row."""
    return [Sampler(0).sample(logits[row : row + 1], [_seq(p)])[0][0] for row, p in enumerate(params)]


def test_non_finite_logits_row_fails_only_that_sequence() -> None:
    logits = _logits(4)
    params = [GREEDY, SEEDED, GREEDY, SEEDED]
    expected = _expected(logits, params)
    logits[1, 5] = float("nan")
    logits[2, 9] = float("inf")
    tokens, logprobs, failed = Sampler(0).sample(logits, [_seq(p) for p in params])
    assert failed == {1: NON_FINITE_LOGITS, 2: NON_FINITE_LOGITS}
    assert tokens == [expected[0], FAILED, FAILED, expected[3]]
    assert logprobs == [None] * 4


def test_logprobs_skip_failed_rows() -> None:
    logits = _logits(2)
    logits[0, 0] = float("-inf")
    with_logprobs = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2)
    tokens, logprobs, failed = Sampler(0).sample(logits, [_seq(with_logprobs), _seq(with_logprobs)])
    assert list(failed) == [0]
    assert logprobs[0] is None
    assert logprobs[1] is not None and logprobs[1].token_id == tokens[1] == int(logits[1].argmax())


def test_grammar_that_raises_fails_only_its_sequence() -> None:
    logits = _logits(3)
    expected = _expected(logits, [GREEDY, GREEDY, SEEDED])
    raising = _FakeConstraint(torch.ones(VOCAB, dtype=torch.bool), raise_on_accept=True)
    seqs = [_seq(GREEDY), _seq(GREEDY, raising), _seq(SEEDED)]
    tokens, _, failed = Sampler(0).sample(logits, seqs)
    assert list(failed) == [1]
    assert "RuntimeError" in failed[1]
    assert tokens == [expected[0], FAILED, expected[2]]


def test_grammar_that_allows_nothing_fails_only_its_sequence() -> None:
    logits = _logits(3)
    expected = _expected(logits, [GREEDY, GREEDY, SEEDED])
    nothing = _FakeConstraint(torch.zeros(VOCAB, dtype=torch.bool))
    for params in (GREEDY, SEEDED):
        tokens, _, failed = Sampler(0).sample(logits, [_seq(GREEDY), _seq(params, nothing), _seq(SEEDED)])
        assert list(failed) == [1]
        assert "no token can be sampled" in failed[1]
        assert tokens == [expected[0], FAILED, expected[2]]


def test_overflowing_penalty_fails_only_its_sequence() -> None:
    """The API refuses repetition_penalty 1e-300; the sampler still must not let it hurt others."""
    logits = _logits(2)
    logits[1, 1] = 5.0  # a seen (prompt) token with a positive logit: divided by 1e-300 -> inf
    expected = _expected(logits, [SEEDED])
    for temperature in (0.0, 0.7):
        extreme = SamplingParams(max_tokens=8, temperature=temperature, repetition_penalty=1e-300)
        tokens, _, failed = Sampler(0).sample(logits, [_seq(SEEDED), _seq(extreme)])
        assert list(failed) == [1]
        assert tokens == [expected[0], FAILED]


def test_healthy_batch_reports_no_failures() -> None:
    logits = _logits(3)
    params = [GREEDY, SEEDED, SamplingParams(max_tokens=8, temperature=1.0, repetition_penalty=1.3, seed=1)]
    tokens, _, failed = Sampler(0).sample(logits, [_seq(p) for p in params])
    assert failed == {}
    assert all(0 <= t < VOCAB for t in tokens)
    assert tokens == _expected(logits, params)
