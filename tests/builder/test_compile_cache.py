"""Issue 24 item 0 and issue 25 item 3: the compile cache (builder/compile_cache.py), packages for
the host's and a baseline CPU capability (builder/targets/cpu.py), and the runtime's choice of the
best package the host supports (runtime/backends/cpu.py)."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import torch

from llmc.artifacts.manifest import CompiledStep, LayerProgram, capability_rank
from llmc.builder import compile_cache
from llmc.builder.targets.base import CompileOptions
from llmc.builder.targets.cpu import (
    _probe_only_the_chosen_isa,
    _wrapper_beside_the_kernels,
    capabilities,
    inductor_configs,
)
from llmc.errors import BadInputError
from llmc.runtime.backends.cpu import incompatibility
from llmc.runtime.sampling_params import SamplingParams
from tests.conftest import make_tiny_llama
from tests.helpers import build_compiled, generate, open_engine

BUCKETS = (1, 2, 4)
HOST = torch.backends.cpu.get_cpu_capability()
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 9, 13, 2], [7, 3, 11, 19, 23, 29, 31]]
# A tiny model's build in a child process: ~30 s here; one stuck far beyond that is broken.
_BUILD_TIMEOUT_S = 600


def test_capabilities_compiled_for_each_cpu_isa_choice() -> None:
    assert capabilities("all", "AVX512") == ["AVX512", "AVX2"]
    assert capabilities("baseline", "AVX512") == ["AVX2"]
    assert capabilities("host", "AVX512") == ["AVX512"]
    # An AVX2 host is the baseline already; a host outside x86 has no baseline below it.
    assert capabilities("all", "AVX2") == capabilities("baseline", "AVX2") == ["AVX2"]
    assert capabilities("all", "SVE256") == capabilities("baseline", "SVE256") == ["SVE256"]
    assert capabilities("all", "DEFAULT") == ["DEFAULT"]
    with pytest.raises(BadInputError, match="--cpu-isa 'avx9' is not one of host, baseline, all"):
        capabilities("avx9", "AVX512")
    # The baseline package's code is generated for 256-bit vectors; the host's as Inductor picks.
    assert inductor_configs("AVX2", "AVX512", 2)["cpp.simdlen"] == 256
    assert "cpp.simdlen" not in inductor_configs("AVX512", "AVX512", 2)


def test_packages_compile_without_precompiled_headers() -> None:
    """Precompiled headers cost a cold build more g++ time than they saved it (5.9 + 5.6 s for one
    package) and left ~280 MB per flag set in /tmp/torchinductor_$USER (builder/targets/cpu.py).
    An option name Inductor does not know would fail the patch."""
    with torch._inductor.config.patch(inductor_configs("AVX2", "AVX512", 2)):
        assert torch._inductor.config.aot_inductor.precompile_headers is False


def test_a_package_of_another_vector_width_probes_no_avx512_isa(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor test-compiles a probe per AVX-512 extension before it picks the ISA of `cpp.simdlen`;
    the baseline (AVX2) package needs none of them. The CPU's flags are those of an AMX machine
    here, so that the test means the same on every host."""
    from torch._inductor import config, cpu_vec_isa

    probed: list[str] = []

    def probe(self: cpu_vec_isa.VecISA) -> bool:
        probed.append(str(self))
        return True

    for kind in (cpu_vec_isa.VecAVX512, cpu_vec_isa.VecAVX512VNNI, cpu_vec_isa.VecAMX):
        monkeypatch.setattr(kind, "__bool__", probe)
    monkeypatch.setattr(cpu_vec_isa, "x86_isa_checker", lambda: ["avx2", "avx512", "avx512_vnni", "amx_tile"])
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    try:
        cpu_vec_isa.valid_vec_isa_list.cache_clear()
        with config.patch({"cpp.simdlen": 256, "cpp.vec_isa_ok": True}), _probe_only_the_chosen_isa():
            chosen = cpu_vec_isa.pick_vec_isa()
        assert str(chosen) == "avx2"
        assert probed == []
        # This machine's own package (no simdlen) keeps Inductor's probes: its flags come from them.
        with config.patch({"cpp.simdlen": None}), _probe_only_the_chosen_isa():
            cpu_vec_isa.valid_vec_isa_list()
        assert "avx512 avx512_vnni amx_tile" in probed
    finally:
        # Nothing faked stays in Inductor's cached list for the compiles of later tests.
        cpu_vec_isa.valid_vec_isa_list.cache_clear()


