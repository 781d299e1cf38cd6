"""`llmc build --isq`: the per-tensor plan, quantized artifacts that run, GGUF blocks carried over
and exported back byte for byte, the build report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from openai import OpenAI

from llmc.artifacts.reader import Artifact
from llmc.builder.build import BuildOptions, build
from llmc.builder.quant_plan import plan_quantization
from llmc.errors import BadInputError
from llmc.quant.formats import FORMATS
from llmc.runtime.sampling_params import SamplingParams
from tests.conftest import make_tiny_llama
from tests.helpers import SMOLLM2_SPEC, generate, open_engine, prompt_logits, smollm2_tensor_shapes
from tests.server import running_server

GREEDY_TOKENS = 16  # issue 3: llama.cpp's greedy text equals ours for at least the first 16 tokens


def test_plan_follows_llamacpp_mixes_and_fallbacks() -> None:
    plan = plan_quantization(SMOLLM2_SPEC, smollm2_tensor_shapes(), "q4k")
    # 576 is not a multiple of 256: q4k falls back to q5_0, as llama.cpp does.
    assert plan["model.layers.4.self_attn.q_proj.weight"].format == "q5_0"
    assert "576" in plan["model.layers.4.self_attn.q_proj.weight"].reason
    # down_proj rows are 1536 wide: q4k, and q6k in the more-bits layers (first/last eighth, every third).
    assert plan["model.layers.4.mlp.down_proj.weight"].format == "q4k"
    assert plan["model.layers.0.mlp.down_proj.weight"].format == "q6k"
    assert plan["model.layers.5.mlp.down_proj.weight"].format == "q6k"
    assert plan["model.layers.29.mlp.down_proj.weight"].format == "q6k"
    # The tied embedding is the output projection: q6k, falling back to q8_0 at width 576.
    assert plan["model.embed_tokens.weight"].format == "q8_0"
    assert plan["model.norm.weight"].format is None
    legacy = plan_quantization(SMOLLM2_SPEC, smollm2_tensor_shapes(), "q4_0")
    assert legacy["model.layers.0.mlp.down_proj.weight"].format == "q4_0"
    assert legacy["model.embed_tokens.weight"].format == "q8_0"
    with pytest.raises(BadInputError, match="q4k"):
        plan_quantization(SMOLLM2_SPEC, smollm2_tensor_shapes(), "q4_k_m")


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose widths are whole K-quant super-blocks (256), untied."""
    return make_tiny_llama(
        tmp_path_factory.mktemp("wide") / "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4
    )


