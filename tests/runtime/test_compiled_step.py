"""Issue 5: the ahead-of-time compiled decode step gives what the eager model gives.

Each build here compiles an AOTInductor package (tens of seconds for SmolLM2 on 2 cores), so the
artifacts are module-scoped and shared by the tests.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import load as safetensors_load

from llmc.artifacts.manifest import KernelLibrary, Manifest
from llmc.artifacts.reader import Artifact
from llmc.builder.targets.base import CompileOptions
from llmc.errors import BadArtifactError, InternalError
from llmc.kernels.cpu import autotune, cpu_kernels
from llmc.kernels.cpu.qmatmul_cpu import DENSE_MIN_ROWS, CpuQMatmul
from llmc.kernels.cpu.rms_norm import CpuRMSNorm
from llmc.model.decode_step import DecodeStep
from llmc.model.layers import RMSNorm
from llmc.runtime.backends import aoti_step
from llmc.runtime.backends.cpu import incompatibility, load_cpu_kernels
from llmc.runtime.engine import Engine, EngineConfig
from llmc.runtime.sampling_params import SamplingParams
from tests.conftest import make_tiny_llama
from tests.helpers import build_compiled, generate, open_engine

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
BUCKETS = (1, 2, 4, 8, 16)
# How far a compiled program's float32 logits may be from eager torch's where the two sum in
# another order (test_the_programs_compute_the_whole_steps_logits).
_REDUCTION_ORDER_RTOL = 1e-4
_REDUCTION_ORDER_ATOL = 1e-5


def _prompts(count: int, vocab: int, seed: int) -> list[list[int]]:
    """`count` prompts of different lengths (3 to 40 tokens), so block tables differ in width."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (3 + (i * 7) % 38,), generator=gen).tolist() for i in range(count)]


def _compare(artifact: Path, vocab: int, batches: tuple[int, ...], max_model_len: int | None = None) -> None:
    # Both with the built-in weight forms (`--no-autotune`): a plan measured on this host may give
    # the eager engine dense copies from a few rows (f32 GEMMs beat the kernel on a tiny model's
    # shapes), which a package traced with the packed forms does not take, and a random model's
    # greedy tokens flip on such rounding differences.
    eager = open_engine(artifact, compiled=False, kv_blocks=256, max_model_len=max_model_len, autotune=False)
    compiled = open_engine(artifact, kv_blocks=256, max_model_len=max_model_len, autotune=False)
    assert eager.runner.compiled == []
    assert compiled.runner.compiled
    for batch in batches:
        prompts = _prompts(batch, vocab, seed=batch)
        expected = generate(eager, prompts, GREEDY)
        before = compiled.runner.compiled_steps
        got = generate(compiled, prompts, GREEDY)
        assert got == expected, f"batch {batch}"
        # every decode step after the prefill ran compiled (prefill steps run eagerly)
        assert compiled.runner.compiled_steps - before >= GREEDY.max_tokens - 1


@pytest.fixture(scope="module")
def tiny_compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = make_tiny_llama(tmp_path_factory.mktemp("aot-src") / "llama")
    out = tmp_path_factory.mktemp("aot") / "tiny"
    result = build_compiled(source, out, "tiny", CompileOptions(buckets=BUCKETS))
    assert [c.kind for c in result.manifest.compiled_for("cpu")] == ["decode"]
    return out


def test_tiny_compiled_matches_eager(tiny_compiled: Path) -> None:
    vocab = json.loads((tiny_compiled / "manifest.json").read_text())["model"]["vocab_size"]
    _compare(tiny_compiled, vocab, (1, 3, 16))


