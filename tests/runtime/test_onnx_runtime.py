"""Issue #26: the onnx backend through the engine. Each mapped family matches transformers (logits
through the slot cache, greedy text alone and batched with others); chunked prefill, preemption,
prompt logprobs and slot reuse behave as on the torch backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from llmc.builder.build import BuildOptions, build
from llmc.errors import BadArtifactError
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import Sequence
from tests.helpers import generate, open_engine, prompt_logits
from tests.runtime.test_families import FAMILIES, make_family

# builder/onnx/graph.py `unsupported` refuses the rest
MAPPED_FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3",
    "stablelm",
    "glm4",
    "qwen2_moe",
    "qwen3_moe",
]
# Variants that take the other rope path (graph.py kernel_rotates): the tiny families' partial rope
# is rotated by the graph's own ops; GLM-4 with 32-wide heads has 8-wide tables, which the kernel
# rotates itself (as GLM-4-9B's 128-wide heads do); Qwen2 with 24-wide heads has a full rope the
# kernel cannot rotate.
ROPE_VARIANTS = {
    "glm4-kernel-partial-rope": ("glm4", {"head_dim": 32}),
    "qwen2-head-24": ("qwen2", {"hidden_size": 96}),
}
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize(
    ("family", "overrides"),
    [(f, {}) for f in MAPPED_FAMILIES] + list(ROPE_VARIANTS.values()),
    ids=MAPPED_FAMILIES + list(ROPE_VARIANTS),
)
def test_family_matches_transformers_on_onnx(
    family: str, overrides: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, model, defaults = FAMILIES[family]
    monkeypatch.setitem(FAMILIES, family, (config, model, {**defaults, **overrides}))
    hf = make_family(tmp_path / "src", family)
    build(BuildOptions(model=str(tmp_path / "src"), gguf_file=None, weights=None, output=tmp_path / "a", target="onnx"))
    engine = open_engine(tmp_path / "a", device="onnx")
    ids = _ids(64)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    assert (prompt_logits(engine, ids) - expected).abs().max().item() < 1e-4

    short = ids[:40]
    with torch.no_grad():
        hf_greedy = hf.generate(
            torch.tensor([short]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, 40:].tolist()
    assert generate(engine, [short], GREEDY)[0] == hf_greedy
    others = [_ids(n, seed=n) for n in (7, 70, 23)]
    batched = generate(engine, [others[0], short, others[1], others[2]], GREEDY)
    assert batched[1] == hf_greedy


def test_longrope_in_chunks_matches_transformers(tmp_path: Path) -> None:
    """Phi-3's longrope picks its factors by each sequence's whole length: a long prompt prefilled
    in small chunks rotates every chunk (the first ones too) with the long factors, and a short
    prompt that outgrows the original context (48) while decoding switches beside it."""
    hf = make_family(tmp_path / "src", "phi3")
    build(BuildOptions(model=str(tmp_path / "src"), gguf_file=None, weights=None, output=tmp_path / "a", target="onnx"))
    engine = open_engine(tmp_path / "a", device="onnx")
    ids = _ids(64, seed=5)
    seq = Sequence("p", ids, SamplingParams(max_tokens=1, prompt_logprobs=1))
    engine.block_manager.allocate(seq)
    chunks = []
    for _ in range(0, len(ids), 16):
        engine.runner.run([(seq, 16)])
        chunks.append(engine.runner.prompt_logits[seq.seq_id])
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0, :-1].numpy()
    assert np.abs(np.concatenate(chunks) - expected).max() < 1e-4

    prompts = [ids, _ids(30, seed=6)]
    greedy = []
    for prompt in prompts:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        greedy.append(out[0, len(prompt) :].tolist())
    assert generate(open_engine(tmp_path / "a", device="onnx", max_batched_tokens=16), prompts, GREEDY) == greedy


@pytest.fixture(scope="module")
def both_targets(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "art"
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=out, target="cpu,onnx"))
    return out


def test_onnx_and_torch_agree_on_one_artifact(both_targets: Path) -> None:
    prompts = [_ids(n, seed=n) for n in (5, 33, 17, 60)]
    torch_out = generate(open_engine(both_targets, device="cpu"), prompts, GREEDY)
    onnx_out = generate(open_engine(both_targets, device="onnx"), prompts, GREEDY)
    assert onnx_out == torch_out


def test_chunked_prefill_and_small_steps(both_targets: Path) -> None:
    """A prompt longer than a step's token budget is prefilled in chunks over its slot."""
    prompts = [_ids(100, seed=3), _ids(9, seed=4)]
    whole = generate(open_engine(both_targets, device="onnx"), prompts, GREEDY)
    chunked = generate(open_engine(both_targets, device="onnx", max_batched_tokens=32), prompts, GREEDY)
    assert chunked == whole


