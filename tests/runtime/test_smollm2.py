"""Acceptance: SmolLM2 built from its GGUF as f32 matches transformers loading the same GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmc.runtime.engine import Engine
from llmc.runtime.sampling_params import SamplingParams
from tests.helpers import generate, open_engine, prompt_logits

TEXT = (
    "In 1969, the Apollo 11 mission landed the first humans on the Moon. Neil Armstrong and Buzz Aldrin "
    "spent about two and a quarter hours outside the lunar module, collecting samples and setting up "
    "experiments, while Michael Collins orbited above in the command module Columbia before the crew "
    "returned safely to Earth."
)


@pytest.fixture(scope="module")
def hf(smollm2_gguf: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    return tok, model.eval()


@pytest.fixture(scope="module")
def engine(smollm2_artifact: Path) -> Engine:
    return open_engine(smollm2_artifact)


def test_tokenizer_matches_transformers(hf, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    tok, _ = hf
    for text in [TEXT, "The capital of France is", "def f(x):\n\treturn x  # ok", "naïve café 🙂"]:
        assert engine.tokenizer.encode(text) == tok(text).input_ids


def test_logits_match_on_64_tokens(hf, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    _, model = hf
    ids = engine.tokenizer.encode(TEXT)[:64]
    assert len(ids) == 64
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    got = prompt_logits(engine, ids)
    assert (got - expected).abs().max().item() < 1e-3


def test_greedy_continuation_matches(hf, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    tok, model = hf
    ids = engine.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None)
    ours = generate(engine, [ids], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))[0]
    assert ours == expected[0, len(ids) :].tolist()
    assert "Paris" in tok.decode(ours)


def test_16_concurrent_greedy_requests_equal_alone(engine: Engine) -> None:
    """Issue 4: batch invariance on the real model, f32 on the CPU."""
    words = TEXT.split()
    prompts = [engine.tokenizer.encode(" ".join(words[: 3 + 3 * i])) for i in range(16)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = [generate(engine, [p], params)[0] for p in prompts]
    assert generate(engine, prompts, params) == alone


def test_500_token_shared_prefix_is_cached(smollm2_artifact: Path) -> None:
    """Issue 4: a request sharing a 500-token prefix reports >= 480 cached tokens and answers as
    it does with the cache off."""
    from llmc.runtime.output_processor import RequestOutput

    cached = open_engine(smollm2_artifact)
    prefix = cached.tokenizer.encode((TEXT + " ") * 8)[:500]
    first, second = [*prefix, *cached.tokenizer.encode(" Who flew?")], [*prefix, *cached.tokenizer.encode(" When?")]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    generate(cached, [first], params)
    outputs: list[RequestOutput] = []
    answer = generate(cached, [second], params, collect=outputs)[0]
    assert outputs[-1].cached_tokens >= 480
    uncached = open_engine(smollm2_artifact, enable_prefix_cache=False)
    assert generate(uncached, [second], params)[0] == answer