def test_the_rope_tables_are_the_runtimes_not_the_packages(tiny_compiled: Path) -> None:
    """A package keeps no rope table of its own (Llama 3's 131072 positions took 128 MB per
    program, read and held by every server): the runtime hands it its tables, sized to the context
    it serves, and the compiled step still gives eager's tokens from tables shorter than the
    compiled maximum."""
    manifest = json.loads((tiny_compiled / "manifest.json").read_text())
    [step] = manifest["targets"]["cpu"]["compiled"]
    for program in step["programs"]:
        made = safetensors_load((tiny_compiled / program["constants"]).read_bytes())
        assert all(tensor.numel() < step["max_seq_len"] for tensor in made.values()), {
            name: tuple(tensor.shape) for name, tensor in made.items()
        }
    # 40 prompt tokens and 24 generated reach position 63: the runtime's tables hold 64 of 256.
    assert step["max_seq_len"] == 256
    _compare(tiny_compiled, manifest["model"]["vocab_size"], (1, 3), max_model_len=64)


def test_runs_of_layers_share_one_program_and_match_eager(tmp_path: Path) -> None:
    """`--layers-per-program 1` on a model of identical layers: one program serves every layer, each
    call with its own layer's weights (the first call embedding the tokens by a select, the last
    computing the logits by a flag); the tokens are eager execution's at every batch size."""
    source = make_tiny_llama(tmp_path / "src")
    out = tmp_path / "tiny"
    result = build_compiled(source, out, "tiny", CompileOptions(buckets=BUCKETS, layers_per_program=1))
    (step,) = result.manifest.compiled_for("cpu")
    layers = result.manifest.model.num_layers
    assert layers > 1 and [p.layers for p in step.programs] == [1] and step.order == [0] * layers
    assert step.logits is None and not step.programs[0].logits and not step.programs[0].embed
    assert step.programs[0].embed_select and step.programs[0].logits_select and not step.eager_logits
    vocab = result.manifest.model.vocab_size
    _compare(out, vocab, (1, 3))


def test_a_shared_last_program_computes_the_logits_beside_an_eager_embedding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the embedding is looked up eagerly (a K-quant table's lookup is slow to compile into a
    program; forced here), the shared program takes only the logits' flag, without the ids and
    theirs; the tokens are eager execution's."""

    monkeypatch.setattr(sys.modules["llmc.builder.targets.cpu"], "_lookup_compiles_quickly", lambda model: False)
    # Neither the compile cache's step of the same model (which embeds by a select) nor one left
    # there for the other tests: compiled afresh, kept out of the cache.
    cache = sys.modules["llmc.builder.compile_cache"]
    monkeypatch.setattr(cache, "load", lambda key: None)
    monkeypatch.setattr(cache, "store", lambda key, meta, files: None)
    source = make_tiny_llama(tmp_path / "src")
    out = tmp_path / "tiny"
    result = build_compiled(source, out, "tiny", CompileOptions(buckets=BUCKETS, layers_per_program=1))
    (step,) = result.manifest.compiled_for("cpu")
    (program,) = step.programs
    assert program.logits_select and not program.embed_select and not program.embed and not step.eager_logits
    _compare(out, result.manifest.model.vocab_size, (1, 3))


@pytest.fixture(scope="module")
def tiny_q8_compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Quantized to q8_0 without llmc's CPU kernels: its layers run as int4 pairs, which switch to
    their dense bf16 copies from DENSE_MIN_ROWS rows, so the build compiles a package for each form."""
    source = make_tiny_llama(tmp_path_factory.mktemp("aot-q8-src") / "llama")
    out = tmp_path_factory.mktemp("aot-q8") / "tiny"
    result = build_compiled(source, out, "tiny", CompileOptions(buckets=BUCKETS), isq="q8_0", cpu_kernels=False)
    assert result.manifest.kernels_for("cpu") == []
    return out


@pytest.fixture(scope="module")
def tiny_q8_vnni(cpu_kernels_loaded: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Quantized to q8_0 with llmc's CPU kernels: one package, computing with the VNNI kernel."""
    source = make_tiny_llama(tmp_path_factory.mktemp("aot-q8v-src") / "llama")
    out = tmp_path_factory.mktemp("aot-q8v") / "tiny"
    build_compiled(source, out, "tiny", CompileOptions(buckets=BUCKETS), isq="q8_0")
    return out


