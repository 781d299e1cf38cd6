"""Issue #26: the ONNX target's graph. Every GGML format maps onto MatMulNBits exactly (against
the reference dequantizer), and the graph's logits match transformers on tiny random models, with
unquantized weights and with quantized ones (MatMulNBits in float32: accuracy level 0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import onnxruntime as ort

from llmc.artifacts.reader import Artifact
from llmc.builder.build import BuildOptions, build
from llmc.builder.onnx.external import ExternalData
from llmc.builder.onnx.graph import build_graph
from llmc.builder.onnx.nbits import FORMATS, map_blocks
from llmc.errors import BadInputError
from llmc.quant.formats import FORMATS as BLOCK_FORMATS
from tests.conftest import make_tiny_llama
from tests.runtime.test_families import make_family

MAX_LEN = 64  # the KV buffer the direct session runs use


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_maps_exactly(fmt: str) -> None:
    """The MatMulNBits form, evaluated exactly, rounds to the reference dequantizer's float32
    weights bit for bit: nothing is requantized."""
    torch.manual_seed(0)
    weight = torch.randn(48, 512) * 0.05
    weight[3] *= 40  # a row of large weights: big scales and offsets
    blocks = BLOCK_FORMATS[fmt].quantize(weight)
    reference = BLOCK_FORMATS[fmt].dequantize(blocks).numpy()
    mapped = map_blocks(blocks, fmt)
    got = mapped.dequantize().astype(np.float32)
    assert mapped.inexact_groups == 0
    assert np.array_equal(got.view(np.int32), reference.view(np.int32))
    assert (mapped.offsets is None) == (fmt in {"q4_0", "q8_0", "q5_0", "q3k", "q6k"})  # the symmetric ones


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _prefill_logits(session: ort.InferenceSession, spec: dict, ids: list[int]) -> np.ndarray:
    n = len(ids)
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.array([ids], np.int64),
        "seqlens_k": np.array([n - 1], np.int32),
        "total_sequence_length": np.array(n, np.int32),
        "logits_rows": np.arange(n, dtype=np.int64),
    }
    shape = (1, spec["num_kv_heads"], MAX_LEN, spec["head_dim"])
    for i in range(spec["num_layers"]):
        for part in ("key", "value"):
            feeds[f"past_key_values.{i}.{part}"] = np.zeros(shape, np.float32)
    logits: np.ndarray = session.run(["logits"], feeds)[0]
    return logits


def _graph_at_level_0(artifact_dir: Path, out: Path) -> Path:
    """The artifact's model written again with MatMulNBits in float32 (accuracy level 0)."""
    artifact = Artifact.open(artifact_dir)
    weights = artifact.lazy_weights()
    quant = {t.name: t.quant for t in artifact.manifest.tensors}
    out.mkdir()
    data = ExternalData(out / "model.onnx.data", "model.onnx.data")
    model, _ = build_graph(artifact.manifest.model, lambda n: (weights[n], quant[n]), set(quant), data, 0)
    data.close()
    import onnx

    onnx.save_model(model, str(out / "model.onnx"))
    return out / "model.onnx"


def _dequantized_reference(hf: torch.nn.Module, artifact_dir: Path) -> None:
    """Load the artifact's weights, dequantized by the reference codecs, into the transformers model."""
    artifact = Artifact.open(artifact_dir)
    weights = artifact.lazy_weights()
    state = {}
    for info in artifact.manifest.tensors:
        tensor = weights[info.name]
        state[info.name] = BLOCK_FORMATS[info.quant].dequantize(tensor) if info.quant else tensor
    hf.load_state_dict(state, strict=False)


def _ids(n: int = 40) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.mark.parametrize("tied", [False, True])
def test_unquantized_graph_matches_transformers(tmp_path: Path, tied: bool) -> None:
    from transformers import AutoModelForCausalLM

    src = make_tiny_llama(tmp_path / "src", tie_word_embeddings=tied)
    build(BuildOptions(model=str(src), gguf_file=None, weights=None, output=tmp_path / "art", target="onnx"))
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert set(manifest["targets"]) == {"onnx"}
    listed = {f["path"] for f in manifest["files"]}
    assert {"onnx/model.onnx", "onnx/model.onnx.data", "onnx/mapping.json"} <= listed
    ids = _ids()
    hf = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    got = _prefill_logits(_session(tmp_path / "art" / "onnx" / "model.onnx"), manifest["model"], ids)
    assert np.abs(got - expected).max() < 1e-4


# A symmetric and an affine format of each MatMulNBits form: 4-bit block 32 and 16, 8-bit block 32 and 16.
@pytest.mark.parametrize("isq", ["q4_0", "q4_1", "q3k", "q2k", "q8_0", "q5_1", "q6k"])
def test_quantized_graph_matches_the_dequantized_model(tmp_path: Path, isq: str) -> None:
    from transformers import AutoModelForCausalLM

    # hidden 256: every projection is whole K-quant super-blocks; a tied, quantized embedding
    src = make_tiny_llama(tmp_path / "src", hidden_size=256, intermediate_size=256, tie_word_embeddings=True)
    build(BuildOptions(model=str(src), gguf_file=None, weights=None, output=tmp_path / "art", target="onnx", isq=isq))
    mapping = json.loads((tmp_path / "art" / "onnx" / "mapping.json").read_text())
    assert mapping["tensors"]["model.layers.0.mlp.down_proj.weight"].startswith(f"{isq}: MatMulNBits")
    hf = AutoModelForCausalLM.from_pretrained(src).eval()
    _dequantized_reference(hf, tmp_path / "art")
    ids = _ids()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    spec = json.loads((tmp_path / "art" / "manifest.json").read_text())["model"]
    exact = _prefill_logits(_session(_graph_at_level_0(tmp_path / "art", tmp_path / "level0")), spec, ids)
    assert np.abs(exact - expected).max() < 1e-4
    # The artifact's own graph quantizes activations to int8 per block (accuracy level 4), as
    # llama.cpp does: close, not equal.
    fast = _prefill_logits(_session(tmp_path / "art" / "onnx" / "model.onnx"), spec, ids)
    assert np.abs(fast - expected).max() < 0.05 * np.abs(expected).max()


@pytest.mark.parametrize(
    ("family", "reason"),
    [
        ("deepseek_v2", "multi-head latent attention"),
        ("deepseek_v3", "grouped or scaled expert routing"),
    ],
)
def test_unmapped_families_are_refused_before_the_build(tmp_path: Path, family: str, reason: str) -> None:
    make_family(tmp_path / "src", family)
    with pytest.raises(BadInputError, match=rf"ONNX target does not support .*{reason}.*--target cpu"):
        build(
            BuildOptions(
                model=str(tmp_path / "src"), gguf_file=None, weights=None, output=tmp_path / "a", target="onnx"
            )
        )
    assert not (tmp_path / "a").exists()


def test_unknown_target_is_refused(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "src")
    with pytest.raises(BadInputError, match="choose from: cpu, onnx"):
        build(BuildOptions(model=str(src), gguf_file=None, weights=None, output=tmp_path / "a", target="cpu,tpu"))
