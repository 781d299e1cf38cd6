"""Issue 7, GGUF side: every family with a llama.cpp architecture goes safetensors → `llmc build` →
`llmc export --gguf` → `llmc build` from that GGUF, and both artifacts give the same logits (f32, so
bit for bit up to float noise); transformers' GGUF loader, where it knows the architecture, and
llama.cpp read the exported file to the same model. Llama's tiny model has Llama-3 rope scaling
(llama.cpp's `rope_freqs` divisors), DeepSeek-V3's YaRN and grouped sigmoid routing."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

from llmc.artifacts.reader import Artifact
from llmc.builder.build import BuildOptions, build
from llmc.builder.gguf_export import export_gguf
from llmc.builder.gguf_names import GGUF_ARCHITECTURES
from llmc.builder.gguf_tokenizer import PRE_TOKENIZERS
from llmc.builder.sources.gguf_file import llama3_scaling_from_factors
from llmc.runtime.sampling_params import SamplingParams
from tests.helpers import generate, open_engine, prompt_logits
from tests.runtime.test_families import FAMILIES, make_family

PROMPT = torch.randint(3, 320, (32,), generator=torch.Generator().manual_seed(1)).tolist()
SAME = 1e-6  # both artifacts hold the same f32 weights; only summation order could differ
CLOSE = 1e-4  # another implementation (transformers) in f32
# What llama.cpp's layout requires of the tiny models: Gemma-2 has no separate output matrix there.
# Qwen2-MoE there has no dense layers (llmc reads them back, llama.cpp and transformers do not).
GGUF_OVERRIDES: dict[str, dict[str, Any]] = {
    "gemma2": {"tie_word_embeddings": True},
    "qwen2_moe": {"mlp_only_layers": []},
}
# Variants of a family's tiny model, tested as cases of their own: DeepSeek-V2 with ungrouped
# routing, which llama.cpp runs as transformers does (see LLAMA_CPP_FAMILIES).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"deepseek_v2_greedy": ("deepseek_v2", {"topk_method": "greedy"})}
# Metadata transformers' GGUF loader does not read (its GGUF_CONFIG_MAPPING), passed to it directly.
TRANSFORMERS_UNREAD: dict[str, dict[str, Any]] = {
    "llama": {"rope_parameters": FAMILIES["llama"][2]["rope_parameters"]},  # it ignores rope_freqs
    "qwen3": {"head_dim": FAMILIES["qwen3"][2]["head_dim"]},
    "phi3": {
        "pad_token_id": None,
        "rope_parameters": FAMILIES["phi3"][2]["rope_parameters"],
        "original_max_position_embeddings": FAMILIES["phi3"][2]["original_max_position_embeddings"],
    },
    "gemma2": {k: FAMILIES["gemma2"][2][k] for k in ("attn_logit_softcapping", "final_logit_softcapping")}
    | {"query_pre_attn_scalar": 16},
    "gemma3": {"layer_types": FAMILIES["gemma3"][2]["layer_types"], "query_pre_attn_scalar": 16},
    "qwen2_moe": {k: FAMILIES["qwen2_moe"][2][k] for k in ("moe_intermediate_size", "shared_expert_intermediate_size")},
    "qwen3_moe": {"moe_intermediate_size": FAMILIES["qwen3_moe"][2]["moe_intermediate_size"]},
}
GGUF_FAMILIES = sorted((set(GGUF_ARCHITECTURES) & set(FAMILIES)) | set(VARIANTS))
# transformers has no GGUF loader for glm4 or deepseek2.
TRANSFORMERS_FAMILIES = sorted(set(GGUF_FAMILIES) - {"glm4", "deepseek_v2", "deepseek_v3", "deepseek_v2_greedy"})
# Families llama.cpp runs as the tiny model is (its llama arch has no sliding window; phi3 picks
# longrope's factors by context size, not sequence length; its deepseek2 ranks expert groups by
# their two best experts, V3's rule, where group-limited V2 takes the best one).
LLAMA_CPP_FAMILIES = [
    "deepseek_v2_greedy",
    "deepseek_v3",
    "gemma2",
    "gemma3",
    "glm4",
    "llama",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "stablelm",
]
# Transformers reads a llama-arch GGUF named exactly "mistral" as Mistral, then fails (gguf-py has no
# mistral arch); as Llama it has no window, so for Mistral it sees only a prompt the window does not cut.
TRANSFORMERS_PROMPT = {"mistral": PROMPT[: FAMILIES["mistral"][2]["sliding_window"]]}


def _exportable_tokenizer(folder: Path) -> None:
    """The tiny tokenizer's lone ByteLevel pre-tokenizer, spelled as llama.cpp's `gpt-2` (same split)."""
    path = folder / "tokenizer.json"
    body = json.loads(path.read_text())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    body["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [*PRE_TOKENIZERS["gpt-2"], byte_level]}
    path.write_text(json.dumps(body))


@functools.cache
def _round_trip(case: str, root: Path) -> tuple[Path, Path, Path]:
    """(safetensors-built artifact, exported GGUF, GGUF-built artifact) for one family or variant, made once."""
    family, variant = VARIANTS.get(case, (case, {}))
    config, model, overrides = FAMILIES[family]
    FAMILIES[family] = (config, model, {**overrides, **GGUF_OVERRIDES.get(family, {}), **variant})
    try:
        make_family(root / "src", family)
    finally:
        FAMILIES[family] = (config, model, overrides)
    _exportable_tokenizer(root / "src")
    build(
        BuildOptions(model=str(root / "src"), gguf_file=None, weights=None, output=root / "art", name=f"tiny-{family}")
    )
    gguf_file = export_gguf(root / "art", root / f"{case}.gguf")
    build(BuildOptions(model=str(gguf_file), gguf_file=None, weights=None, output=root / "again", name=case))
    return root / "art", gguf_file, root / "again"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf_families")


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_round_trip_keeps_logits(family: str, workdir: Path) -> None:
    art, _, again = _round_trip(family, workdir / family)
    spec, spec_again = Artifact.open(art).manifest.model, Artifact.open(again).manifest.model
    assert msgspec.to_builtins(spec_again) == msgspec.to_builtins(spec)
    with torch.no_grad():
        expected = prompt_logits(open_engine(art), PROMPT)
        got = prompt_logits(open_engine(again), PROMPT)
    assert (got - expected).abs().max().item() <= SAME


def test_gguf_round_trip_keeps_the_sampling_defaults(workdir: Path) -> None:
    """`llmc export` writes them as llama.cpp's general.sampling.* keys; a GGUF build reads them."""
    from llmc.artifacts.generation import GGUF_SAMPLING_ORIGIN, effective

    art, _, again = _round_trip("llama", workdir / "llama")
    stored, read_back = effective(Artifact.open(art).manifest.generation), Artifact.open(again).manifest.generation
    assert read_back.origin == GGUF_SAMPLING_ORIGIN
    fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    assert [getattr(read_back, f) for f in fields] == [getattr(stored, f) for f in fields]


