"""The sampler's semantics on numpy logits, and its isolation: it fails only the row that cannot be
sampled; every other row gets its usual token."""

from __future__ import annotations

import numpy as np

from llmc.runtime.sampler import FAILED, NON_FINITE_LOGITS, Sampler, draw, log_softmax, token_logprob
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import Sequence
from llmc.runtime.structured_output import Constraint

VOCAB = 32
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
SEEDED = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7)
DRAWS = 2000  # enough draws that a token outside a cut would show up, and frequencies settle


class _FakeConstraint(Constraint):
    """A grammar that allows `allowed` tokens and raises on accept when `raise_on_accept`."""

    def __init__(self, allowed: np.ndarray, raise_on_accept: bool = False) -> None:
        self._mask = allowed
        self._raise = raise_on_accept

    def allowed(self) -> np.ndarray:
        return self._mask

    def accept(self, token: int) -> None:
        if self._raise:
            raise RuntimeError("grammar engine exploded")


def _logits(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, VOCAB), dtype=np.float32)


def _seq(params: SamplingParams, constraint: Constraint | None = None, output: list[int] | None = None) -> Sequence:
    seq = Sequence("r", [1, 2, 3], params)
    seq.constraint = constraint
    seq.output_ids = list(output or [])
    return seq


def _expected(logits: np.ndarray, params: list[SamplingParams]) -> list[int]:
    """What each row samples alone, in a batch of one healthy row."""
    return [Sampler(0).sample(logits[row : row + 1], [_seq(p)])[0][0] for row, p in enumerate(params)]


def _draws(logits: np.ndarray, params: SamplingParams, n: int = DRAWS) -> np.ndarray:
    """`n` tokens drawn from one row of logits with `params` (one seeded sampler)."""
    sampler = Sampler(0)
    return np.array([sampler.sample(logits[None], [_seq(params)])[0][0] for _ in range(n)])


def test_non_finite_logits_row_fails_only_that_sequence() -> None:
    logits = _logits(4)
    params = [GREEDY, SEEDED, GREEDY, SEEDED]
    expected = _expected(logits, params)
    logits[1, 5] = np.nan
    logits[2, 9] = np.inf
    tokens, logprobs, failed = Sampler(0).sample(logits, [_seq(p) for p in params])
    assert failed == {1: NON_FINITE_LOGITS, 2: NON_FINITE_LOGITS}
    assert tokens == [expected[0], FAILED, FAILED, expected[3]]
    assert logprobs == [None] * 4


def test_logprobs_skip_failed_rows() -> None:
    logits = _logits(2)
    logits[0, 0] = -np.inf
    with_logprobs = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2)
    tokens, logprobs, failed = Sampler(0).sample(logits, [_seq(with_logprobs), _seq(with_logprobs)])
    assert list(failed) == [0]
    assert logprobs[0] is None
    assert logprobs[1] is not None and logprobs[1].token_id == tokens[1] == int(logits[1].argmax())


def test_grammar_that_raises_fails_only_its_sequence() -> None:
    logits = _logits(3)
    expected = _expected(logits, [GREEDY, GREEDY, SEEDED])
    raising = _FakeConstraint(np.ones(VOCAB, dtype=np.bool_), raise_on_accept=True)
    seqs = [_seq(GREEDY), _seq(GREEDY, raising), _seq(SEEDED)]
    tokens, _, failed = Sampler(0).sample(logits, seqs)
    assert list(failed) == [1]
    assert "RuntimeError" in failed[1]
    assert tokens == [expected[0], FAILED, expected[2]]


def test_grammar_that_allows_nothing_fails_only_its_sequence() -> None:
    logits = _logits(3)
    expected = _expected(logits, [GREEDY, GREEDY, SEEDED])
    nothing = _FakeConstraint(np.zeros(VOCAB, dtype=np.bool_))
    for params in (GREEDY, SEEDED):
        tokens, _, failed = Sampler(0).sample(logits, [_seq(GREEDY), _seq(params, nothing), _seq(SEEDED)])
        assert list(failed) == [1]
        assert "no token can be sampled" in failed[1]
        assert tokens == [expected[0], FAILED, expected[2]]


def test_grammar_mask_rules_out_tokens() -> None:
    logits = _logits(1)[0]
    mask = np.zeros(VOCAB, dtype=np.bool_)
    mask[[4, 9]] = True
    for params in (GREEDY, SamplingParams(max_tokens=8, temperature=1.5)):
        for _ in range(50):
            [token], _, failed = Sampler(None).sample(logits[None], [_seq(params, _FakeConstraint(mask))])
            assert failed == {} and token in (4, 9)
    [greedy], _, _ = Sampler(0).sample(logits[None], [_seq(GREEDY, _FakeConstraint(mask))])
    assert greedy == (4 if logits[4] >= logits[9] else 9)


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


def test_seeded_request_repeats_and_ignores_its_batch_mates() -> None:
    """The same seed gives the same tokens, alone or between other seeded and unseeded rows."""
    steps = [_logits(1, seed)[0] for seed in range(12)]
    params = SamplingParams(max_tokens=12, temperature=1.2, seed=2**64 - 1)

    def run(mates: list[SamplingParams], position: int, sampler_seed: int | None) -> list[int]:
        seqs = [_seq(p) for p in mates]
        mine = _seq(params)
        seqs.insert(position, mine)
        sampler = Sampler(sampler_seed)
        out = []
        for logits in steps:
            batch = np.stack([logits] * len(seqs))
            tokens, _, failed = sampler.sample(batch, seqs)
            assert failed == {}
            out.append(tokens[position])
        return out

    alone = run([], 0, 0)
    assert len(set(alone)) > 1  # it really draws
    assert run([], 0, 1) == alone
    crowd = [SamplingParams(max_tokens=12, temperature=1.0), SamplingParams(max_tokens=12, temperature=0.7, seed=3)]
    assert run(crowd, 1, None) == alone
    assert run(crowd, 2, 5) == alone
    # Seeds map into numpy's range modulo 2**64: -1 is 2**64 - 1; another seed draws otherwise.
    assert _stream(-1, steps) == alone
    assert _stream(-(2**63), steps) != alone


