"""Issue 24 items 0 and 1 for the compile stage (builder/targets/cpu.py): the decode step is traced
from fake weights (the compile holds no weight, whatever the model's size), and the spawned
compile workers die with the build however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch._subclasses.fake_tensor import FakeTensor

from llmc.artifacts.reader import Artifact
from llmc.benchmarks.synthetic_models import llama_config, make_model
from llmc.builder.targets.base import CompileOptions
from llmc.builder.targets.cpu import export_layers, lower_program, model_from_stage, module_fqns
from llmc.model.decoder import COMPUTE_DTYPES
from tests.conftest import make_tiny_llama

# Bounds of the waits on the child build: far above what each step takes on a loaded 2-core
# machine (the worker starts within seconds; a killed process's children get their signal at once).
_WORKER_START_SECONDS = 120.0
_WORKER_EXIT_SECONDS = 10.0
_POLL_SECONDS = 0.1


# A one-layer model whose large vocabulary (2^20 x 64, tied) gives prepared forms of ~200 MB
# (int4 pairs and a bf16 copy of the q8_0 table), far above how much Inductor's compile of so
# small a graph varies in memory; everything else about it is tiny, so it compiles in seconds.
_LARGE_PREPARED = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1 << 20,
}
# The compile may grow the process's peak RSS by at most this fraction of the prepared forms'
# bytes: a copy of them (Inductor cloning every buffer, or weights read back) adds 1.0 to the
# compile's own ~0.26 (measured: 58 MB for 218 MB of forms, 275 MB with Inductor's copies).
_MAX_COMPILE_GROWTH_FRACTION = 0.5


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def _eager_artifact(tmp_path: Path, isq: str, model: Path | None = None) -> Artifact:
    model = model or make_tiny_llama(tmp_path / "model")
    out = tmp_path / "artifact"
    cmd = [sys.executable, "-P", "-m", "llmc", "build", "--m", str(model), "--isq", isq]
    done = subprocess.run([*cmd, "--no-compile", "--no-cpu-kernels", "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return Artifact.open(out)


def test_the_traced_model_holds_no_weight_and_its_computed_constants_are_real(tmp_path: Path) -> None:
    artifact = _eager_artifact(tmp_path, "q8_0")
    manifest = artifact.manifest
    files = sorted({t.file for t in manifest.tensors})
    formats = {t.name: t.quant for t in manifest.tensors if t.quant is not None}
    dtype = COMPUTE_DTYPES[manifest.dtype]
    options = CompileOptions(buckets=(1, 8), max_seq_len=64)
    # The staged weights' values are never read: overwriting them (past each file's header) with
    # garbage changes nothing, since only the headers' shapes and dtypes are.
    for name in files:
        path = artifact.root / name
        header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        path.write_bytes(path.read_bytes()[:header] + b"\xff" * (path.stat().st_size - header))
    model = model_from_stage(artifact.root, files, manifest.model, formats, dtype, options, None)
    rope_tables = (".cos", ".sin", ".cos_long", ".sin_long")
    weights = [*model.named_parameters(), *((n, t) for n, t in model.named_buffers() if not n.endswith(rope_tables))]
    assert weights and all(isinstance(tensor, FakeTensor) for _, tensor in weights), [
        name for name, tensor in weights if not isinstance(tensor, FakeTensor)
    ]
    # Every prepared form the weight forms need is there, as for the runtime: packed int4 pairs
    # and their dense copies (shapes and dtypes only).
    prepared = dict(model.named_buffers())
    head = model.model.layers[0].mlp.down_proj.prepared
    assert head.packed is not None and head.packed_low is not None and head.dense is not None
    assert head.dense.dtype == torch.bfloat16 and list(head.dense.shape) == [head.out_features, head.in_features]
    assert any(name.endswith(".dense") for name in prepared)
    # The rope tables are computed from the config, for real (the runtime hands the package its own).
    rope = model.model.layers[0].self_attn.rope
    assert not isinstance(rope.cos, FakeTensor) and torch.isfinite(rope.cos).all() and rope.cos[0].eq(1).all()

    exported, _, buckets = export_layers(model, options, "dense")
    assert buckets == [8]
    # What Inductor compiles from: real tensors of the fake weights' shapes, dtypes and strides.
    for name, tensor in exported.state_dict.items():
        assert not isinstance(tensor, FakeTensor), name
        original = prepared.get(name)
        if original is not None:
            assert (tensor.shape, tensor.dtype, tensor.stride()) == (original.shape, original.dtype, original.stride())
    with safe_open(str(artifact.root / files[0]), framework="pt") as handle:
        assert handle.get_slice(next(iter(handle.keys()))).get_shape()  # the header is intact


def test_the_traced_step_has_no_no_op_conversion_and_no_aliased_caches(tmp_path: Path) -> None:
    """torch.export records even a no-op `.to()`/`.float()` (kernels/casts.py); every node costs the
    compile, and such no-ops were a third of the decode step's nodes."""
    artifact = _eager_artifact(tmp_path, "q4_1")
    manifest = artifact.manifest
    files = sorted({t.file for t in manifest.tensors})
    formats = {t.name: t.quant for t in manifest.tensors if t.quant is not None}
    options = CompileOptions(buckets=(1, 8), max_seq_len=64)
    model = model_from_stage(
        artifact.root, files, manifest.model, formats, COMPUTE_DTYPES[manifest.dtype], options, None
    )
    exported, _, _ = export_layers(model, options, "packed")
    conversions = [node for node in exported.graph.nodes if node.target is torch.ops.aten.to.dtype]
    assert conversions  # the norms' float64 mean square: real conversions stay
    no_ops = [node.name for node in conversions if node.args[0].meta["val"].dtype == node.args[1]]
    assert no_ops == []
    # Nor do its KV caches alias: traced as views of one allocation (as the runtime holds them),
    # the compiler checks every pair of them for overlap, a third of SmolLM2's compile.
    count = 2 * len(model.model.layers)
    caches = [node.meta["val"] for node in exported.graph.nodes if node.op == "placeholder"][-count:]
    assert count > 2 and len({cache.untyped_storage()._cdata for cache in caches}) == count


