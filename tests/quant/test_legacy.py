"""The legacy GGML codecs against gguf-py's numpy ones (which mirror llama.cpp's reference C code).

Quantizing must give the very bytes llama.cpp writes and dequantizing the very float32 bits it reads,
including at rounding ties, on degenerate blocks, and on arbitrary bytes we did not produce.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llmc.quant import legacy
from llmc.quant.formats import FORMATS

NAMES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
QK = 32
# Byte offsets of each format's f16 fields (d, and m for the affine formats).
F16_OFFSETS = {"q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,)}


def _codec(name: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    return getattr(legacy, f"quantize_{name}"), getattr(legacy, f"dequantize_{name}")


def _qtype(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType(FORMATS[name].ggml_type)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def _check_round_trip(name: str, w: torch.Tensor) -> None:
    """Our bytes == gguf's bytes, and gguf's dequantization of them == ours, bit for bit."""
    quantize, dequantize = _codec(name)
    fmt = FORMATS[name]
    ours = quantize(w)
    assert ours.dtype == torch.uint8
    assert ours.shape == (w.shape[0], fmt.row_bytes(w.shape[1]))
    with np.errstate(over="ignore", invalid="ignore"):  # scales past f16's range become inf, as in GGML
        ref = gguf_quantize(w.float().numpy(), _qtype(name))
        ref_values = gguf_dequantize(ref, _qtype(name))
    mismatched = np.argwhere(ours.numpy() != ref)
    assert mismatched.size == 0, f"{name}: {len(mismatched)} bytes differ, first at {mismatched[:4].tolist()}"
    values = dequantize(ours)
    assert values.dtype == torch.float32
    assert values.shape == w.shape
    assert np.array_equal(_bits(values.numpy()), _bits(ref_values))


def _random(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Row scales over several decades, so the f16 scales span normal and subnormal values.
    scale = 10.0 ** torch.empty(rows, 1).uniform_(-6, 2, generator=gen)
    return torch.randn(rows, cols, generator=gen) * scale


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("rows", "cols"), [(8, 64), (33, 256), (1, 32), (3, 4096)])
def test_random_matches_gguf(name: str, rows: int, cols: int) -> None:
    _check_round_trip(name, _random(rows, cols, seed=rows * cols))


def _special_blocks() -> torch.Tensor:
    """One row of hand-made blocks that stress the scale choice and the rounding."""
    gen = torch.Generator().manual_seed(7)
    k = torch.arange(QK, dtype=torch.float32)
    s = 2.0**-4  # a power of two: the scales and inverse scales below are exact, so ties stay ties
    blocks = [
        torch.zeros(QK),  # d = 0: the inverse scale must be 0, not inf
        torch.full((QK,), 0.75),  # constant: max == min for the affine formats
        -torch.rand(QK, generator=gen) - 0.1,  # negative only
        torch.rand(QK, generator=gen) + 0.1,  # positive only
        torch.randn(QK, generator=gen).index_fill(0, torch.tensor([5]), 1e4),  # an outlier
        torch.randn(QK, generator=gen).index_fill(0, torch.tensor([9]), -1e6),  # one whose scale overflows f16
        torch.randn(QK, generator=gen) * 1e-7,  # scales in f16's subnormal range
        torch.tensor([3.0, -3.0] * (QK // 2)),  # equal magnitudes: the first one sets the sign of d
        torch.tensor([-3.0, 3.0] * (QK // 2)),
        (k - QK / 2 + 0.5) * s,  # half-integer multiples of s: ties for the round-to-nearest formats
        (k - QK / 2) * s,  # integer multiples: ties for the symmetric formats' + 0.5 truncation
        torch.cat((torch.tensor([127 * s]), ((k[1:] % 25) - 12 + 0.5) * s)),  # q8_0's scale exactly s, ties
        torch.cat((torch.tensor([-8 * s]), ((k[1:] % 16) - 8 + 0.5) * s)),  # q4_0's scale exactly s
        torch.cat((torch.tensor([-16 * s]), ((k[1:] % 32) - 16 + 0.5) * s)),  # q5_0's scale exactly s
        # q8_0 with d = 1: just below 0.5, where floor(|y| + 0.5) would round up, then exact halves.
        torch.tensor([127.0, 0.5 - 2**-25, -(0.5 - 2**-25), 0.5, -0.5, 1.5, -1.5, 2.5, -2.5] + [126.5] * 23),
        torch.cat((torch.tensor([0.0, 15 * s]), ((k[2:] % 15) + 0.5) * s)),  # q4_1: min 0, d exactly s
        torch.cat((torch.tensor([0.0, 31 * s]), ((k[2:] % 31) + 0.5) * s)),  # q5_1: min 0, d exactly s
    ]
    return torch.cat(blocks).unsqueeze(0)


@pytest.mark.parametrize("name", NAMES)
def test_special_blocks_match_gguf(name: str) -> None:
    row = _special_blocks()
    _check_round_trip(name, row)
    _check_round_trip(name, row.view(-1, QK))  # one block per row: the same bytes, rows independent


@pytest.mark.parametrize("name", NAMES)
def test_near_ties_match_gguf(name: str) -> None:
    """Values one float32 step either side of the tie points, where any extra rounding would show."""
    gen = torch.Generator().manual_seed(3)
    s = 2.0**-5
    ties = ((torch.randint(-8, 8, (64, QK), generator=gen)).float() + 0.5) * s
    nudged = torch.cat((ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)))
    nudged[:, 0] = 8 * s  # the largest magnitude: q4_0's scale is exactly s, so its ties land on the grid
    _check_round_trip(name, nudged)


def _product_rounding_traps(levels: int, symmetric: bool, scale: float) -> tuple[np.ndarray, int]:
    """A block of weights whose float32 product `x * inv` lands exactly on a tie of the following `+ offset`.

    GGML rounds the product before adding the offset; a fused multiply-add would truncate these weights to
    the level below. Found by scanning float32 neighbours of each tie, keeping those where the two differ.
    """
    half = levels // 2
    top = np.float32(-half * scale if symmetric else (levels - 1) * scale)  # the block's extreme: sets d
    d = top / np.float32(-half if symmetric else levels - 1)
    inv, offset = np.float32(1) / d, np.float32(half + 0.5 if symmetric else 0.5)
    found = []
    for n in range(1, levels):
        tie = (n + float(np.nextafter(np.float32(n), np.float32(0)))) / 2
        near = np.float32((tie - float(offset)) / float(inv)).reshape(1).view(np.int32)
        xs = (near + np.arange(-64, 65, dtype=np.int32)).view(np.float32)
        unfused = np.trunc(xs * inv + offset)
        fused = np.trunc((xs.astype(np.float64) * float(inv) + float(offset)).astype(np.float32))
        found.extend(xs[unfused != fused][:1])
    head = [top] if symmetric else [np.float32(0), top]  # the affine block's min is 0
    block = np.zeros(QK, dtype=np.float32)
    block[: len(head) + len(found)] = head + found
    return block, len(found)


@pytest.mark.parametrize(
    ("name", "levels", "symmetric"), [("q4_0", 16, True), ("q5_0", 32, True), ("q4_1", 16, False), ("q5_1", 32, False)]
)
def test_product_rounded_before_offset(name: str, levels: int, symmetric: bool) -> None:
    traps = [_product_rounding_traps(levels, symmetric, 0.1 + 0.037 * i) for i in range(32)]
    assert sum(n for _, n in traps) >= 4, "the scan should find ties to test"
    _check_round_trip(name, torch.from_numpy(np.stack([block for block, _ in traps])))


@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_whole(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunking over blocks (across row boundaries) changes nothing; non-contiguous input is fine."""
    quantize, dequantize = _codec(name)
    w = _random(12, 96, seed=11)
    whole = quantize(w)
    values = dequantize(whole)
    monkeypatch.setattr(legacy, "_CHUNK_BLOCKS", 5)
    assert torch.equal(quantize(w), whole)
    assert torch.equal(dequantize(whole), values)
    assert torch.equal(dequantize(torch.cat((whole, whole), dim=1)[:, whole.shape[1] :]), values)
    assert torch.equal(quantize(w.t().contiguous().t()), whole)
    assert torch.equal(quantize(w.double()), whole)
    _check_round_trip(name, w)


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_arbitrary_bytes(name: str) -> None:
    """Any valid bytes (finite f16 fields, every bit pattern elsewhere) decode exactly as gguf's."""
    _, dequantize = _codec(name)
    fmt = FORMATS[name]
    gen = torch.Generator().manual_seed(5)
    rows, n_blocks = 17, 9
    raw = torch.randint(0, 256, (rows, n_blocks, fmt.type_size), dtype=torch.uint8, generator=gen)
    for offset in F16_OFFSETS[name]:
        # Finite f16 values of every magnitude, subnormals and signed zeros included.
        exponent = torch.randint(-24, 16, (rows, n_blocks, 1), generator=gen).float()
        f16 = (torch.randn(rows, n_blocks, 1, generator=gen) * 2.0**exponent).clamp(-65504, 65504)
        f16[0, :2] = torch.tensor([0.0, -0.0]).view(2, 1)
        raw[..., offset : offset + 2] = f16.half().view(torch.uint8)
    blocks = raw.view(rows, -1)
    ours = dequantize(blocks)
    assert ours.dtype == torch.float32 and ours.shape == (rows, n_blocks * QK)
    ref = gguf_dequantize(blocks.numpy(), _qtype(name))
    assert np.array_equal(_bits(ours.numpy()), _bits(ref))


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_errors(name: str) -> None:
    quantize, dequantize = _codec(name)
    fmt = FORMATS[name]
    assert quantize(torch.zeros(0, 64)).shape == (0, fmt.row_bytes(64))
    assert dequantize(torch.zeros(0, 2 * fmt.type_size, dtype=torch.uint8)).shape == (0, 64)
    assert fmt.dequantize(fmt.quantize(torch.ones(2, 32))).shape == (2, 32)  # through the registry
    with pytest.raises(ValueError):
        quantize(torch.zeros(4, 48))
    with pytest.raises(ValueError):
        quantize(torch.zeros(64))
    with pytest.raises(ValueError):
        dequantize(torch.zeros(2, fmt.type_size + 1, dtype=torch.uint8))
    with pytest.raises(ValueError):
        dequantize(torch.zeros(2, fmt.type_size, dtype=torch.int8))
