"""The weight-form autotune end to end: a build tunes for its host into the cache the runtime reads,
`--no-autotune` takes the defaults, and the greedy output does not depend on the choice."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch
from click.testing import CliRunner

from llmc.builder.build import BuildOptions, build
from llmc.kernels.cpu import autotune, qmatmul_vnni
from llmc.kernels.cpu.qmatmul_cpu import SMALL_FORMS, CpuQMatmul
from llmc.runtime.sampling_params import SamplingParams
from tests.helpers import generate, open_engine

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The autotune cache in a fresh folder (the CPU kernels' cache stays the user's: no recompile)."""
    folder = tmp_path / "autotune"
    monkeypatch.setattr(autotune, "cache_dir", lambda: folder)
    return folder


@pytest.fixture(scope="module")
def q4_artifact(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("autotune") / "tiny"
    options = BuildOptions(
        model=str(tiny_llama_dir), gguf_file=None, weights=None, output=out, isq="q4_1", autotune=False
    )
    build(options)
    return out


def test_greedy_output_is_the_same_with_autotune_on_off_and_dense_everywhere(
    q4_artifact: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    off = open_engine(q4_artifact, autotune=False)
    assert off.backend.describe()["weight_forms"]["source"] == "defaults"  # type: ignore[attr-defined]
    expected = generate(off, PROMPTS, GREEDY)
    measured = open_engine(q4_artifact)
    assert measured.backend.tuning.source in ("measured", "defaults")  # defaults: a host too busy to measure
    assert generate(measured, PROMPTS, GREEDY) == expected
    assert open_engine(q4_artifact).backend.tuning.source == "cached"
    # Mocked timings where f32 dense copies win from one row: every weight keeps one and uses it
    # (on a host without the kernel's AMX bf16 path, which would take their place).
    faster = {form: {"small": [10.0] * 6, "f32": [1.0] * 6} for form in SMALL_FORMS}
    monkeypatch.setattr(autotune, "measure", lambda *args, **kwargs: faster)
    monkeypatch.setattr(autotune, "native_bf16", lambda flags: False)
    monkeypatch.setattr(qmatmul_vnni, "bf16_path_available", lambda: False)
    for path in cache.iterdir():
        path.unlink()
    dense = open_engine(q4_artifact)
    plan = dense.backend.tuning.plan
    assert (plan.dtype, plan.kernel or plan.int4) == (torch.float32, 1)
    modules = [m for m in dense.runner.model.modules() if isinstance(m, CpuQMatmul)]
    assert modules and all(m.dense is not None and m.dense.dtype == torch.float32 for m in modules if m.form != "dense")
    assert generate(dense, PROMPTS, GREEDY) == expected


def test_where_the_amx_bf16_path_runs_the_kernels_weights_keep_no_copies(
    q4_artifact: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bf16 path takes the many-row matmuls of the kernel's weights without a copy (measured as
    fast as SmolLM2's copies in prefill, with 260 MB less resident: docs/BENCHMARKS.md); asked for,
    the copies are kept. The prompts stay under the path's rows, so no host needs AMX here."""
    faster = {form: {"small": [10.0] * 6, "bf16": [1.0] * 6} for form in SMALL_FORMS}
    monkeypatch.setattr(autotune, "measure", lambda *args, **kwargs: faster)
    monkeypatch.setattr(autotune, "native_bf16", lambda flags: True)
    monkeypatch.setattr(qmatmul_vnni, "bf16_path_available", lambda: True)
    expected = generate(open_engine(q4_artifact, autotune=False, dense_weights=False), PROMPTS, GREEDY)
    engine = open_engine(q4_artifact)
    if not engine.backend.describe()["cpu_kernels"]:  # type: ignore[attr-defined]
        pytest.skip("llmc's CPU kernels do not run here (the bf16 path is one of their paths)")
    assert engine.backend.tuning.plan.kernel is None  # type: ignore[attr-defined]
    kernel = [m for m in engine.runner.model.modules() if isinstance(m, CpuQMatmul) and m.form == "kernel"]
    assert kernel and all(m.dense is None and m.bf16_path for m in kernel)
    assert generate(engine, PROMPTS, GREEDY) == expected
    kept = open_engine(q4_artifact, dense_weights=True).runner.model.modules()
    assert all(m.dense is not None for m in kept if isinstance(m, CpuQMatmul) and m.form == "kernel")


def test_dense_copies_that_never_win_are_not_kept(
    q4_artifact: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slower = {form: {"small": [1.0] * 6, "bf16": [10.0] * 6, "f32": [10.0] * 6} for form in SMALL_FORMS}
    monkeypatch.setattr(autotune, "measure", lambda *args, **kwargs: slower)
    engine = open_engine(q4_artifact)
    assert engine.backend.describe()["dense_weights"] is False
    modules = [m for m in engine.runner.model.modules() if isinstance(m, CpuQMatmul)]
    assert modules and all(m.dense is None for m in modules if m.form != "dense")


def test_a_build_tunes_for_its_host_and_the_runtime_finds_it(tiny_llama_dir: Path, tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "tuned"
    build(BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=out, isq="q4_1"))
    assert len(list(cache.iterdir())) == 1
    assert open_engine(out).backend.tuning.source == "cached"
    untuned = tmp_path / "untuned"
    options = BuildOptions(model=str(tiny_llama_dir), gguf_file=None, weights=None, output=untuned, isq="q8_0")
    build(replace(options, autotune=False))
    assert len(list(cache.iterdir())) == 1


def test_no_autotune_reaches_build_and_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llmc.builder.build
    import llmc.runtime.server
    from llmc import cli

    builds: list[Any] = []
    monkeypatch.setattr(llmc.builder.build, "build", lambda options, on_progress=None: builds.append(options) or 1 / 0)
    runner = CliRunner()
    runner.invoke(cli.main, ["build", "-m", "m", "-o", str(tmp_path / "a")])
    runner.invoke(cli.main, ["build", "-m", "m", "-o", str(tmp_path / "b"), "--no-autotune"])
    assert [b.autotune for b in builds] == [True, False]
    served: list[Any] = []

    def no_exit(code: int) -> NoReturn:
        raise SystemExit(code)

    monkeypatch.setattr(llmc.runtime.server, "serve", served.append)
    monkeypatch.setattr(cli, "_exit_without_finalizing", no_exit)
    assert runner.invoke(cli.main, ["run", str(tmp_path)]).exit_code == 0
    assert runner.invoke(cli.main, ["run", str(tmp_path), "--no-autotune"]).exit_code == 0
    assert [c.autotune for c in served] == [True, False]