class _FakeBuild:
    """A compile of one AOTInductor object: records when it ran; fails if told to."""

    def __init__(self, target: str, seconds: float, fails: bool = False) -> None:
        self.target, self.seconds, self.fails = target, seconds, fails
        self.span: tuple[float, float] = (0.0, 0.0)

    def get_target_file_path(self) -> str:
        return self.target


def _fake_compile(self: _FakeBuild) -> None:
    started = time.monotonic()
    time.sleep(self.seconds)
    self.span = (started, time.monotonic())
    if self.fails:
        raise RuntimeError(f"{self.target}: error")


def test_the_wrapper_compiles_beside_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """AOTInductor compiles the wrapper, then the kernels; the builder runs the two at once, and the
    kernels' compile returns only when the wrapper's is done (the link needs both)."""
    from torch._inductor import cpp_builder

    monkeypatch.setattr(cpp_builder.CppBuilder, "build", _fake_compile)
    wrapper, kernels = _FakeBuild("/c/x.wrapper.o", 0.5), _FakeBuild("/c/x.kernel.o", 0.5)
    with _wrapper_beside_the_kernels():
        cpp_builder.CppBuilder.build(wrapper)  # type: ignore[arg-type]
        cpp_builder.CppBuilder.build(kernels)  # type: ignore[arg-type]
        assert wrapper.span[1] > 0, "the kernels' compile returned before the wrapper's was done"
    assert kernels.span[0] < wrapper.span[1], "the two compiles ran one after the other"
    assert cpp_builder.CppBuilder.build is _fake_compile

    # A compile in another thread meanwhile neither waits for the wrapper nor takes it over.
    wrapper, kernels, other = (_FakeBuild(f"/c/z.{name}.o", seconds) for name, seconds in
                               (("wrapper", 0.5), ("kernel", 0.0), ("elsewhere", 0.0)))  # fmt: skip
    with _wrapper_beside_the_kernels():
        cpp_builder.CppBuilder.build(wrapper)  # type: ignore[arg-type]
        beside = threading.Thread(target=cpp_builder.CppBuilder.build, args=(other,))
        beside.start()
        beside.join()
        assert wrapper.span == (0.0, 0.0), "another thread's compile waited for this thread's wrapper"
        cpp_builder.CppBuilder.build(kernels)  # type: ignore[arg-type]
        assert wrapper.span[1] > 0

    # The wrapper's failure is raised where AOTInductor waits for the next compile, or at the end.
    failing = _FakeBuild("/c/y.wrapper.o", 0.1, fails=True)
    with _wrapper_beside_the_kernels():
        cpp_builder.CppBuilder.build(failing)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match=r"y\.wrapper\.o: error"):
            cpp_builder.CppBuilder.build(_FakeBuild("/c/y.kernel.o", 0.0))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"y\.wrapper\.o: error"), _wrapper_beside_the_kernels():
        cpp_builder.CppBuilder.build(failing)  # type: ignore[arg-type]


