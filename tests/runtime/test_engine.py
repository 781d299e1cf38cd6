"""The engine's guarantees: batch invariance, prefix caching, chunked prefill, preemption, seeds, n, abort."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmc.builder.build import BuildOptions, build
from llmc.runtime.engine import Engine
from llmc.runtime.output_processor import RequestOutput
from llmc.runtime.sampling_params import SamplingParams
from tests.helpers import drain_inbox, generate, open_engine

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engine") / "tiny"
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=out))
    return out


def _prompts(count: int, seed: int = 0, low: int = 1, high: int = 60) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=gen).tolist()
    return [torch.randint(3, 300, (n,), generator=gen).tolist() for n in lengths]


def test_batch_invariance_16_concurrent(tiny: Path) -> None:
    engine = open_engine(tiny)
    prompts = _prompts(16)
    alone = [generate(engine, [p], GREEDY)[0] for p in prompts]
    assert generate(engine, prompts, GREEDY) == alone


def test_chunked_prefill_matches_whole_prefill(tiny: Path) -> None:
    prompts = _prompts(4, seed=1, low=100, high=200)
    whole = generate(open_engine(tiny, max_batched_tokens=4096), prompts, GREEDY)
    chunked = open_engine(tiny, max_batched_tokens=37)
    assert generate(chunked, prompts, GREEDY) == whole


def test_prefix_cache_hits_and_keeps_answers(tiny: Path) -> None:
    shared = _prompts(1, seed=2, low=200, high=201)[0]
    first, second = [*shared, 5, 6, 7], [*shared, 8, 9]
    cached = open_engine(tiny)
    outputs: list[RequestOutput] = []
    generate(cached, [first], GREEDY)
    got = generate(cached, [second], GREEDY, collect=outputs)[0]
    assert outputs[-1].cached_tokens >= 192  # every full 16-token block of the shared 200
    uncached = open_engine(tiny, enable_prefix_cache=False)
    outputs_off: list[RequestOutput] = []
    assert generate(uncached, [second], GREEDY, collect=outputs_off)[0] == got
    assert outputs_off[-1].cached_tokens == 0


def test_exhaustion_preempts_and_completes(tiny: Path) -> None:
    prompts = _prompts(12, seed=3, low=20, high=60)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    roomy = open_engine(tiny)
    expected = [generate(roomy, [p], params)[0] for p in prompts]
    # 16 blocks x 16 tokens = 256 tokens (the model's max length) for 12 requests of up to 100.
    tight = open_engine(tiny, kv_blocks=16, enable_prefix_cache=False)
    start_free = tight.block_manager.num_free
    assert generate(tight, prompts, params) == expected
    assert tight.scheduler.num_preemptions > 0
    assert tight.block_manager.num_free == start_free


def test_seeded_sampling_alone_equals_in_batch(tiny: Path) -> None:
    engine = open_engine(tiny)
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=42, ignore_eos=True)
    prompt = _prompts(1, seed=4)[0]
    alone = generate(engine, [prompt], seeded)[0]
    noisy = SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)
    busy = generate(engine, [*_prompts(6, seed=5), prompt], [noisy] * 6 + [seeded])
    assert busy[-1] == alone
    assert generate(engine, [prompt], seeded)[0] == alone


def test_n_choices_share_the_prompt(tiny: Path) -> None:
    engine = open_engine(tiny)
    prompt = _prompts(1, seed=6, low=100, high=101)[0]
    outputs: list[RequestOutput] = []
    sink_results = generate_n(
        engine, prompt, [SamplingParams(max_tokens=8, temperature=1.0, seed=i) for i in range(3)], outputs
    )
    assert len(sink_results) == 3
    finals = [o for o in outputs if o.finished]
    assert sorted(o.request_id for o in finals) == ["n/0", "n/1", "n/2"]
    assert max(o.cached_tokens for o in finals) >= 96
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def generate_n(
    engine: Engine, prompt: list[int], params: list[SamplingParams], outputs: list[RequestOutput]
) -> dict[str, list[int]]:
    results: dict[str, list[int]] = {}

    def sink(out: RequestOutput) -> None:
        outputs.append(out)
        results.setdefault(out.request_id, []).extend(out.token_ids)

    ids = engine.submit("n", prompt, params, sink)
    while sum(o.finished for o in outputs) < len(ids):
        drain_inbox(engine)
        engine.step()
    return results


def test_abort_frees_blocks_at_once(tiny: Path) -> None:
    engine = open_engine(tiny)
    outputs: list[RequestOutput] = []
    for i, prompt in enumerate(_prompts(5, seed=7)):
        engine.submit(f"a{i}", prompt, SamplingParams(max_tokens=200, ignore_eos=True), outputs.append)
    drain_inbox(engine)
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free < engine.block_manager.num_blocks
    engine.abort([f"a{i}" for i in range(5)])
    drain_inbox(engine)
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    assert not engine.scheduler.has_work()
    assert sorted(o.request_id for o in outputs if o.finish_reason == "abort") == [f"a{i}" for i in range(5)]


def test_penalties_and_bias_change_choices(tiny: Path) -> None:
    engine = open_engine(tiny)
    prompt = _prompts(1, seed=8)[0]
    plain = generate(engine, [prompt], GREEDY)[0]
    banned = plain[0]
    biased = generate(
        engine,
        [prompt],
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logit_bias=((banned, -100.0),)),
    )[0]
    assert banned not in biased
    penalised = generate(
        engine,
        [prompt],
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0),
    )[0]
    assert len(set(penalised)) > len(set(plain))


def test_logprobs_are_of_the_model_distribution(tiny: Path) -> None:
    engine = open_engine(tiny)
    prompt = _prompts(1, seed=9)[0]
    outputs: list[RequestOutput] = []
    tokens = generate(
        engine, [prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=3), collect=outputs
    )[0]
    logprobs = [lp for o in outputs for lp in o.logprobs]
    assert [lp.token_id for lp in logprobs] == tokens
    for lp in logprobs:
        assert len(lp.top) == 3
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely
        assert lp.logprob == pytest.approx(lp.top[0][1])
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


@pytest.mark.parametrize("chunk", [4096, 7])
def test_prompt_logprobs_match_a_full_forward(tiny: Path, chunk: int) -> None:
    from tests.helpers import prompt_logits

    engine = open_engine(tiny, max_batched_tokens=chunk)
    prompt = _prompts(1, seed=10, low=30, high=31)[0]
    expected = prompt_logits(open_engine(tiny), prompt).log_softmax(-1)
    outputs: list[RequestOutput] = []
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    generate(engine, [prompt], params, collect=outputs)
    got = outputs[0].prompt_logprobs
    assert got is not None and len(got) == len(prompt) and got[0] is None
    for position, entry in enumerate(got[1:]):
        assert entry is not None and entry.token_id == prompt[position + 1]
        assert entry.logprob == pytest.approx(float(expected[position, prompt[position + 1]]), abs=1e-5)
        assert len(entry.top) == 2
    assert all(o.prompt_logprobs is None for o in outputs[1:])


def test_the_heap_is_trimmed_once_each_time_the_engine_goes_idle(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between steps freed memory is kept for the next step (resident.keep_freed_heap); an idle
    server gives it back, once per idle spell, not on every wake-up."""
    import threading
    import time

    from llmc.runtime import engine as engine_module

    trims: list[float] = []
    monkeypatch.setattr(engine_module, "trim_heap", lambda: trims.append(time.monotonic()) or True)
    engine = open_engine(tiny)
    at_ready = len(trims)  # the trim before engine.ready
    engine.start()
    try:
        for i, prompt in enumerate(_prompts(2, seed=9)):
            done = threading.Event()
            engine.submit(f"t{i}", prompt, GREEDY, lambda out, done=done: done.set() if out.finished else None)
            assert done.wait(60)
            deadline = time.monotonic() + 10
            while len(trims) < at_ready + i + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(trims) == at_ready + i + 1
        engine.abort(["nobody"])  # wakes the idle loop without giving it work: no trim
        time.sleep(0.2)
        assert len(trims) == at_ready + 2
    finally:
        engine.stop()