def test_preemption_and_slot_reuse(both_targets: Path) -> None:
    """Too few KV blocks for everyone: sequences are preempted and recomputed, slots reused, and the
    text is what each sequence gets alone."""
    prompts = [_ids(40 + n, seed=n) for n in range(6)]
    alone = [generate(open_engine(both_targets, device="onnx"), [p], GREEDY)[0] for p in prompts]
    tight = open_engine(both_targets, device="onnx", kv_blocks=12, max_num_seqs=3)
    assert generate(tight, prompts, GREEDY) == alone
    assert tight.scheduler.num_preemptions > 0


def test_prompt_logits_match_torch(both_targets: Path) -> None:
    ids = _ids(30)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2)
    got = {}
    for device in ("cpu", "onnx"):
        engine = open_engine(both_targets, device=device)
        seq = Sequence("p", ids, params)
        engine.block_manager.allocate(seq)
        engine.runner.run([(seq, len(ids))])
        got[device] = engine.runner.prompt_logits[seq.seq_id]
    assert got["onnx"].shape == got["cpu"].shape == (len(ids) - 1, engine.runner.vocab_size)
    assert np.abs(got["cpu"] - got["onnx"]).max() < 1e-4


def test_artifact_without_a_graph_is_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=tmp_path / "cpu"))
    with pytest.raises(BadArtifactError, match="has no onnx target"):
        open_engine(tmp_path / "cpu", device="onnx")


def _replace_file(artifact: Path, name: str, data: bytes) -> None:
    """Rewrite one file and its manifest entry, as someone handing over a crafted artifact would."""
    import hashlib
    import json

    (artifact / name).write_bytes(data)
    manifest = json.loads((artifact / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == name:
            entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (artifact / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("location", ["../model.safetensors", "/etc/hostname", "escape.bin"])
def test_graph_naming_weights_outside_its_folder_is_refused(both_targets: Path, tmp_path: Path, location: str) -> None:
    """The graph is untrusted: external data it names outside its folder (up, absolute, or through a
    link) is never read; the artifact is refused as bad (exit code 4), not loaded."""
    import shutil

    import onnx

    artifact = tmp_path / "crafted"
    shutil.copytree(both_targets, artifact)
    if location == "escape.bin":
        (artifact / "onnx" / "escape.bin").symlink_to("/etc/hostname")
    model = onnx.load(str(artifact / "onnx" / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    _replace_file(artifact, "onnx/model.onnx", model.SerializeToString())
    with pytest.raises(BadArtifactError, match="onnxruntime cannot load"):
        open_engine(artifact, device="onnx")


def test_graph_of_another_shape_is_refused(both_targets: Path, tmp_path: Path) -> None:
    import shutil

    import onnx

    artifact = tmp_path / "renamed"
    shutil.copytree(both_targets, artifact)
    model = onnx.load(str(artifact / "onnx" / "model.onnx"), load_external_data=False)
    model.graph.output[0].name = "scores"
    for node in model.graph.node:
        node.output[:] = ["scores" if o == "logits" else o for o in node.output]
    _replace_file(artifact, "onnx/model.onnx", model.SerializeToString())
    with pytest.raises(BadArtifactError, match="does not have llmc's inputs and outputs"):
        open_engine(artifact, device="onnx")
