"""The native quantizers (quant/native_quant.cpp) against the torch codecs and llama.cpp: the same bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llmc.quant import native
from llmc.quant.formats import FORMATS
from tests.quant.test_kquants import _ggml_quantize, _on_q4_1_grid

NAMES = list(FORMATS)
COLS = 512  # two super-blocks, sixteen legacy blocks per row


@pytest.fixture(scope="module", autouse=True)
def _library() -> None:
    if native.library() is None:
        pytest.skip("no C++ compiler here: the native quantizer falls back to the torch codecs")


def _cases() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    normal = torch.randn(7, COLS, generator=gen)
    heavy = torch.from_numpy(np.random.default_rng(12).standard_t(2, size=(5, COLS)).astype(np.float32))
    s = 2.0**-5
    ties = (torch.randint(-16, 16, (3, COLS), generator=gen).float() + 0.5) * s  # exact rounding ties
    special = torch.randn(5, COLS, generator=gen) * 0.02
    special[0] = 0.0  # all-zero rows
    special[1, :256] = -0.5  # constant blocks: the affine formats' flat case
    special[2, 7] = 1e4  # an outlier
    special[3, 256:272] = 0.0  # one zero sub-block beside live ones
    special[4, ::2] = 3.0  # equal magnitudes: the first sets the sign
    special[4, 1::2] = -3.0
    return {
        "normal": normal,
        "heavy_tailed": heavy,
        "near_grid": _on_q4_1_grid(5, COLS, seed=13),
        "dequantized_q4k": FORMATS["q4k"].dequantize(FORMATS["q4k"].quantize(normal[:3])),
        "ties": ties,
        "special": special,
        "tiny": torch.randn(3, COLS, generator=gen) * 1e-6,
        "huge": torch.randn(3, COLS, generator=gen) * 1e3,
    }


CASES = _cases()


def _differing(name: str, ours: torch.Tensor, ref: torch.Tensor) -> list[int]:
    size = FORMATS[name].type_size
    return np.nonzero((ours.numpy().reshape(-1, size) != ref.numpy().reshape(-1, size)).any(1))[0][:8].tolist()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", list(CASES))
def test_same_bytes_as_the_torch_codec(name: str, case: str) -> None:
    w = CASES[case]
    ours, ref = native.quantize(name, w), FORMATS[name].quantize(w)
    assert ours.dtype == torch.uint8 and ours.shape == ref.shape
    assert not _differing(name, ours, ref), f"{name} on {case}: blocks {_differing(name, ours, ref)} differ"


@pytest.mark.parametrize("name", NAMES)
def test_threads_and_input_dtypes_change_nothing(name: str) -> None:
    """Odd row counts split unevenly across threads; f16 and bf16 inputs are read exactly."""
    w = CASES["heavy_tailed"]  # 5 rows
    one = native.quantize(name, w, threads=1)
    assert torch.equal(native.quantize(name, w, threads=3), one)
    assert torch.equal(native.quantize(name, w, threads=64), one)  # more threads than blocks
    for dtype in (torch.float16, torch.bfloat16):
        low = w.to(dtype)
        assert torch.equal(native.quantize(name, low, threads=2), FORMATS[name].quantize(low.float()))
    assert native.quantize(name, torch.zeros(0, COLS)).shape == (0, FORMATS[name].row_bytes(COLS))


@pytest.mark.parametrize("name", NAMES)
def test_same_bytes_as_llama_cpp(name: str) -> None:
    ggml_quantize = _ggml_quantize()
    w = torch.cat([CASES["normal"], CASES["heavy_tailed"], CASES["near_grid"], CASES["special"]])
    ours = native.quantize(name, w)
    theirs = torch.from_numpy(ggml_quantize(name, w.numpy()))
    assert not _differing(name, ours, theirs), f"{name}: blocks {_differing(name, ours, theirs)} differ from llama.cpp"


def test_without_a_compiler_the_torch_codecs_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No compiler: one warning, then the torch codecs' very bytes."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "library", native.library.__wrapped__)  # uncached: look again
    assert native.library() is None
    w = CASES["normal"]
    assert torch.equal(native.quantize("q4k", w), FORMATS["q4k"].quantize(w))


def test_cache_is_checked_before_reuse(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A cached library whose bytes no longer match the recorded sha256 is compiled again."""
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path))
    first = native.library_bytes()
    (cached,) = native._cache_dir().glob(f"*/{native.LIBRARY_NAME}")
    assert oct(cached.parent.stat().st_mode & 0o777) == "0o700"
    cached.write_bytes(b"tampered")
    assert native.library_bytes() == first
    assert cached.read_bytes() == first
