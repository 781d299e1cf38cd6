"""Issue 17.4: an artifact from a stranger runs only what its manifest lists and checksums.

Every path the runtime opens must be relative, free of '..', listed in `files` and resolve inside
the artifact; the model description must agree with the tensors; the manifest's own sha256 can be
pinned. Each case is refused with BadArtifactError (exit code 4) naming the field. Most cases run
in-process against one tiny --no-compile artifact; a few go through the CLI for the exit code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llmc.artifacts.manifest import MANIFEST_NAME
from llmc.artifacts.reader import Artifact
from llmc.builder.build import BuildOptions, build
from llmc.errors import BadArtifactError, BadInputError
from tests.helpers import open_engine

Edit = Callable[[dict[str, Any]], None]
_CLI_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def tiny_artifact(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("untrusted") / "tiny"
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=out))
    return out


@pytest.fixture
def copy(tiny_artifact: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny artifact, inside tmp_path/'art' (tmp_path itself is "outside")."""
    return Path(shutil.copytree(tiny_artifact, tmp_path / "art"))


def _edit(art: Path, edit: Edit) -> None:
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    edit(manifest)
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))


def _unlist(path: str) -> Edit:
    def edit(m: dict[str, Any]) -> None:
        m["files"] = [f for f in m["files"] if f["path"] != path]

    return edit


def _file_entry(m: dict[str, Any], path: str) -> dict[str, Any]:
    return next(f for f in m["files"] if f["path"] == path)


def _set(*keys: str | int, value: object) -> Edit:
    def edit(m: dict[str, Any]) -> None:
        target: Any = m
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


def _compiled_step(package: str, constants: str = "model.safetensors") -> Edit:
    """A compiled decode step pointing at `package` (the issue's case: an unlisted .pt2 outside)."""

    def edit(m: dict[str, Any]) -> None:
        m["targets"]["cpu"]["compiled"] = [
            {
                "kind": "decode",
                "programs": [
                    {"package": package, "constants": constants, "layers": m["model"]["num_layers"], "logits": True}
                ],
                "order": [0],
                "buckets": [1],
                "max_seq_len": 256,
                "block_size": 16,
                "torch_version": "0",
                "cpu_capability": "none",
            }
        ]

    return edit


def _kernels(file: str) -> Edit:
    return _set("targets", "cpu", "kernels", value=[{"file": file, "torch_version": "0", "isa": "avx2"}])


def _add_listed(path: str) -> Edit:
    """List a path in `files` (with a made-up checksum): only the path rules are left to refuse it."""

    def edit(m: dict[str, Any]) -> None:
        m["files"].append({"path": path, "size": 1, "sha256": "0" * 64})

    return edit


ESCAPES: dict[str, tuple[Edit, str]] = {
    "tokenizer absolute": (_set("tokenizer", "file", value="/etc/passwd"), r"tokenizer\.file"),
    "tensor file ..": (_set("tensors", 0, "file", value="../outside/model.safetensors"), r"tensors\[0\]\.file"),
    "files entry ..": (_add_listed("../../../../etc/passwd"), r"files\[\d+\]\.path"),
    "files entry absolute": (_add_listed("/etc/passwd"), r"files\[\d+\]\.path"),
    "files entry dot": (_add_listed("./model.safetensors"), r"files\[\d+\]\.path"),
    "files entry backslash": (_add_listed("..\\..\\etc\\passwd"), r"files\[\d+\]\.path"),
    "chat template ..": (_set("tokenizer", "chat_template_file", value="a/../../x"), r"chat_template_file"),
    "package outside": (_compiled_step("/tmp/evil/decode_cpu.pt2"), r"compiled\[0\]\.programs\[0\]\.package"),
    "constants outside": (
        _compiled_step("model.safetensors", "../c.safetensors"),
        r"compiled\[0\]\.programs\[0\]\.constants",
    ),
    "kernels outside": (_kernels("../../evil.so"), r"cpu\.kernels\[0\]\.file"),
    "report outside": (_set("build", "report_file", value="/etc/shadow"), r"build\.report_file"),
}

UNLISTED: dict[str, tuple[Edit, str]] = {
    "tokenizer": (_unlist("tokenizer.json"), r"tokenizer\.file"),
    "chat template": (_unlist("chat_template.jinja"), r"tokenizer\.chat_template_file"),
    "tensors": (_unlist("model.safetensors"), r"tensors\[0\]\.file"),
    "compiled package": (_compiled_step("compiled/decode_cpu.pt2"), r"compiled\[0\]\.programs\[0\]\.package"),
    "kernel library": (_kernels("kernels/other.so"), r"cpu\.kernels\[0\]\.file"),
    "report": (_set("build", "report_file", value="build_report.json"), r"build\.report_file"),
}


