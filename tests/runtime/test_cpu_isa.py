"""One artifact, one CPU kernel library per ISA: the runtime loads the best one the host runs, or
the one $LLMC_CPU_ISA names, and the model's greedy output does not depend on which."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmc.builder.build import BuildOptions, build
from llmc.kernels.cpu import cpu_kernels

REPO = Path(__file__).parents[2]
# Runs in a child process (a process loads one kernel library): greedy tokens of a few prompts
# on the artifact, eagerly, and the ISA of the library the engine loaded. With the default weight
# forms in both (`--no-autotune`): each ISA has its own measured plan, and a dense copy computes a
# prompt's rows with other roundings than the kernel, which may flip a random model's greedy token.
_CHILD = """
import json, sys
from pathlib import Path
from llmc.kernels.cpu import cpu_kernels
from llmc.runtime.sampling_params import SamplingParams
from llmc.tests.helpers import generate, open_engine

engine = open_engine(Path(sys.argv[1]), compiled=sys.argv[2] == "compiled", kv_blocks=64, autotune=False)
prompts = [[1, 5, 9, 13], [2, 4, 8, 16, 32, 64, 100], [7] * 20]
tokens = generate(engine, prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
print(json.dumps({"isa": cpu_kernels.loaded_isa(), "tokens": tokens, "compiled": engine.runner.compiled_steps}))
"""
# A child imports torch and builds a tiny engine: seconds; this only stops a hung one.
CHILD_TIMEOUT_S = 300


def _python(args: list[str], env: dict[str, str]) -> str:
    """A child Python with `args` and `env` (over this process's environment): its stdout."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _run_child(artifact: Path, compiled: bool = False, **env: str) -> dict[str, object]:
    stdout = _python(["-c", _CHILD, str(artifact), "compiled" if compiled else "eager"], env)
    found: dict[str, object] = json.loads(stdout.strip().splitlines()[-1])
    return found


@pytest.fixture(scope="module")
def q4_artifact(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model in q4_1 (llmc's quantized matmul serves every layer) with the kernels of every ISA."""
    out = tmp_path_factory.mktemp("isa") / "tiny"
    result = build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=out, isq="q4_1"))
    isas = [library.isa for library in result.manifest.kernels_for("cpu")]
    assert isas == cpu_kernels.buildable()
    return out


def test_an_artifact_runs_with_the_avx2_kernels_and_gives_the_same_greedy_output(q4_artifact: Path) -> None:
    if "avx2" not in cpu_kernels.host_isas():
        pytest.skip("this CPU lacks AVX2")
    env = {k: v for k, v in os.environ.items() if k not in (cpu_kernels.ISA_ENV, "ATEN_CPU_CAPABILITY")}
    best = _run_child(q4_artifact, **env)
    forced = _run_child(q4_artifact, **{cpu_kernels.ISA_ENV: "avx2", "ATEN_CPU_CAPABILITY": "avx2"})
    assert best["isa"] == cpu_kernels.host_isas()[0]
    assert forced["isa"] == "avx2"
    assert forced["tokens"] == best["tokens"]


def test_an_artifact_built_on_avx2_runs_on_the_best_isa_with_the_same_greedy_output(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """The other direction: built where only AVX2 is (forced), served where more is. Its compiled
    decode package is AVX2's, which a newer CPU runs; the kernels loaded are the host's best."""
    host = cpu_kernels.host_isas()
    if "avx2" not in host or host[0] == "avx2":
        pytest.skip("needs a CPU with an ISA above AVX2 (to build for AVX2 and serve on more)")
    forced = {cpu_kernels.ISA_ENV: "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = tmp_path / "built-on-avx2"
    build = ["-m", "llmc", "build", "--m", str(tiny_llama_dir), "--isq", "q4_1", "--buckets", "1,4"]
    _python([*build, "--no-autotune", "-o", str(out)], forced)
    packages = json.loads((out / "manifest.json").read_text())["targets"]["cpu"]["compiled"]
    assert {package["cpu_capability"] for package in packages} == {"AVX2"}
    native_env = {k: v for k, v in os.environ.items() if k not in forced}
    native = _run_child(out, compiled=True, **native_env)
    on_avx2 = _run_child(out, compiled=True, **forced)
    assert native["isa"] == host[0] and on_avx2["isa"] == "avx2"
    assert native["compiled"] and on_avx2["compiled"]  # the AVX2 package ran on the newer CPU too
    assert native["tokens"] == on_avx2["tokens"]


AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})


def test_a_forced_isa_the_cpu_lacks_is_refused_before_anything_loads(
    q4_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmc.artifacts.reader import Artifact
    from llmc.errors import BadInputError
    from llmc.runtime.backends.cpu import load_cpu_kernels

    monkeypatch.setattr(cpu_kernels, "host_cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "avx512_vnni")
    with pytest.raises(BadInputError, match="LLMC_CPU_ISA=avx512_vnni needs AVX-512 with VNNI, which this CPU lacks"):
        load_cpu_kernels(Artifact.open(q4_artifact))


def test_a_cpu_without_any_of_the_isas_runs_without_the_kernels(
    q4_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmc.artifacts.reader import Artifact
    from llmc.runtime.backends.cpu import load_cpu_kernels

    monkeypatch.setattr(cpu_kernels, "host_cpu_flags", lambda: frozenset({"sse4_2", "avx"}))
    monkeypatch.delenv(cpu_kernels.ISA_ENV, raising=False)
    assert load_cpu_kernels(Artifact.open(q4_artifact)) is False