def test_vnni_build_has_one_package_calling_the_kernels_and_matches_eager(tiny_q8_vnni: Path) -> None:
    manifest = json.loads((tiny_q8_vnni / "manifest.json").read_text())
    assert {k["file"] for k in manifest["targets"]["cpu"]["kernels"]} <= {f["path"] for f in manifest["files"]}
    [step] = manifest["targets"]["cpu"]["compiled"]
    assert (step["weights"], step["cpu_kernels"], step["buckets"]) == ("packed", True, list(BUCKETS))
    engine = open_engine(tiny_q8_vnni, kv_blocks=256)
    assert any(isinstance(m, CpuQMatmul) and m.kernel_weight is not None for m in engine.runner.model.modules())
    norms = [m for m in engine.runner.model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(isinstance(m, CpuRMSNorm) for m in norms)  # the library's op, as in the trace
    _compare(tiny_q8_vnni, manifest["model"]["vocab_size"], (1, 3, 16))


def _with_kernels(manifest: Manifest, kernels: list[KernelLibrary]) -> Manifest:
    """The manifest with other CPU kernel libraries in its cpu target."""
    code = msgspec.structs.replace(manifest.targets["cpu"], kernels=kernels)
    return msgspec.structs.replace(manifest, targets={**manifest.targets, "cpu": code})


def test_kernels_compiled_for_another_torch_are_not_loaded(tiny_q8_vnni: Path) -> None:
    artifact = Artifact.open(tiny_q8_vnni)
    kernels = artifact.manifest.kernels_for("cpu")
    assert kernels
    other = [msgspec.structs.replace(library, torch_version="1.0.0") for library in kernels]
    assert not load_cpu_kernels(Artifact(artifact.root, _with_kernels(artifact.manifest, other)))
    assert load_cpu_kernels(artifact)


def test_kernels_the_manifest_does_not_list_are_refused(tiny_q8_vnni: Path) -> None:
    artifact = Artifact.open(tiny_q8_vnni)
    kernels = artifact.manifest.kernels_for("cpu")
    assert kernels
    unlisted = [msgspec.structs.replace(library, file="../elsewhere.so") for library in kernels]
    with pytest.raises(BadArtifactError, match="does not list"):
        load_cpu_kernels(Artifact(artifact.root, _with_kernels(artifact.manifest, unlisted)))


def test_a_package_calling_the_kernels_is_not_used_without_them(tiny_q8_vnni: Path) -> None:
    manifest = Artifact.open(tiny_q8_vnni).manifest
    [info] = manifest.compiled_for("cpu")
    assert incompatibility(info, info.block_size, cpu_kernels=False) == (
        "it calls the artifact's CPU kernels, which this process runs without (see the warning before)"
    )
    assert incompatibility(info, info.block_size, cpu_kernels=True) is None


def test_quantized_build_has_a_dense_package_for_large_buckets(tiny_q8_compiled: Path) -> None:
    manifest = json.loads((tiny_q8_compiled / "manifest.json").read_text())
    forms = {step["weights"]: step["buckets"] for step in manifest["targets"]["cpu"]["compiled"]}
    assert forms == {"packed": list(BUCKETS), "dense": [b for b in BUCKETS if b >= DENSE_MIN_ROWS]}


def test_dense_package_runs_the_large_batches_and_matches_eager(tiny_q8_compiled: Path) -> None:
    """With the default plan (`--no-autotune`; a measured one may find the tiny model's dense
    copies slower and keep none), which keeps bf16 copies only on CPUs with native bf16."""
    if not autotune.native_bf16(cpu_kernels.host_cpu_flags()):
        pytest.skip("without native bf16 no plan keeps the bf16 copies the dense package computes with")
    vocab = json.loads((tiny_q8_compiled / "manifest.json").read_text())["model"]["vocab_size"]
    engine = open_engine(tiny_q8_compiled, kv_blocks=256, autotune=False)
    packed, dense = sorted(engine.runner.compiled, key=lambda c: c.info.weights != "packed")
    assert (packed.info.weights, dense.info.weights) == ("packed", "dense")
    _compare(tiny_q8_compiled, vocab, (1, 3, 5, 11, 16))
    # 5 sequences pad to bucket 8 but compute with the packed weights, as eagerly; 11 pad to 16.
    for batch, used in ((3, packed), (5, packed), (11, dense), (16, dense)):
        before = used.calls
        generate(engine, _prompts(batch, vocab, seed=batch), GREEDY)
        assert used.calls - before >= GREEDY.max_tokens - 1, batch


def test_without_dense_copies_the_packed_package_runs_every_batch(tiny_q8_compiled: Path) -> None:
    engine = open_engine(tiny_q8_compiled, kv_blocks=256, dense_weights=False)
    [packed] = engine.runner.compiled
    assert packed.info.weights == "packed"
    vocab = json.loads((tiny_q8_compiled / "manifest.json").read_text())["model"]["vocab_size"]
    generate(engine, _prompts(16, vocab, seed=16), GREEDY)
    assert packed.calls >= GREEDY.max_tokens - 1


def test_artifact_lists_and_hashes_the_package(tiny_compiled: Path) -> None:
    manifest = json.loads((tiny_compiled / "manifest.json").read_text())
    step = manifest["targets"]["cpu"]["compiled"][0]
    files = {f["path"] for f in manifest["files"]}
    [program] = step["programs"]  # a tiny model: one program of every layer, embedding and logits inside
    assert program["embed"] and program["logits"] and step["order"] == [0] and step["logits"] is None
    assert {program["package"], program["constants"]} <= files
    assert step["buckets"] == list(BUCKETS)
    assert step["torch_version"] == torch.__version__.split("+")[0]
    assert manifest["build"]["flags"]["compile"]["buckets"] == list(BUCKETS)


def test_the_package_carries_no_input_check_code(tiny_compiled: Path) -> None:
    """AOTInductor's debug checks of the inputs (on only under $AOTI_RUNTIME_CHECK_INPUTS) were half
    of the wrapper g++ compiled (builder/targets/cpu.py _no_input_check_code); llmc checks the
    inputs itself (test_compiled_step_refuses_out_of_range_inputs). Their messages are their trace."""
    manifest = json.loads((tiny_compiled / "manifest.json").read_text())
    [step] = manifest["targets"]["cpu"]["compiled"]
    with zipfile.ZipFile(tiny_compiled / step["programs"][0]["package"]) as package:
        libraries = [package.read(name) for name in package.namelist() if name.endswith(".so")]
    assert libraries
    for library in libraries:
        assert b"unmatched dtype" not in library and b"dim value is too" not in library


def test_loading_a_package_leaves_no_file_behind(
    tiny_compiled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given the .pt2 file, torch's loader unpacked it into a /tmp/aotinductor_* folder that lived as
    long as the loader, and that every killed server left behind; llmc unpacks it itself and
    removes the folder once it is loaded (runtime/backends/aoti_step.py)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # where torch's loader unpacks (C++ reads $TMPDIR)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    engine = open_engine(tiny_compiled, kv_blocks=64)
    assert engine.runner.compiled
    assert list(scratch.iterdir()) == []
    assert generate(engine, [[5, 6, 7]], GREEDY)[0]
    assert engine.runner.compiled_steps > 0


def test_a_torch_whose_loader_takes_no_folder_loads_the_file(
    tiny_compiled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = aoti_step._loader
    tried: list[str] = []

    def file_only(path: str) -> torch._C._aoti.AOTIModelPackageLoader:
        tried.append(path)
        if Path(path).is_dir():
            raise RuntimeError("Unsupported model package: not a zip file")
        return original(path)

    monkeypatch.setattr(aoti_step, "_loader", file_only)
    engine = open_engine(tiny_compiled, kv_blocks=64)
    assert engine.runner.compiled and [Path(p).suffix for p in tried] == ["", ".pt2"]
    assert generate(engine, [[5, 6, 7]], GREEDY)[0] and engine.runner.compiled_steps > 0


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["../escape.so", "/abs/model.so", "pkg/../../escape.so", "pkg\\..\\x.so"])
def test_a_package_naming_a_path_outside_itself_is_refused(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(BadArtifactError, match="outside the package"):
        aoti_step._unpack(_zip({"pkg/ok.txt": b"fine", name: b"x"}), root)
    assert not (tmp_path / "escape.so").exists() and not Path("/abs/model.so").exists()


def test_a_package_unpacking_beyond_the_bound_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aoti_step, "_MAX_UNPACKED_BYTES", 1000)
    with pytest.raises(BadArtifactError, match="more than the 1000"):
        aoti_step._unpack(_zip({"a.so": b"\0" * 600, "b.so": b"\0" * 600}), tmp_path)
    assert list(tmp_path.iterdir()) == []
    aoti_step._unpack(_zip({"pkg/a.so": b"\0" * 600}), tmp_path)  # within the bound: unpacked
    assert (tmp_path / "pkg" / "a.so").read_bytes() == b"\0" * 600
    with pytest.raises(BadArtifactError, match="cannot be unpacked"):
        aoti_step._unpack(b"not a zip archive", tmp_path)


def test_compiled_build_is_reproducible(tiny_compiled: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    manifest = json.loads((tiny_compiled / "manifest.json").read_text())
    source = manifest["build"]["source"]["name"]
    build_compiled(source, again, "tiny", CompileOptions(buckets=BUCKETS))
    for info in manifest["files"]:
        assert (again / info["path"]).read_bytes() == (tiny_compiled / info["path"]).read_bytes(), info["path"]
    assert (again / "manifest.json").read_bytes() == (tiny_compiled / "manifest.json").read_bytes()


def test_package_from_another_torch_runs_eagerly(tiny_compiled: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_compiled, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for step in manifest["targets"]["cpu"]["compiled"]:
        step["torch_version"] = "1.0.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    engine = open_engine(copy, kv_blocks=64)
    assert engine.runner.compiled == []
    assert generate(engine, [[5, 6, 7]], GREEDY)[0]  # and it still serves, eagerly


def test_package_changed_after_the_check_is_not_loaded(tiny_compiled: Path, tmp_path: Path) -> None:
    """The package runs from the bytes whose sha256 was checked, not from a file reopened later."""
    copy = Path(shutil.copytree(tiny_compiled, tmp_path / "copy"))
    artifact = Artifact.open(copy)  # verified
    package = copy / artifact.manifest.compiled_for("cpu")[0].programs[0].package
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0x01
    package.write_bytes(bytes(data))  # swapped between the check and the load
    with pytest.raises(BadArtifactError, match=r"decode_cpu\.p0\.pt2 fails its sha256 check"):
        Engine(artifact, EngineConfig(kv_blocks=64))
    assert Engine(artifact, EngineConfig(kv_blocks=64, compiled=False)).runner.compiled == []  # --eager never reads it


@pytest.mark.parametrize("layers_per_program", [None, 1])
def test_the_programs_compute_the_whole_steps_logits(layers_per_program: int | None, tmp_path: Path) -> None:
    """The compiled programs, chained (one of every layer, or one shared by every run with the
    embedding and the logits eager), give the logits of the whole decode step (DecodeStep,
    the reference they are cut from) bit for bit, a padded batch included."""
    source = make_tiny_llama(tmp_path / "src")
    out = tmp_path / "tiny"
    build_compiled(source, out, "tiny", CompileOptions(buckets=BUCKETS, layers_per_program=layers_per_program))
    engine = open_engine(out, kv_blocks=16, autotune=False)
    [step] = engine.runner.compiled
    kv = engine.runner._kv_flat
    torch.manual_seed(0)
    for cache in kv:
        cache.copy_(torch.randn_like(cache))
    ids, pos = torch.tensor([5, 7, 11]), torch.tensor([3, 20, 40])
    table, lens = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]]), torch.tensor([4, 21, 41])
    block = engine.runner.block_size
    assert block == 16  # the tables above: 9 blocks of 16 tokens, block 15 free for the padding row
    slots = torch.tensor([3, 4 * block + 4, 8 * block + 8])  # where positions 3, 20, 40 go
    whole = DecodeStep(engine.runner.model, block)
    with torch.inference_mode():
        got = step(ids, pos, slots, table, lens, kv, pad_slot=15 * block)
        expected = whole(ids, pos, slots, table, lens, kv)  # writes the same keys and values again
    # Bit for bit where Inductor's vector width sums as eager torch does (the AMX Xeon); elsewhere
    # (an AMD EPYC) reductions add in another order: ~1e-5 apart, where a wrong layer's tensors
    # or a skipped layer moves the logits by their own size (1.5e-7 apart, measured on the EPYC).
    torch.testing.assert_close(got, expected, rtol=_REDUCTION_ORDER_RTOL, atol=_REDUCTION_ORDER_ATOL)


def test_compiled_step_refuses_out_of_range_inputs(tiny_compiled: Path) -> None:
    engine = open_engine(tiny_compiled, kv_blocks=16)
    [step] = engine.runner.compiled
    kv = engine.runner._kv_flat
    slots = kv[0].shape[0]
    ids, pos = torch.tensor([1]), torch.tensor([0])
    table, lens = torch.tensor([[0]]), torch.tensor([1])
    with pytest.raises(InternalError, match="slot"):
        step(ids, pos, torch.tensor([slots]), table, lens, kv, pad_slot=0)
    with pytest.raises(InternalError, match="block id"):
        step(ids, pos, torch.tensor([0]), torch.tensor([[slots]]), lens, kv, pad_slot=0)
    with pytest.raises(InternalError, match="context length"):
        step(ids, pos, torch.tensor([0]), table, torch.tensor([17]), kv, pad_slot=0)
    with pytest.raises(InternalError, match="batch"):
        many = BUCKETS[-1] + 1
        step(
            torch.zeros(many, dtype=torch.int64),
            torch.zeros(many, dtype=torch.int64),
            torch.zeros(many, dtype=torch.int64),
            torch.zeros(many, 1, dtype=torch.int64),
            torch.ones(many, dtype=torch.int64),
            kv,
            pad_slot=0,
        )


# q4k's quantized matmuls take bf16 activations, which turn a last-bit difference before them into
# a different bf16 and, a dozen tokens later, a different greedy token. RMSNorm accumulating in
# float64 is what keeps the compiled step's fused reductions bit-equal to eager's.
@pytest.mark.parametrize(
    ("isq", "batches", "layers_per_program"),
    [("none", (1, 3, 16), None), ("q4k", (1, 3, 16), None), ("none", (1, 3), 5)],
)
def test_smollm2_compiled_matches_eager(
    isq: str,
    batches: tuple[int, ...],
    layers_per_program: int | None,
    smollm2_gguf: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Acceptance 1: identical greedy continuations, f32 and q4k, batches 1, 3 (padded to 4) and 16,
    the default programs chained; also with runs of 5 layers sharing one program (the tied
    embedding looked up by a select and the logits computed by a flag)."""
    out = tmp_path_factory.mktemp(f"aot-smollm2-{isq}") / "artifact"
    options = CompileOptions(buckets=BUCKETS, max_seq_len=512, layers_per_program=layers_per_program)
    result = build_compiled(smollm2_gguf, out, "smollm2", options, isq=isq)
    steps = result.manifest.compiled_for("cpu")
    for step in steps:
        # The first run's program embeds the tokens: from them alone where it serves no other run,
        # else by a select; the last run's ends with the logits where it serves no other run, else
        # computes them by a flag.
        first, last = step.programs[step.order[0]], step.programs[step.order[-1]]
        shared_first = step.order.count(step.order[0]) > 1
        shared_last = step.order.count(step.order[-1]) > 1
        assert (first.embed_select, first.embed) == (shared_first, not shared_first)
        assert (last.logits_select, last.logits) == (shared_last, not shared_last)
        assert step.logits is None and not step.eager_logits
    if layers_per_program is not None:
        assert {len(step.order) for step in steps} == {6}
    _compare(out, vocab=49152, batches=batches, max_model_len=512)
