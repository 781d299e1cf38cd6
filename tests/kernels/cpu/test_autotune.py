"""Weight forms chosen by measurement (kernels/cpu/autotune.py): mocked timings pick the expected
plan, the cache round-trips and ignores what it did not write, and the CPU backend follows the plan
(tests/runtime/test_autotune_engine.py runs it end to end)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llmc.kernels.cpu import autotune
from llmc.kernels.cpu.qmatmul_cpu import DEFAULT_PLAN, CpuQMatmul, DensePlan
from llmc.quant.formats import FORMATS, reference_qmatmul

BF16_HOST = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512_bf16"})
AVX2_HOST = frozenset({"avx2", "fma", "f16c"})
N = len(autotune.ROWS)


def timings(small: list[float], **dense: list[float]) -> dict[str, dict[str, list[float]]]:
    return {"kernel": {"small": small, **dense}}


FLAT = [10.0] * N
# Dense faster by 2x from the 4th row count (16 rows) on.
FROM_16 = [20.0, 20.0, 20.0, 5.0, 5.0, 5.0]


def test_the_dense_form_wins_from_the_first_row_count_where_it_stays_faster() -> None:
    plan = autotune.decide(timings(FLAT, bf16=FROM_16, f32=[30.0] * N), BF16_HOST)
    assert plan == DensePlan(kernel=16, int4=None, pair=None, dtype=torch.bfloat16)


def test_a_win_that_does_not_hold_for_more_rows_is_not_taken() -> None:
    dense = [20.0, 20.0, 5.0, 20.0, 5.0, 5.0]  # faster at 8 rows, slower at 16, faster from 32
    assert autotune.decide(timings(FLAT, bf16=dense), BF16_HOST).kernel == 32


def test_a_win_within_the_noise_margin_keeps_no_copy() -> None:
    near = [10.0 / autotune.MIN_GAIN * 1.01] * N  # faster, but by less than MIN_GAIN
    plan = autotune.decide(timings(FLAT, bf16=near, f32=near), BF16_HOST)
    assert plan.kernel is None


def test_dense_never_winning_keeps_no_copies() -> None:
    plan = autotune.decide(timings(FLAT, bf16=[40.0] * N, f32=[80.0] * N), BF16_HOST)
    assert (plan.kernel, plan.int4, plan.pair) == (None, None, None)


def test_a_cpu_without_native_bf16_never_gets_bf16_copies_even_when_bf16_timed_fastest() -> None:
    plan = autotune.decide(timings(FLAT, bf16=[1.0] * N, f32=[20.0, 20.0, 20.0, 20.0, 5.0, 5.0]), AVX2_HOST)
    assert plan.dtype == torch.float32
    assert plan.kernel == 32


def test_f32_copies_are_taken_over_bf16_only_when_clearly_faster() -> None:
    assert autotune.decide(timings(FLAT, bf16=FROM_16, f32=FROM_16), BF16_HOST).dtype == torch.bfloat16
    f32 = [20.0, 20.0, 20.0, 2.0, 2.0, 2.0]
    assert autotune.decide(timings(FLAT, bf16=FROM_16, f32=f32), BF16_HOST).dtype == torch.float32


def test_each_form_gets_its_own_threshold() -> None:
    measured = {
        "int4": {"small": FLAT, "bf16": [20.0, 20.0, 20.0, 20.0, 5.0, 5.0]},
        "pair": {"small": FLAT, "bf16": [20.0, 20.0, 5.0, 5.0, 5.0, 5.0]},
    }
    plan = autotune.decide(measured, BF16_HOST)
    assert (plan.kernel, plan.int4, plan.pair) == (None, 32, 8)


def test_the_defaults_never_keep_bf16_copies_without_native_bf16() -> None:
    assert autotune.default_plan(BF16_HOST) == DEFAULT_PLAN
    safe = autotune.default_plan(AVX2_HOST)
    assert (safe.kernel, safe.int4, safe.pair, safe.dtype) == (None, None, None, torch.float32)


def test_fit_drops_copies_the_batches_served_never_use_and_those_memory_does_not_hold() -> None:
    plan = DensePlan(kernel=32, int4=8, pair=None)
    weights = {"kernel": 1000, "int4": 1000}
    assert autotune.fit(plan, weights, max_rows=16, memory=10**9, share=0.25) == DensePlan(None, 8, None)
    assert autotune.fit(plan, weights, max_rows=512, memory=10**9, share=0.25) == plan
    # 2000 weights in bf16 = 4000 bytes: more than a quarter of 8000
    assert autotune.fit(plan, weights, max_rows=512, memory=8000, share=0.25) == DensePlan(None, None, None)
    assert autotune.fit(plan, weights, max_rows=512, memory=None, share=0.25) == DensePlan(None, None, None)


# ---- measuring, with real (small) weights ------------------------------------------------------


def _module(fmt: str = "q4_0", rows: int = 64, cols: int = 256) -> CpuQMatmul:
    return CpuQMatmul(FORMATS[fmt].quantize(torch.randn(rows, cols)), fmt)


def test_measure_times_every_form_at_every_row_count_and_stops_at_its_budget() -> None:
    modules = [_module(), _module()]
    groups: list[tuple[int, Callable[[], list[CpuQMatmul]]]] = [(6, lambda: modules)]
    measured = autotune.measure(groups, [torch.bfloat16, torch.float32], torch.float32, repeats=1)
    assert measured is not None
    assert set(measured) == {"int4"}
    assert set(measured["int4"]) == {"small", "bf16", "f32"}
    assert all(len(times) == N and min(times) > 0 for times in measured["int4"].values())
    ticks = iter(range(100))
    over = autotune.measure(groups, [torch.float32], torch.float32, budget_s=0.5, repeats=1, clock=lambda: next(ticks))
    assert over is None


# The bound twice over: the int4 path rounds its scales to bf16 as well as the activations.
BF16_SLACK = 2.0


def test_the_plan_sets_which_weights_keep_copies_and_their_dtype() -> None:
    blocks = FORMATS["q4_0"].quantize(torch.randn(64, 256))
    x = torch.randn(40, 256)
    none = CpuQMatmul(blocks, "q4_0", dense_copy=True, plan=DensePlan(kernel=None, int4=None, pair=None))
    assert none.form == "int4" and none.dense is None
    f32 = CpuQMatmul(blocks, "q4_0", dense_copy=True, plan=DensePlan(int4=16, dtype=torch.float32))
    assert f32.dense is not None and f32.dense.dtype == torch.float32 and f32.dense_from_rows == 16
    reference = reference_qmatmul(x, blocks, "q4_0")
    torch.testing.assert_close(f32(x), reference, rtol=1e-4, atol=1e-4)  # the f32 copy is exact
    # torch's int4 path rounds the activations to bf16 (8 significant bits): each product is off
    # by at most 2^-8 of itself, so the sum by at most 2^-8 of the sum of their magnitudes (a fixed
    # atol failed a third of the random draws)
    bound = (x.abs() @ FORMATS["q4_0"].dequantize(blocks).abs().T) * 2.0**-8
    assert bool(((none(x) - reference).abs() <= bound * BF16_SLACK + 1e-4).all())


# ---- the cache ---------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "autotune"


def _fake_measure(result: dict[str, dict[str, list[float]]] | None, calls: list[int]) -> Callable[..., object]:
    def measure(*args: object, **kwargs: object) -> dict[str, dict[str, list[float]]] | None:
        calls.append(1)
        return result

    return measure


def test_a_measurement_is_cached_and_reused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(autotune, "measure", _fake_measure(timings(FLAT, bf16=FROM_16), calls))
    first = autotune.tune("k1", [], torch.float32, BF16_HOST)
    assert first.source == "measured" and first.plan.kernel == 16
    (path,) = cache.iterdir()
    assert path.name == "k1.json"
    assert oct(cache.stat().st_mode & 0o777) == "0o700"
    second = autotune.tune("k1", [], torch.float32, BF16_HOST)
    assert second.source == "cached" and second.plan == first.plan
    assert len(calls) == 1


@pytest.mark.parametrize(
    "tamper",
    [
        lambda doc: doc | {"kernel": 7},  # not a measured row count
        lambda doc: doc | {"key": "another"},
        lambda doc: doc | {"extra": 1},
        lambda doc: doc | {"dtype": "f16"},
        lambda doc: doc | {"kernel": "16"},
        lambda doc: doc | {"schema": 99},
        lambda doc: {"padding": "x" * 5000},
    ],
)
def test_a_tampered_or_foreign_cache_file_is_ignored(
    cache: Path, monkeypatch: pytest.MonkeyPatch, tamper: Callable[[dict[str, object]], dict[str, object]]
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(autotune, "measure", _fake_measure(timings(FLAT, bf16=FROM_16), calls))
    autotune.tune("k1", [], torch.float32, BF16_HOST)
    path = cache / "k1.json"
    path.write_text(json.dumps(tamper(json.loads(path.read_text()))))
    assert autotune.load_cached("k1", BF16_HOST) is None
    again = autotune.tune("k1", [], torch.float32, BF16_HOST)
    assert again.source == "measured" and len(calls) == 2


def test_a_cached_bf16_plan_is_refused_on_a_cpu_without_native_bf16(cache: Path) -> None:
    autotune.store("k1", DensePlan(kernel=8))
    assert autotune.load_cached("k1", BF16_HOST) == DensePlan(kernel=8)
    assert autotune.load_cached("k1", AVX2_HOST) is None


def test_a_cache_folder_others_can_write_is_not_trusted(cache: Path) -> None:
    autotune.store("k1", DensePlan(kernel=8))
    os.chmod(cache, 0o777)
    assert autotune.load_cached("k1", BF16_HOST) is None


def test_over_budget_the_defaults_serve_and_are_cached(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(autotune, "measure", _fake_measure(None, calls))
    tuning = autotune.tune("k2", [], torch.float32, AVX2_HOST)
    assert tuning.source == "defaults" and tuning.plan == autotune.default_plan(AVX2_HOST)
    assert autotune.tune("k2", [], torch.float32, AVX2_HOST).source == "cached"
    assert len(calls) == 1


def test_the_key_follows_shapes_threads_kernels_and_activations_not_values() -> None:
    signature = autotune.shape_signature([("q4_0", [64, 144]), ("q4_0", [64, 144]), ("q8_0", [32, 272])])
    assert signature == [("q4_0", 64, 144, 2), ("q8_0", 32, 272, 1)]
    key = autotune.cache_key(signature, 2, "avx2", torch.float32)
    assert key == autotune.cache_key(list(signature), 2, "avx2", torch.float32)
    others = [
        autotune.cache_key(signature[:1], 2, "avx2", torch.float32),
        autotune.cache_key(signature, 4, "avx2", torch.float32),
        autotune.cache_key(signature, 2, None, torch.float32),
        autotune.cache_key(signature, 2, "avx2", torch.bfloat16),
    ]
    assert key not in others and len(set(others)) == len(others)


def test_shape_groups_time_a_few_weights_and_the_first_rows_of_big_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autotune, "STREAM_BYTES", 64 << 10)
    small = FORMATS["q4_0"].quantize(torch.randn(64, 256))  # 32 KB in bf16: two make the 64 KB
    big = FORMATS["q4_0"].quantize(torch.randn(512, 256))  # 256 KB in bf16: its first 128 rows
    blocks = {f"s{i}": small for i in range(5)} | {"big": big}
    tensors = {name: ("q4_0", list(b.shape)) for name, b in blocks.items()}
    groups = autotune.groups_from(tensors, blocks.__getitem__, cpu_kernels_loaded=False)
    made = sorted(((factor, [m.out_features for m in make()]) for factor, make in groups), key=lambda g: len(g[1]))
    assert made == [(4.0, [128]), (5.0, [64, 64])]  # as many weights as the model's, by rows and count
