"""One request's failure ends that request with an error; the others in the batch finish unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmc.builder.build import BuildOptions, build
from llmc.runtime.engine import Engine
from llmc.runtime.output_processor import RequestOutput
from llmc.runtime.sampler import NON_FINITE_LOGITS
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.structured_output import Constraint
from tests.helpers import generate, open_engine

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
VICTIMS = [[5, 6, 7, 8, 9], [40, 41, 42]]
ATTACKER = [10, 11, 12, 13]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("isolation") / "tiny"
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=out))
    return out


@pytest.fixture(scope="module")
def alone(tiny: Path) -> list[list[int]]:
    """What the victims generate without an attacker."""
    return generate(open_engine(tiny), VICTIMS, GREEDY)


class _Grammars:
    """Stands in for the engine's GrammarCompiler: hands out `make()`'s constraints."""

    def __init__(self, make: Any) -> None:
        self.constraint = make


class _RaisingConstraint(Constraint):
    """Allows every token, then raises on the `fail_at`-th accepted one."""

    def __init__(self, vocab: int, fail_at: int) -> None:
        self._mask = np.ones(vocab, dtype=np.bool_)
        self._left = fail_at

    def allowed(self) -> np.ndarray:
        return self._mask

    def accept(self, token: int) -> None:
        self._left -= 1
        if self._left == 0:
            raise RuntimeError("grammar engine exploded")

    @property
    def finished(self) -> bool:
        return False


def _attack(engine: Engine, attacker: SamplingParams) -> tuple[list[list[int]], list[RequestOutput]]:
    """Run both victims (r0, r1) and the attacker (r2) together; the outputs of each."""
    outputs: list[RequestOutput] = []
    tokens = generate(engine, [*VICTIMS, ATTACKER], [GREEDY, GREEDY, attacker], collect=outputs)
    return tokens, outputs


def _assert_only_attacker_failed(outputs: list[RequestOutput], tokens: list[list[int]], alone: list[list[int]]) -> str:
    finals = {o.request_id: o for o in outputs if o.finished}
    assert finals["r0"].finish_reason == finals["r1"].finish_reason == "length"
    assert tokens[:2] == alone
    assert finals["r2"].finish_reason == "error"
    assert finals["r2"].error
    return finals["r2"].error


def test_non_finite_logits_fail_only_their_request(tiny: Path, alone: list[list[int]]) -> None:
    engine = open_engine(tiny)
    run = engine.runner.run

    def poisoned(batch: Any) -> tuple[Any, np.ndarray]:
        seqs, logits = run(batch)
        logits = logits.copy()  # the runner's may share the model's output memory
        for row, seq in enumerate(seqs):
            if seq.request_id == "r2" and len(seq.output_ids) == 3:
                logits[row, 17] = float("nan")
        return seqs, logits

    engine.runner.run = poisoned  # type: ignore[method-assign]
    tokens, outputs = _attack(engine, GREEDY)
    assert _assert_only_attacker_failed(outputs, tokens, alone) == NON_FINITE_LOGITS
    assert len(tokens[2]) == 3  # the tokens before the bad step reached the client
    assert not engine.scheduler.has_work() and engine.block_manager.num_free == engine.block_manager.num_blocks


def test_grammar_that_raises_fails_only_its_request(tiny: Path, alone: list[list[int]]) -> None:
    engine = open_engine(tiny)
    vocab = engine.runner.vocab_size
    engine._grammars = _Grammars(lambda grammar: _RaisingConstraint(vocab, fail_at=4))  # type: ignore[assignment]
    tokens, outputs = _attack(engine, SamplingParams(max_tokens=16, temperature=0.0, grammar="start: /.*/"))
    assert "RuntimeError" in _assert_only_attacker_failed(outputs, tokens, alone)
    assert len(tokens[2]) == 3


def test_accept_failure_fails_only_its_request(tiny: Path, alone: list[list[int]]) -> None:
    engine = open_engine(tiny)

    def broken(grammar: str) -> Constraint:
        raise RuntimeError("cannot build the grammar")

    engine._grammars = _Grammars(broken)  # type: ignore[assignment]
    n_two = [SamplingParams(max_tokens=16, temperature=0.0, grammar="start: /.*/")] * 2
    outputs: list[RequestOutput] = []
    failed: list[RequestOutput] = []
    engine.submit("bad", ATTACKER, n_two, failed.append)  # two choices: both must end, with an error
    tokens = generate(engine, VICTIMS, GREEDY, collect=outputs)
    assert tokens == alone
    assert sorted(o.request_id for o in failed) == ["bad/0", "bad/1"]
    assert all(o.finished and o.finish_reason == "error" and o.error for o in failed)
    assert engine._by_request == {} and engine._sinks == {} and engine._followers == {}
    # Nor do they keep their places under --max-waiting: 256 such rejections answered 503 to all.
    assert engine.num_waiting == 0


def test_runner_failure_fails_its_batch_and_the_engine_keeps_serving(tiny: Path, alone: list[list[int]]) -> None:
    """A failure no sequence can be blamed for ends the batch it hit; later requests are served."""
    engine = open_engine(tiny)
    run = engine.runner.run
    calls = 0

    def flaky(batch: Any) -> tuple[Any, np.ndarray]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("kernel failure")
        return run(batch)

    engine.runner.run = flaky  # type: ignore[method-assign]
    failed: list[RequestOutput] = []
    engine.submit("doomed", ATTACKER, GREEDY, failed.append)
    engine._accept(engine._inbox.get_nowait())  # type: ignore[arg-type]
    engine._step_safely()  # the prefill works
    engine._step_safely()  # the decode step raises
    assert failed[-1].finished and failed[-1].finish_reason == "error"
    assert not engine.scheduler.has_work()
    assert generate(engine, VICTIMS, GREEDY) == alone