def _programs(**change: Any) -> Edit:
    """A compiled step (its package listed, model.safetensors) whose programs and order are changed."""

    def edit(m: dict[str, Any]) -> None:
        _compiled_step("model.safetensors")(m)
        step = m["targets"]["cpu"]["compiled"][0]
        for key, value in change.items():
            if key in step:
                step[key] = value
            else:
                step["programs"][0][key] = value

    return edit


def _logits_twice(m: dict[str, Any]) -> None:
    """A step whose program ends with the logits and that names a logits program too."""
    _compiled_step("model.safetensors")(m)
    m["targets"]["cpu"]["compiled"][0]["logits"] = {"package": "model.safetensors", "constants": "model.safetensors"}


def _logits_by_flag_beside_a_logits_program(m: dict[str, Any]) -> None:
    """A shared last program computing the logits by a flag, in a step naming a logits program too."""
    _compiled_step("model.safetensors")(m)
    step = m["targets"]["cpu"]["compiled"][0]
    step["programs"][0] |= {"logits": False, "logits_select": True}
    step["logits"] = {"package": "model.safetensors", "constants": "model.safetensors"}


def _logits_by_flag_not_last(m: dict[str, Any]) -> None:
    """Two one-layer programs, the first run's computing the logits by a flag."""
    _compiled_step("model.safetensors")(m)
    step = m["targets"]["cpu"]["compiled"][0]
    one = {"package": "model.safetensors", "constants": "model.safetensors", "layers": 1}
    step["programs"] = [one | {"logits_select": True}, one | {"logits": True}]
    step["order"] = [0, 1]


BY_A_FLAG = r"compiled\[0\]\.programs.*compute the logits by a flag"
INCONSISTENT: dict[str, tuple[Edit, str]] = {
    "order naming no program": (_programs(order=[1]), r"compiled\[0\]\.order"),
    "runs short of the layers": (_programs(layers=1), r"compiled\[0\]\.order runs 1 layers; the model has 2"),
    "logits twice": (_logits_twice, r"compiled\[0\]\.logits"),
    "a shared program ending with the logits": (_programs(layers=1, order=[0, 0]), r"compiled\[0\]\.programs"),
    "a shared program embedding": (
        _programs(layers=1, embed=True, order=[0, 0]),
        r"compiled\[0\]\.programs",
    ),
    "a program embedding both from the ids and by a select": (
        _programs(embed=True, embed_select=True),
        r"compiled\[0\]\.programs",
    ),
    "a program ending with the logits and computing them by a flag": (
        _programs(logits_select=True),
        BY_A_FLAG,
    ),
    "logits by a flag beside a logits program": (_logits_by_flag_beside_a_logits_program, BY_A_FLAG),
    "logits by a flag in the first run's program": (_logits_by_flag_not_last, BY_A_FLAG),
    "num_layers -1": (_set("model", "num_layers", value=-1), r"model\.num_layers is -1"),
    "num_layers 0": (_set("model", "num_layers", value=0), r"model\.num_layers"),
    "num_layers 3 for 2 layers": (_set("model", "num_layers", value=3), r"model\.num_layers is 3; the tensors hold 2"),
    "heads not dividing hidden": (_set("model", "num_heads", value=6), r"model\.num_heads disagrees"),
    "kv heads not dividing heads": (_set("model", "num_kv_heads", value=3), r"model\.num_kv_heads"),
    "vocab mismatch": (_set("model", "vocab_size", value=100), r"model\.vocab_size"),
    "hidden mismatch": (_set("model", "hidden_size", value=96), r"model\.hidden_size"),
    "head_dim 0": (_set("model", "head_dim", value=0), r"model\.head_dim"),
    "rope_theta 1": (_set("model", "rope_theta", value=1.0), r"model\.rope_theta is 1\.0"),
    "rope_theta -5": (_set("model", "rope_theta", value=-5.0), r"model\.rope_theta"),
    "rms_norm_eps 0": (_set("model", "rms_norm_eps", value=0.0), r"model\.rms_norm_eps"),
    "huge context": (_set("model", "max_position_embeddings", value=1 << 40), r"model\.max_position_embeddings"),
    "layer_types short": (_set("model", "layer_types", value=["full_attention"]), r"model\.layer_types"),
    "eos outside vocab": (_set("tokenizer", "eos_token_ids", value=[10**6]), r"tokenizer\.eos_token_ids\[0\]"),
    "bad sha256": (lambda m: _file_entry(m, "tokenizer.json").update(sha256="xyz"), r"files\[\d+\]\.sha256"),
    "negative size": (lambda m: _file_entry(m, "tokenizer.json").update(size=-1), r"files\[\d+\]\.size"),
    "duplicate file": (lambda m: m["files"].append(dict(m["files"][0])), r"twice"),
    "unknown dtype": (_set("tensors", 0, "dtype", value="F64"), r"tensors\[0\]\.dtype"),
    "negative shape": (_set("tensors", 0, "shape", value=[-1, 64]), r"tensors\[0\]\.shape"),
    # Fields the model code reads that once passed and crashed the load with a traceback.
    "activation unknown": (_set("model", "hidden_act", value="evil"), r"model\.hidden_act"),
    "norm unknown": (_set("model", "norm", value="none"), r"model\.norm"),
    "router unknown": (_set("model", "router", value="x"), r"model\.router"),
    "rope linear no factor": (_set("model", "rope_scaling", value={"rope_type": "linear"}), r"rope_scaling\.factor"),
    "rope factor string": (
        _set("model", "rope_scaling", value={"type": "linear", "factor": "2"}),
        r"rope_scaling\.factor",
    ),
    "rope yarn no original": (
        _set("model", "rope_scaling", value={"rope_type": "yarn", "factor": 4.0}),
        r"rope_scaling\.original_max_position_embeddings",
    ),
    "rope longrope no factors": (
        _set("model", "rope_scaling", value={"rope_type": "longrope", "original_max_position_embeddings": 4096}),
        r"rope_scaling\.short_factor",
    ),
    "rope type unknown": (_set("model", "rope_scaling", value={"rope_type": "magic"}), r"model\.rope_scaling"),
    "mla rope width 2^40": (_set("model", "qk_rope_head_dim", value=2**40), r"model\.qk_rope_head_dim"),
    "head width 2^20": (_set("model", "head_dim", value=2**20), r"model\.head_dim"),
    "lora rank negative": (_set("model", "kv_lora_rank", value=-1), r"model\.kv_lora_rank"),
}


