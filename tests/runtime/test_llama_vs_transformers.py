"""Acceptance: a tiny random Llama through `llmc build` and the runtime matches transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmc.builder.build import BuildOptions, build
from llmc.runtime.sampling_params import SamplingParams
from tests.helpers import generate, open_engine, prompt_logits

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def built(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built") / "a"
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=out, dtype="f32"))
    return out


def test_logits_and_greedy_match_transformers(tiny_llama_dir: Path, built: Path) -> None:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()
    ids = torch.randint(3, hf.config.vocab_size, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
        hf_greedy = hf.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, 32:].tolist()
    engine = open_engine(built)
    got = prompt_logits(engine, ids)
    assert (got - expected).abs().max().item() < 1e-4
    assert generate(engine, [ids], GREEDY)[0] == hf_greedy


def test_batched_sequences_match_alone(built: Path) -> None:
    engine = open_engine(built)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (5, 17, 32, 1, 9)]
    alone = [generate(engine, [p], GREEDY)[0] for p in prompts]
    together = generate(engine, prompts, GREEDY)
    assert together == alone
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