@pytest.mark.parametrize("family", TRANSFORMERS_FAMILIES)
def test_transformers_gguf_loader_agrees(family: str, workdir: Path) -> None:
    from transformers import AutoModelForCausalLM

    _, gguf_file, again = _round_trip(family, workdir / family)
    hf = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, **TRANSFORMERS_UNREAD.get(family, {})
    ).eval()
    prompt = TRANSFORMERS_PROMPT.get(family, PROMPT)
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0]
        got = prompt_logits(open_engine(again), prompt)
    assert (got - expected).abs().max().item() < CLOSE


@pytest.mark.parametrize("family", LLAMA_CPP_FAMILIES)
def test_llama_cpp_greedy_tokens_equal_ours(family: str, workdir: Path) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is in the bench extra (make install-bench)")
    from llama_cpp import Llama

    _, gguf_file, again = _round_trip(family, workdir / family)
    llm = Llama(model_path=str(gguf_file), n_threads=2, n_ctx=64, verbose=False)
    prompt = PROMPT[:16]
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        theirs.append(token)
        if len(theirs) == 12:
            break
    ours = generate(open_engine(again), [prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    assert ours == theirs


def _header_only_gguf(path: Path, arch: str, block_count: int) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(block_count)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_gguf_architecture_lists_supported(tmp_path: Path) -> None:
    from llmc.builder.sources.gguf_file import GgufSource
    from llmc.errors import BadModelError

    with pytest.raises(BadModelError, match=r"supported: llama, qwen2, .*qwen3moe, deepseek2"):
        GgufSource(_header_only_gguf(tmp_path / "x.gguf", "falcon", 4), "x")


def test_gguf_sizes_are_bounded(tmp_path: Path) -> None:
    """A stranger's header cannot make the build loop over (or allocate) billions of layers."""
    from llmc.builder.sources.gguf_file import MAX_LAYERS, _config_from_fields
    from llmc.errors import BadModelError

    fields = {"llama.embedding_length": 64, "llama.attention.head_count": 4, "llama.block_count": MAX_LAYERS + 1}
    with pytest.raises(BadModelError, match=r"llama\.block_count"):
        _config_from_fields("llama", fields, {}, {})


def _converter_rope_freqs(dim: int, theta: float, factor: float, low: float, high: float, old: int) -> list[float]:
    """Llama-3 divisors computed in float32 arithmetic, as llama.cpp's converter does (not llmc's
    float64 `llama3_rope_factors`), so reading them back is tested against its rounding."""
    wavelen = 2 * math.pi / (1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    smooth = (old / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    ones, factors = torch.ones_like(wavelen), torch.full_like(wavelen, factor)
    return torch.where(wavelen < old / high, ones, torch.where(wavelen > old / low, factors, blended)).tolist()


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama-3.1 and Llama-3.2
def test_llama3_parameters_read_back_from_converter_rope_freqs(factor: float) -> None:
    """A file from llama.cpp's converter says nothing but the divisors: Llama-3's parameters come back."""
    freqs = _converter_rope_freqs(128, 500000.0, factor, 1.0, 4.0, 8192)
    expected = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert llama3_scaling_from_factors(freqs, 500000.0, 128, None) == expected
    assert llama3_scaling_from_factors(freqs, 500000.0, 128, 8192) == expected


def test_rope_freqs_that_are_not_llama3_are_refused() -> None:
    freqs = (1 + torch.rand(64, generator=torch.Generator().manual_seed(0)) * 7).tolist()
    assert llama3_scaling_from_factors(freqs, 500000.0, 128, 8192) is None