@pytest.fixture(scope="module")
def f32_logits(wide_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    out = tmp_path_factory.mktemp("f32") / "a"
    build(BuildOptions(model=str(wide_llama), gguf_file=None, weights=None, output=out))
    return prompt_logits(open_engine(out), list(range(3, 40)))


# Relative error of the logits against the f32 build. A random 2-layer model amplifies weight error
# (measured: q8_0 0.017, q6k 0.046, q5_0/q5_1/q5k 0.09, q4k 0.16, q4_1 0.19, q4_0 0.22, q3k 0.31,
# q2k 0.59); the bounds add ~35% headroom and stay below 1, where a mis-wired tensor lands. The
# kernels are held to bf16 precision against the reference in tests/kernels.
LOGIT_TOLERANCE = {
    "q8_0": 0.03,
    "q6k": 0.065,
    "q5_1": 0.125,
    "q5_0": 0.125,
    "q5k": 0.125,
    "q4_1": 0.26,
    "q4_0": 0.3,
    "q4k": 0.22,
    "q3k": 0.42,
    "q2k": 0.8,
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantized_build_runs_close_to_f32(
    fmt: str, wide_llama: Path, f32_logits: torch.Tensor, tmp_path: Path
) -> None:
    out = tmp_path / fmt
    result = build(BuildOptions(model=str(wide_llama), gguf_file=None, weights=None, output=out, isq=fmt))
    quant = {t.name: t.quant for t in result.manifest.tensors}
    assert quant["model.layers.0.self_attn.q_proj.weight"] == fmt
    assert quant["lm_head.weight"] in ("q6k", "q8_0", fmt)
    assert quant["model.norm.weight"] is None and quant["model.embed_tokens.weight"] is None
    report = Artifact.open(out).report()
    assert report is not None and report["summary"]["bytes_after"] < report["summary"]["bytes_before"]
    assert all(t["rel_rmse"] is not None and 0 < t["rel_rmse"] < 1 for t in report["tensors"])
    logits = prompt_logits(open_engine(out), list(range(3, 40)))
    error = float((logits - f32_logits).norm() / f32_logits.norm())
    assert error < LOGIT_TOLERANCE[fmt], error


def test_quantized_builds_are_reproducible(wide_llama: Path, tmp_path: Path) -> None:
    hashes = []
    for name in ("a", "b"):
        result = build(
            BuildOptions(model=str(wide_llama), gguf_file=None, weights=None, output=tmp_path / name, isq="q4k")
        )
        hashes.append({f.path: f.sha256 for f in result.manifest.files})
    assert hashes[0] == hashes[1] and "build_report.json" in hashes[0]


def test_gguf_blocks_are_carried_and_exported_byte_for_byte(
    smollm2_gguf: Path, smollm2_quant_artifact: Path, tmp_path: Path
) -> None:
    manifest = Artifact.open(smollm2_quant_artifact).manifest
    formats = {t.quant for t in manifest.tensors if t.quant is not None}
    assert formats == {"q4_1", "q8_0"}  # the GGUF's own types: nothing was requantized
    out = tmp_path / "again.gguf"
    subprocess.run(
        [sys.executable, "-m", "llmc", "export", str(smollm2_quant_artifact), "--gguf", str(out)],
        check=True,
        timeout=300,
    )
    original = {t.name: t for t in gguf.GGUFReader(str(smollm2_gguf)).tensors}
    again = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert original.keys() == again.keys()
    for name, tensor in original.items():
        assert tensor.tensor_type == again[name].tensor_type, name
        assert np.array_equal(np.asarray(tensor.data), np.asarray(again[name].data)), name


def test_inspect_shows_the_report(smollm2_quant_artifact: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmc", "inspect", str(smollm2_quant_artifact), "--report", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    summary = json.loads(result.stdout)
    assert summary["quantized_tensors"] == {"q4_1": 210, "q8_0": 1}
    assert summary["parameters"] == 134_515_008
    assert len(summary["report"]["tensors"]) == 211
    # `llmc build` prints the same count (it once counted Q4_1 tensors by their bytes: 96,471,360)
    from llmc.artifacts.reader import Artifact
    from llmc.builder.build import BuildResult

    manifest = Artifact.open(smollm2_quant_artifact).manifest
    assert BuildResult(smollm2_quant_artifact, manifest, 0.0).summary()["parameters"] == 134_515_008
    assert summary["weights"].startswith("q4_1 (210 tensors, ") and "q8_0 (1 tensor, " in summary["weights"]


@pytest.fixture(scope="module")
def smollm2_q4k(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("q4k") / "artifact"
    build(BuildOptions(model=str(smollm2_gguf), gguf_file=None, weights=None, output=out, name="smollm2", isq="q4k"))
    return out


def test_smollm2_q4k_chats_coherently(smollm2_q4k: Path) -> None:
    with running_server(smollm2_q4k) as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
            max_tokens=24,
            temperature=0,
        )
    text = answer.choices[0].message.content
    assert text and "Paris" in text


def test_smollm2_q4k_exported_greedy_text_equals_llama_cpp(smollm2_q4k: Path, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the bench extra (make install-bench)")
    out = tmp_path / "q4k.gguf"
    subprocess.run(
        [sys.executable, "-m", "llmc", "export", str(smollm2_q4k), "--gguf", str(out)], check=True, timeout=300
    )
    llm = llama_cpp.Llama(model_path=str(out), n_threads=2, n_ctx=256, verbose=False)
    engine = open_engine(smollm2_q4k)
    ids = engine.tokenizer.encode("The capital of France is")
    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        theirs.append(token)
        if len(theirs) == GREEDY_TOKENS:
            break
    ours = generate(engine, [ids], SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True))[0]
    assert ours == theirs, (engine.tokenizer.decode(ours), engine.tokenizer.decode(theirs))
