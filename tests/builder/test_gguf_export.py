"""`llmc export --gguf`: the GGUF builds back into the same weights, and llama.cpp runs it."""

from __future__ import annotations

import importlib.util
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmc.artifacts.reader import Artifact
from llmc.builder.build import BuildOptions, build
from llmc.runtime.sampling_params import SamplingParams
from tests.helpers import generate, open_engine


def _export(artifact: Path, out: Path) -> Path:
    """`llmc export --gguf out` of the artifact, which must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "llmc", "export", str(artifact), "--gguf", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def exported(smollm2_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(smollm2_artifact, tmp_path_factory.mktemp("export") / "smollm2.gguf")


def test_round_trip_keeps_every_weight(smollm2_artifact: Path, exported: Path, tmp_path: Path) -> None:
    build(BuildOptions(model=str(exported), gguf_file=None, weights=None, output=tmp_path / "again", name="smollm2"))
    original = dict(Artifact.open(smollm2_artifact).weights())
    again = dict(Artifact.open(tmp_path / "again").weights())
    assert original.keys() == again.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, again[name]), name


def test_llama_cpp_greedy_text_equals_ours(smollm2_artifact: Path, exported: Path) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is in the bench extra (make install-bench)")
    from llama_cpp import Llama

    llm = Llama(model_path=str(exported), n_threads=2, n_ctx=256, verbose=False)
    engine = open_engine(smollm2_artifact)
    prompt = "The capital of France is"
    ids = engine.tokenizer.encode(prompt)
    assert llm.tokenize(prompt.encode(), add_bos=False) == ids
    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        theirs.append(token)
        if len(theirs) == 16:
            break
    ours = generate(engine, [ids], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    assert ours == theirs


def test_unsupported_artifacts_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=tmp_path / "tiny"))
    result = subprocess.run(
        [sys.executable, "-m", "llmc", "export", str(tmp_path / "tiny"), "--gguf", str(tmp_path / "x.gguf")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "pre-tokenizer" in result.stderr


def test_export_never_overwrites_a_file(smollm2_artifact: Path, exported: Path, tmp_path: Path) -> None:
    """The export was linked into place whole (no partial file left beside it, the umask's mode);
    exporting onto it again, or onto a user's file, is refused and leaves the bytes as they were."""
    from llmc.artifacts.files import sha256_file
    from llmc.artifacts.staging import file_mode

    assert [p.name for p in exported.parent.iterdir()] == [exported.name]
    assert stat.S_IMODE(exported.stat().st_mode) == file_mode()
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"GGUF: the user's own file")
    for target in (exported, mine):
        before = sha256_file(target)
        result = subprocess.run(
            [sys.executable, "-m", "llmc", "export", str(smollm2_artifact), "--gguf", str(target)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2, result.stderr
        assert "already exists" in result.stderr and str(target) in result.stderr
        assert sha256_file(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["mine.gguf"]


def test_an_f16_artifact_exports_its_vectors_as_f32(smollm2_gguf: Path, tmp_path: Path) -> None:
    """llama.cpp multiplies f32 activations by norms and aborts on an F16 one: every 1-D tensor
    is F32, as llama.cpp's converter writes it, and the matrices are F16."""
    import gguf

    out = tmp_path / "half"
    build(
        BuildOptions(
            model=str(smollm2_gguf), gguf_file=None, weights=None, output=out, dtype="f16", isq="none", compile=None
        )
    )
    path = _export(out, tmp_path / "half.gguf")
    types = {t.name: (len([d for d in t.shape if d > 1]), t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors}
    assert {kind for dims, kind in types.values() if dims == 1} == {gguf.GGMLQuantizationType.F32}
    assert {kind for dims, kind in types.values() if dims == 2} == {gguf.GGMLQuantizationType.F16}


@pytest.mark.parametrize("bad", [3_000_000_000, -1, "7", True])
def test_token_ids_a_tokenizer_file_gives_are_bounded_before_the_token_list_is_made(bad: object) -> None:
    # The list is as long as the largest id: 3e9 in a stranger's tokenizer.json took 7 GB.
    from llmc.builder.gguf_export import _tokenizer_fields
    from llmc.builder.gguf_tokenizer import PRE_TOKENIZERS
    from llmc.errors import BadArtifactError

    pre = {"type": "Sequence", "pretokenizers": [*PRE_TOKENIZERS["gpt-2"], {"type": "ByteLevel"}]}
    tokenizer = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}, "pre_tokenizer": pre}
    assert _tokenizer_fields(tokenizer, 4)["tokens"] == ["a", "b", "[PAD2]", "[PAD3]"]
    with pytest.raises(BadArtifactError, match="token id"):
        _tokenizer_fields({**tokenizer, "added_tokens": [{"id": bad, "content": "<x>"}]}, 4)
    with pytest.raises(BadArtifactError, match="token id"):
        _tokenizer_fields({**tokenizer, "model": {**tokenizer["model"], "vocab": {"a": 0, "b": bad}}}, 4)