def test_a_package_runs_on_its_capability_and_later_ones_only() -> None:
    assert capability_rank("AVX2", "AVX512") is not None
    assert capability_rank("AVX512", "AVX512") > capability_rank("AVX2", "AVX512")  # type: ignore[operator]
    assert capability_rank("AVX512", "AVX2") is None
    assert capability_rank("DEFAULT", "AVX2") is not None
    assert capability_rank("AVX2", "SVE256") is None and capability_rank("SVE256", "SVE256") is not None
    step = CompiledStep(
        kind="decode",
        programs=[LayerProgram(package="p.pt2", constants="c.safetensors", layers=1)],
        order=[0],
        buckets=[1],
        max_seq_len=64,
        block_size=16,
        torch_version=torch.__version__.split("+")[0],
        cpu_capability="AVX512",
    )
    expected = None if HOST == "AVX512" else f"it was compiled for a AVX512 CPU, this one is {HOST}; rebuild it here"
    assert incompatibility(step, 16) == expected


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setattr(compile_cache, "cache_dir", lambda: root)
    return root


def test_an_entry_is_read_back_only_while_its_files_match(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    compile_cache.store("k", {"steps": [1]}, {"a.pt2": b"code", "a.constants": b"consts"})
    assert oct((cache / "k").stat().st_mode & 0o777) == "0o700"
    assert compile_cache.load("k") == ({"steps": [1]}, {"a.pt2": b"code", "a.constants": b"consts"})
    assert compile_cache.load("other") is None
    (cache / "k" / "a.pt2").write_bytes(b"evil")
    with caplog.at_level(logging.WARNING):
        assert compile_cache.load("k") is None  # a changed file: compiled afresh, never used
    [record] = [r for r in caplog.records if r.getMessage() == "compile_cache.unusable"]
    assert "does not match its sha256" in record.fields["reason"]  # type: ignore[attr-defined]
    compile_cache.store("k", {"steps": [1]}, {"a.pt2": b"code"})
    (cache / "k").chmod(0o777)
    assert compile_cache.load("k") is None  # a folder others may write to is not trusted
    (cache / "k").chmod(0o700)
    index = json.loads((cache / "k" / "index.json").read_text())
    index["files"] = {"../../x": index["files"]["a.pt2"]}
    (cache / "k" / "index.json").write_text(json.dumps(index))
    assert compile_cache.load("k") is None  # an index naming a file outside its entry


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, list[str]]]:
    """Two random checkpoints of one architecture built with --cpu-isa all into an empty compile
    cache: the first compiles, the second takes the first's packages from the cache."""
    root = tmp_path_factory.mktemp("compile-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compile_cache, "cache_dir", lambda: root / "cache")
        first = build_compiled(
            make_tiny_llama(root / "src-a", seed=1), root / "a", "tiny", CompileOptions(buckets=BUCKETS), cpu_isa="all"
        )
        entries = sorted(p.name for p in (root / "cache").iterdir())
        second = build_compiled(
            make_tiny_llama(root / "src-b", seed=2), root / "b", "tiny", CompileOptions(buckets=BUCKETS), cpu_isa="all"
        )
        assert sorted(p.name for p in (root / "cache").iterdir()) == entries  # nothing new compiled
        assert first.stages is not None and second.stages is not None
    yield root / "a", root / "b", entries


def test_the_second_checkpoint_compiles_nothing_and_gets_the_same_bytes(
    two_checkpoints: tuple[Path, Path, list[str]],
) -> None:
    a, b, entries = two_checkpoints
    assert len(entries) == len(capabilities("all", HOST))  # one entry per capability
    steps = json.loads((b / "manifest.json").read_text())["targets"]["cpu"]["compiled"]
    assert [s["cpu_capability"] for s in steps] == capabilities("all", HOST)
    for step in steps:
        for name in [file for program in step["programs"] for file in (program["package"], program["constants"])]:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()


def test_a_cached_package_computes_with_its_own_checkpoint(two_checkpoints: tuple[Path, Path, list[str]]) -> None:
    _, b, _ = two_checkpoints
    eager = open_engine(b, compiled=False, kv_blocks=64)
    compiled = open_engine(b, kv_blocks=64)
    [step] = compiled.runner.compiled
    assert step.info.cpu_capability == HOST  # the best package this host runs
    assert generate(compiled, PROMPTS, GREEDY) == generate(eager, PROMPTS, GREEDY)
    assert compiled.runner.compiled_steps >= GREEDY.max_tokens - 1


# Run in a child process whose torch believes it is on an AVX2 CPU: it takes the AVX2 package
# and must give what the eager model gives.
_CHILD = """
import json, sys
from pathlib import Path
from llmc.tests.helpers import generate, open_engine
from llmc.runtime.sampling_params import SamplingParams
import torch
art = Path(sys.argv[1])
params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
prompts = json.loads(sys.argv[2])
eager = open_engine(art, compiled=False, kv_blocks=64)
compiled = open_engine(art, kv_blocks=64)
print(json.dumps({
    "host": torch.backends.cpu.get_cpu_capability(),
    "chosen": [s.info.cpu_capability for s in compiled.runner.compiled],
    "same": generate(compiled, prompts, params) == generate(eager, prompts, params),
    "compiled_steps": compiled.runner.compiled_steps,
}))
"""


@pytest.mark.skipif(HOST != "AVX512", reason="needs a host above the AVX2 baseline")
def test_the_baseline_package_runs_where_torch_is_limited_to_avx2(
    two_checkpoints: tuple[Path, Path, list[str]],
) -> None:
    a, _, _ = two_checkpoints
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(a), json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = msgspec.json.decode(child.stdout.strip().splitlines()[-1])
    assert result["host"] == "AVX2" and result["chosen"] == ["AVX2"]
    assert result["same"] and result["compiled_steps"] >= GREEDY.max_tokens - 1


def test_an_artifact_holds_no_path_of_the_machine_that_built_it(tmp_path: Path) -> None:
    """Reproducible builds: the same source built by `llmc build` in another Inductor cache folder
    and another llmc cache (another user, another CI runner) gives the same bytes, and no file of
    the artifact names the folders of the build machine (Inductor's cache, torch's install, llmc's
    sources), which the generated sources' names and the shared objects' `__FILE__` strings used
    to carry (builder/targets/cpu.py `_no_machine_paths`). One build per process, as the CLI runs:
    Inductor's second compile in a process may fuse differently from its first (an in-process
    state of its own), which is no concern of reproducibility across builds."""
    source = make_tiny_llama(tmp_path / "src", seed=3)
    for name in ("a", "b"):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}")}
        env["LLMC_CACHE_DIR"] = str(tmp_path / f"cache-{name}")
        command = [sys.executable, "-P", "-m", "llmc", "build", "--m", str(source), "--no-cpu-kernels"]
        command += ["--buckets", ",".join(map(str, BUCKETS)), "--no-autotune", "-o", str(tmp_path / name)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        assert done.returncode == 0, done.stderr[-2000:]
    a, b = tmp_path / "a", tmp_path / "b"
    files = json.loads((a / "manifest.json").read_text())["files"]
    assert any(info["path"].endswith(".pt2") for info in files)
    folders = [tmp_path / "inductor-a", Path(torch.__file__).parent]
    for info in files:
        data = (a / info["path"]).read_bytes()
        assert data == (b / info["path"]).read_bytes(), info["path"]
        for folder in folders:
            assert str(folder).encode() not in data, (info["path"], str(folder))


def test_the_kernel_library_holds_no_install_path(cpu_kernels_loaded: None) -> None:
    """llmc's kernel libraries ship in artifacts: the llmc and torch install paths their checks'
    messages carried (`__FILE__`) are mapped to fixed names (kernels/cpu/cpu_kernels.py)."""
    from llmc.kernels.cpu import cpu_kernels

    isa = cpu_kernels.loaded_isa()
    assert isa is not None
    data = cpu_kernels.cached_library(isa)
    assert b"llmc/kernels/cpu/" in data  # the sources' names are there, under the fixed name
    for folder in (Path(torch.__file__).parent, Path(cpu_kernels.__file__).parent):
        assert str(folder).encode() not in data, str(folder)