def _stream(seed: int, steps: list[np.ndarray]) -> list[int]:
    """The tokens of one sequence seeded with `seed`, alone in its batch, one step per logits row."""
    seq = _seq(SamplingParams(max_tokens=12, temperature=1.2, seed=seed))
    return [Sampler(0).sample(logits[None], [seq])[0][0] for logits in steps]


def test_draw_follows_the_probabilities() -> None:
    probs = np.zeros(VOCAB, dtype=np.float32)
    probs[[3, 7, 20]] = [0.5, 0.3, 0.2]
    generator = np.random.default_rng(0)
    counts = np.bincount([draw(probs, generator) for _ in range(DRAWS)], minlength=VOCAB) / DRAWS
    assert set(np.flatnonzero(counts)) == {3, 7, 20}  # never a token without mass
    assert np.abs(counts - probs).max() < 0.05


def test_top_k_top_p_and_min_p_cut_the_tail() -> None:
    logits = np.linspace(0.0, 3.1, VOCAB, dtype=np.float32)[::-1].copy()  # token 0 the most likely
    top3 = _draws(logits, SamplingParams(max_tokens=1, temperature=1.0, top_k=3))
    assert set(top3) == {0, 1, 2}
    probs = np.exp(log_softmax(logits).astype(np.float64))
    covered = int(np.searchsorted(np.cumsum(probs), 0.5)) + 1  # the fewest tokens holding half the mass
    top_p = _draws(logits, SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5))
    assert set(top_p) == set(range(covered))
    min_p = _draws(logits, SamplingParams(max_tokens=1, temperature=1.0, min_p=0.8))
    assert set(min_p) == set(np.flatnonzero(probs >= 0.8 * probs.max()))
    assert len(set(_draws(logits, SamplingParams(max_tokens=1, temperature=1.0)))) > 10  # no cut: the tail shows
    # A cold temperature sharpens: the best token dominates.
    assert (_draws(logits, SamplingParams(max_tokens=1, temperature=0.005), 200) == 0).all()
    # A top_p below float32's smallest number still keeps the likeliest token (it read as 0 and
    # cut every token, failing the request).
    tiny = _draws(logits, SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-46), 50)
    assert (tiny == 0).all()


def test_logit_bias_and_penalties() -> None:
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[1], logits[2], logits[5], logits[6] = 2.0, -1.0, 1.5, 1.2

    def greedy(params: SamplingParams, output: list[int] | None = None) -> int:
        return Sampler(0).sample(logits[None], [_seq(params, output=output)])[0][0]

    def params(**settings: object) -> SamplingParams:
        return SamplingParams(max_tokens=8, temperature=0.0, **settings)  # type: ignore[arg-type]

    assert greedy(GREEDY) == 1
    assert greedy(params(logit_bias=((9, 100.0),))) == 9
    # Prompt token 1 (2.0) is divided by 2 to 1.0, below token 5's 1.5; once 5 is generated too
    # (0.75), token 6 (1.2) leads.
    assert greedy(params(repetition_penalty=2.0)) == 5
    assert greedy(params(repetition_penalty=2.0), output=[5]) == 6
    assert greedy(params(repetition_penalty=0.5, logit_bias=((2, 3.5),))) == 2  # 2.5 / 0.5 = 5 > 2.0 / 0.5
    negative = np.full((1, VOCAB), -1.0, dtype=np.float32)
    negative[0, 2] = -0.8  # seen: multiplied to -1.6, below the unseen -1.0 (divided it would lead)
    assert Sampler(0).sample(negative, [_seq(params(repetition_penalty=2.0))])[0] == [0]
    # The bias comes first: token 5 at 2.5 leads, until penalties for its outputs take it below 2.0.
    assert greedy(params(logit_bias=((5, 1.0),)), output=[5, 5]) == 5
    assert greedy(params(logit_bias=((5, 1.0),), frequency_penalty=0.4), output=[5, 5]) == 1  # 2.5 - 0.8
    assert greedy(params(logit_bias=((5, 1.0),), frequency_penalty=0.2), output=[5, 5]) == 5  # 2.5 - 0.4
    assert greedy(params(logit_bias=((5, 1.0),), presence_penalty=0.6), output=[5, 5]) == 1  # 2.5 - 0.6
    # Logprobs are of the raw logits, whatever the penalties chose.
    [token], [logprob], _ = Sampler(0).sample(logits[None], [_seq(params(repetition_penalty=2.0, logprobs=1))])
    assert token == 5 and logprob is not None and logprob.top[0][0] == 1
    assert logits[5] == 1.5  # the caller's logits are never changed


def test_token_logprob_and_log_softmax() -> None:
    logits = _logits(2).astype(np.float32) * 4 + 1e4  # far from 0: the max is subtracted first
    logprobs = log_softmax(logits)
    assert logprobs.dtype == np.float32
    ref = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    np.testing.assert_allclose(logprobs, ref, atol=1e-4)
    entry = token_logprob(logprobs[0], 11, 5)
    assert entry.token_id == 11 and entry.logprob == float(logprobs[0, 11])
    order = np.argsort(-ref[0])[:5]
    assert [t for t, _ in entry.top] == order.tolist()
    assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)
    assert token_logprob(logprobs[1], 0, 0).top == []
    assert len(token_logprob(logprobs[1], 0, VOCAB + 5).top) == VOCAB
