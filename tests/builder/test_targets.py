"""The build's device targets (builder/targets/), the manifest's per-target sections, and the
choices the command line offers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch

from llmc.artifacts.inspect import target_status
from llmc.artifacts.manifest import MANIFEST_NAME, TargetCode
from llmc.artifacts.reader import Artifact
from llmc.builder import BUILD_DTYPES, ISQ_FORMATS
from llmc.builder.build import DTYPES, BuildOptions, build
from llmc.builder.quant_plan import plan_quantization
from llmc.builder.targets import TARGET_NAMES
from llmc.builder.targets.base import CompileOptions
from llmc.builder.targets.cpu import _may_split
from llmc.errors import BadArtifactError, BadInputError
from llmc.quant.formats import FORMATS
from tests.helpers import SMOLLM2_SPEC, smollm2_tensor_shapes


def test_command_line_choices_match_what_the_builder_takes(tmp_path: Path) -> None:
    # The CLI names them without importing torch; they must stay the builder's own lists.
    assert set(ISQ_FORMATS) == set(FORMATS)
    assert tuple(DTYPES) == BUILD_DTYPES
    assert TARGET_NAMES == ("cpu", "onnx")
    with pytest.raises(BadInputError, match="--target 'tpu' is not supported; choose from: cpu, onnx"):
        build(BuildOptions(model=None, gguf_file=None, weights=None, output=tmp_path / "a", target="tpu"))
    assert not (tmp_path / "a").exists()


@pytest.fixture(scope="module")
def eager(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("targets") / "eager"
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=out, cpu_kernels=False))
    return out


def test_an_eager_artifact_records_its_target_and_the_build_machine(eager: Path) -> None:
    manifest = Artifact.open(eager).manifest
    host = torch.backends.cpu.get_cpu_capability()
    assert manifest.targets == {"cpu": TargetCode(capability=host)}
    assert manifest.compiled_for("cpu") == [] and manifest.kernels_for("cpu") == []
    assert manifest.compiled_for("cuda") == [] and manifest.kernels_for("cuda") == []
    status = target_status("cpu", manifest.targets["cpu"])
    assert status == {"capability": host, "this_host": host, "kernels": [], "compiled": []}


def _with_targets(art: Path, targets: dict[str, object]) -> None:
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["targets"] = targets
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_inspect_says_what_cannot_run_here() -> None:
    step = {
        "kind": "decode",
        "programs": [{"package": "model.safetensors", "constants": "model.safetensors", "layers": 1}],
        "order": [0],
        "buckets": [1, 2],
        "max_seq_len": 64,
        "block_size": 16,
        "torch_version": "1.0.0",
        "cpu_capability": "AVX2",
    }
    code = msgspec.convert({"capability": "AVX2", "compiled": [step]}, TargetCode)
    [compiled] = target_status("cpu", code)["compiled"]
    assert compiled["runs_here"] is False and "torch 1.0.0" in compiled["why_not"]
    gpu = target_status("cuda", TargetCode(capability="sm_90"))
    assert gpu["runs_here"] is False and "cpu only" in gpu["why_not"]


@pytest.mark.parametrize("name", ["CPU", "", "x" * 40, "../cpu"])
def test_a_target_name_that_is_not_one_is_refused(eager: Path, tmp_path: Path, name: str) -> None:
    art = Path(shutil.copytree(eager, tmp_path / "art"))
    _with_targets(art, {name: {"capability": "AVX2"}})
    with pytest.raises(BadArtifactError, match="is not a target name"):
        Artifact.open(art)


def test_a_compile_worker_gives_tqdm_a_thread_lock_not_a_semaphore() -> None:
    """A compile worker is killed once its results are in; a multiprocessing semaphore it made
    (tqdm's default lock, made when torch's FX interpreter draws a progress bar) was then reported
    as leaked by Python's resource tracker at the end of every cold build. The worker's start gives
    tqdm a thread lock first, so a bar registers no semaphore."""
    # A spawned worker's semaphores are named and registered (a forked process's are not).
    script = """
import multiprocessing, os
from multiprocessing import resource_tracker
multiprocessing.set_start_method("spawn", force=True)
registered = []
resource_tracker.register = lambda name, rtype: registered.append((name, rtype))
from llmc.builder.targets.cpu import _start_worker
_start_worker(os.getppid(), 0)
from tqdm import tqdm
bar = tqdm(total=1, disable=False, file=open(os.devnull, "w"))
bar.update(1)
bar.close()
print(registered)
"""
    result = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def _planned_formats(isq: str) -> dict[str, str]:
    """SmolLM2's tensors' formats as the build plans them for `isq` (unquantized ones "f32")."""
    plan = plan_quantization(SMOLLM2_SPEC, smollm2_tensor_shapes(), isq)
    return {name: entry.format or "f32" for name, entry in plan.items()}


def test_a_compile_worker_is_started_early_only_where_the_plan_may_want_one() -> None:
    """SmolLM2's alike layers plan to one program (runs of 10 sharing it): no worker is started for
    nothing beside the build; a mix of layer forms, the user's runs or two capabilities may want one."""
    smollm2, options = 96 << 20, CompileOptions()
    alike = _planned_formats("q4_0")
    assert not _may_split(options, SMOLLM2_SPEC, alike, smollm2, ["AVX2"])
    assert _may_split(CompileOptions(layers_per_program=5), SMOLLM2_SPEC, alike, smollm2, ["AVX2"])
    assert _may_split(options, SMOLLM2_SPEC, alike, smollm2, ["AVX512", "AVX2"])
    # q4k's mix keeps some layers' down_proj in q6k: a program per form, compiled at once.
    mixed = _planned_formats("q4k")
    assert _may_split(options, SMOLLM2_SPEC, mixed, smollm2, ["AVX2"])
    # Sliding and full attention in turn: two forms as well.
    sliding = msgspec.structs.replace(SMOLLM2_SPEC, layer_types=["sliding_attention", "full_attention"] * 15)
    assert _may_split(options, sliding, alike, smollm2, ["AVX2"])
    # A step too short for a second call: one program, whatever the layers.
    assert not _may_split(options, SMOLLM2_SPEC, mixed, 1 << 20, ["AVX2"])