@pytest.mark.parametrize("case", list(ESCAPES), ids=list(ESCAPES))
def test_paths_leaving_the_artifact_are_refused(copy: Path, case: str) -> None:
    edit, field = ESCAPES[case]
    _edit(copy, edit)
    with pytest.raises(BadArtifactError, match=field):
        Artifact.open(copy, verify=False)


@pytest.mark.parametrize("case", list(UNLISTED), ids=list(UNLISTED))
def test_files_without_a_checksum_are_refused(copy: Path, case: str) -> None:
    edit, field = UNLISTED[case]
    _edit(copy, edit)
    with pytest.raises(BadArtifactError, match=field + r" names .*, which `files` does not list"):
        Artifact.open(copy, verify=False)


@pytest.mark.parametrize("case", list(INCONSISTENT), ids=list(INCONSISTENT))
def test_inconsistent_manifests_are_refused(copy: Path, case: str) -> None:
    edit, field = INCONSISTENT[case]
    _edit(copy, edit)
    with pytest.raises(BadArtifactError, match=field):
        Artifact.open(copy, verify=False)


def test_a_symlink_out_of_the_artifact_is_refused_even_with_the_right_checksum(copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    shutil.copyfile(copy / "tokenizer.json", outside)  # same bytes: only the link gives it away
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").symlink_to(outside)
    with pytest.raises(BadArtifactError, match=r"tokenizer\.json resolves to .* outside the artifact"):
        Artifact.open(copy, verify=False)
    with pytest.raises(BadArtifactError, match=r"tokenizer\.json resolves to .* outside the artifact"):
        Artifact.open(copy)


def test_a_symlink_inside_the_artifact_is_followed(copy: Path) -> None:
    (copy / "real").mkdir()
    (copy / "tokenizer.json").rename(copy / "real" / "tokenizer.json")
    (copy / "tokenizer.json").symlink_to(Path("real") / "tokenizer.json")
    Artifact.open(copy)


def test_a_manifest_that_is_a_link_is_refused(copy: Path, tmp_path: Path) -> None:
    (copy / MANIFEST_NAME).rename(tmp_path / "elsewhere.json")
    (copy / MANIFEST_NAME).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(BadArtifactError, match="missing"):
        Artifact.open(copy)


def test_tokenizer_changed_after_the_check_is_not_used(copy: Path) -> None:
    """No check-then-reopen gap: the engine reads the tokenizer again and hashes what it reads."""
    artifact = Artifact.open(copy)
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace("<|im_end|>", "<|im_fin|>"))
    with pytest.raises(BadArtifactError, match=r"tokenizer\.json fails its sha256 check"):
        from llmc.runtime.engine import Engine, EngineConfig

        Engine(artifact, EngineConfig(kv_blocks=32))


def test_fields_the_static_checks_miss_are_caught_against_the_tensor_shapes(copy: Path) -> None:
    _edit(copy, _set("model", "intermediate_size", value=100))  # the MLP weights are 128 wide
    Artifact.open(copy)  # the manifest alone is plausible
    with pytest.raises(BadArtifactError, match=r"artifact tensor model\.layers\.0\.mlp\..* has shape"):
        open_engine(copy, kv_blocks=32)