def test_prompt_logprobs_survive_a_preemption(tiny: Path) -> None:
    """A preempted sequence recomputes its prompt from 0: rows for prompt logprobs it had recorded
    ran the record past the prompt's end (IndexError: a 500 for `echo` with `logprobs` under load)."""
    prompts = _prompts(3, seed=11, low=30, high=31)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    alone: list[RequestOutput] = []
    generate(open_engine(tiny), prompts[:1], params, collect=alone)
    engine = open_engine(tiny, kv_blocks=8)  # 3 x 70 tokens in 8 blocks of 16: someone is preempted
    outputs: list[RequestOutput] = []
    generate(engine, prompts, params, collect=outputs)
    assert engine.scheduler.num_preemptions > 0
    assert all(o.finish_reason != "error" for o in outputs)
    first = next(o for o in outputs if o.request_id == "r0" and o.prompt_logprobs is not None)
    expected = alone[0].prompt_logprobs
    assert expected is not None and first.prompt_logprobs is not None
    assert [e.token_id for e in first.prompt_logprobs[1:]] == [e.token_id for e in expected[1:]]  # type: ignore[union-attr]
    got = [e.logprob for e in first.prompt_logprobs[1:]]  # type: ignore[union-attr]
    assert got == pytest.approx([e.logprob for e in expected[1:]], abs=1e-4)  # type: ignore[union-attr]