def test_with_the_kernel_library_each_norm_is_one_op_in_the_traced_step(
    tmp_path: Path, cpu_kernels_loaded: None
) -> None:
    """A norm written in torch ops is a float64 reduction and five element-wise ops that Inductor
    generates code for: a sixth of SmolLM2's compile (docs/BENCHMARKS.md). With the library loaded
    the step calls `llmc::rms_norm` once per norm and holds no reduction of its own."""
    from llmc.builder.targets.cpu import _library
    from llmc.kernels.cpu import cpu_kernels

    artifact = _eager_artifact(tmp_path, "q4_1")
    manifest = artifact.manifest
    isa = cpu_kernels.loaded_isa()
    assert isa is not None
    library = _library(isa)
    cpu_kernels.compile_library(artifact.root / library.file, isa)  # the bytes this process loaded
    files = sorted({t.file for t in manifest.tensors})
    formats = {t.name: t.quant for t in manifest.tensors if t.quant is not None}
    options = CompileOptions(buckets=(1, 8), max_seq_len=64)
    dtype = COMPUTE_DTYPES[manifest.dtype]
    model = model_from_stage(artifact.root, files, manifest.model, formats, dtype, options, library)
    exported, _, _ = export_layers(model, options, "packed", logits=True)
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.llmc.rms_norm.default) == 2 * manifest.model.num_layers + 1
    assert torch.ops.aten.mean.dim not in targets


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_compiling_holds_no_copy_of_the_prepared_weights(tmp_path: Path) -> None:
    source = make_model(tmp_path / "model", llama_config("llama-3.2-1b", **_LARGE_PREPARED))
    artifact = _eager_artifact(tmp_path, "q8_0", source)
    manifest = artifact.manifest
    files = sorted({t.file for t in manifest.tensors})
    formats = {t.name: t.quant for t in manifest.tensors if t.quant is not None}
    options = CompileOptions(buckets=(1, 8), max_seq_len=64)
    model = model_from_stage(artifact.root, files, manifest.model, formats, torch.float32, options, None)
    prepared = sum(tensor.nbytes for tensor in model.buffers())
    assert prepared > 150 << 20  # the premise: the forms dwarf the compile's own variation
    exported, module, _ = export_layers(model, options, "dense", logits=True, embed=True)
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from now
    before = _rss_kb("VmRSS")
    lower_program(
        exported, module_fqns(module), tmp_path, "compiled/decode", torch.backends.cpu.get_cpu_capability(), 1
    )
    growth = (_rss_kb("VmHWM") - before) * 1024
    assert growth < _MAX_COMPILE_GROWTH_FRACTION * prepared, (growth, prepared)


def _children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="with one core the build compiles in its own process only")
def test_no_compile_worker_outlives_a_killed_build(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "model")
    # q8_0 without llmc's kernels has a "dense" weight form besides "packed" (int4 pairs): its
    # package compiles in a spawned worker while the build process compiles the other.
    cmd = [sys.executable, "-P", "-m", "llmc", "--log-level", "info", "build", "--m", str(model), "--isq", "q8_0"]
    cmd += ["--no-cpu-kernels", "--buckets", "1,8", "--max-seq-len", "64", "-o", str(tmp_path / "out")]
    log = tmp_path / "build.log"
    env = {**os.environ, "LLMC_CACHE_DIR": str(tmp_path / "cache")}
    with log.open("w") as stderr:
        build = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        deadline = time.monotonic() + _WORKER_START_SECONDS
        workers: list[int] = []
        # Until the worker runs and the build process has traced its own package: the worker is
        # then well into its compile (it was started before that trace).
        while not (workers and 'stage="export"' in log.read_text()):
            assert build.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            workers = [pid for pid in _children(build.pid) if _is_worker(pid)]
            time.sleep(_POLL_SECONDS)
        build.send_signal(signal.SIGKILL)  # as the OOM killer does: no handler, no cleanup
        build.wait()
        deadline = time.monotonic() + _WORKER_EXIT_SECONDS
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(_POLL_SECONDS)
        survivors = [pid for pid in workers if _alive(pid)]
        for pid in survivors:  # do not leave them behind even when the test fails
            os.kill(pid, signal.SIGKILL)
        assert not survivors
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