def test_json_nested_past_the_parsers_recursion_is_refused(copy: Path) -> None:
    """msgspec and json raise RecursionError, no DecodeError, on ~10^4 nested brackets: it left
    `llmc inspect` and `build -o` with a traceback."""
    deep = "[" * 20000 + "]" * 20000
    manifest = (copy / MANIFEST_NAME).read_text().rstrip()
    (copy / MANIFEST_NAME).write_text(manifest[:-1] + f', "deep": {deep}}}')
    with pytest.raises(BadArtifactError, match="nests JSON too deeply"):
        Artifact.open(copy, verify=False)
    from llmc.artifacts.staging import recover

    recover(copy / "next")  # reads the manifests beside it: no exception either


def test_a_layout_the_static_checks_cannot_judge_fails_as_a_bad_artifact(copy: Path) -> None:
    """A quantized layout claimed for a float tensor passes the manifest's checks; building the
    model then failed with an IndexError traceback."""

    def quantize_a_norm(m: dict[str, Any]) -> None:
        norm = next(t for t in m["tensors"] if t["name"].endswith("input_layernorm.weight"))
        norm["quant"] = "q4_0"

    _edit(copy, quantize_a_norm)
    with pytest.raises(BadArtifactError, match="cannot be built from this artifact"):
        open_engine(copy, kv_blocks=32)


def test_the_models_activations_are_the_ones_the_manifest_allows() -> None:
    from llmc.artifacts.manifest import HIDDEN_ACTIVATIONS
    from llmc.model.layers import ACTIVATIONS

    assert set(HIDDEN_ACTIVATIONS) == set(ACTIVATIONS)


def test_the_manifest_digest_can_be_pinned(copy: Path) -> None:
    digest = hashlib.sha256((copy / MANIFEST_NAME).read_bytes()).hexdigest()
    assert Artifact.open(copy, expect_manifest_sha256=digest).manifest_sha256 == digest
    assert Artifact.open(copy, expect_manifest_sha256=digest.upper()).manifest_sha256 == digest
    _edit(copy, _set("model_name", value="renamed"))  # still a valid manifest, but not the pinned one
    with pytest.raises(BadArtifactError, match=f"not the expected {digest}"):
        Artifact.open(copy, expect_manifest_sha256=digest)
    with pytest.raises(BadInputError, match="64 hex digits"):
        Artifact.open(copy, expect_manifest_sha256="abc")


def _free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def _llmc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmc", *args], capture_output=True, text=True, timeout=_CLI_TIMEOUT_S)


def test_cli_inspect_prints_the_digest_and_refuses_an_inconsistent_manifest(copy: Path) -> None:
    digest = hashlib.sha256((copy / MANIFEST_NAME).read_bytes()).hexdigest()
    inspected = _llmc("inspect", str(copy), "--json", "--verify")
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["manifest_sha256"] == digest
    assert f"manifest_sha256: {digest}" in _llmc("inspect", str(copy)).stdout
    _edit(copy, _set("model", "num_layers", value=-1))
    broken = _llmc("inspect", str(copy), "--verify")
    assert broken.returncode == 4
    assert "model.num_layers is -1" in broken.stderr and "Traceback" not in broken.stderr


def test_cli_run_refuses_a_package_outside_the_artifact(copy: Path, tmp_path: Path) -> None:
    (tmp_path / "evil.pt2").write_bytes(b"not checked by anyone")
    _edit(copy, _compiled_step(str(tmp_path / "evil.pt2")))
    result = _llmc("run", str(copy), "--p", _free_port())
    assert result.returncode == 4, result.stderr
    assert "compiled[0].programs[0].package" in result.stderr and "Traceback" not in result.stderr


def test_cli_run_pins_the_manifest_digest(copy: Path) -> None:
    digest = hashlib.sha256((copy / MANIFEST_NAME).read_bytes()).hexdigest()
    # The right digest passes the check: the run goes on to open the model and then stops at the
    # KV cache too small for the context asked for (exit 2), before it would bind a port.
    small = ("--kv-blocks", "1", "--max-model-len", "256")
    right = _llmc("run", str(copy), "--p", _free_port(), *small, "--expect-manifest-sha256", digest)
    assert right.returncode == 2 and "KV cache" in right.stderr, right.stderr
    _edit(copy, _set("generation", "temperature", value=0.5))
    wrong = _llmc("run", str(copy), "--p", _free_port(), *small, "--expect-manifest-sha256", digest)
    assert wrong.returncode == 4, wrong.stderr
    assert f"not the expected {digest}" in wrong.stderr
