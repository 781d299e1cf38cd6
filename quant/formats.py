"""The GGML block formats: one registry of layouts, byte-identical to GGML's.

A quantized weight of logical shape [rows, cols] is stored as uint8 [rows, cols // block_size *
type_size]: each row is its own run of blocks, exactly as in a GGUF file, so a GGUF tensor is
carried over without requantizing and our blocks are written back to GGUF unchanged. Rows are
independent, so permuting or slicing rows of the uint8 matrix permutes or slices the weight.

The codecs live one module per format family beside this one (`legacy`: q4_0 q4_1 q5_0 q5_1 q8_0;
`kquants`: q2k q3k q4k q5k q6k); each exposes `quantize_<name>(w) -> blocks` and
`dequantize_<name>(blocks) -> w` on 2-D tensors. The dequantizers are the plain-torch reference
that every fast path is tested against.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmc.errors import BadArtifactError, BadInputError

if TYPE_CHECKING:  # torch is imported by the codecs; `llmc inspect` reads this table without it
    import torch


@dataclass(frozen=True)
class BlockFormat:
    name: str  # llmc's name, as on the command line
    ggml_type: int  # GGMLQuantizationType value (GGUF's tensor type id)
    block_size: int  # weights per block
    type_size: int  # bytes per block
    module: str  # the codec module under llmc.quant

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.type_size

    def fits(self, cols: int) -> bool:
        """Whether a row of `cols` weights is a whole number of blocks."""
        return cols % self.block_size == 0

    def cols(self, row_bytes: int) -> int:
        """Weights in a row stored in `row_bytes` bytes."""
        return row_bytes // self.type_size * self.block_size

    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """float [rows, cols] → uint8 [rows, row_bytes(cols)]."""
        assert weight.dim() == 2 and self.fits(weight.shape[1]), (self.name, tuple(weight.shape))
        fn = getattr(importlib.import_module(f"llmc.quant.{self.module}"), f"quantize_{self.name}")
        return fn(weight.float())

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        """uint8 [rows, n_blocks * type_size] → float32 [rows, n_blocks * block_size]."""
        assert blocks.element_size() == 1 and blocks.shape[-1] % self.type_size == 0, (self.name, blocks.shape)
        fn = getattr(importlib.import_module(f"llmc.quant.{self.module}"), f"dequantize_{self.name}")
        return fn(blocks)


_LEGACY = "legacy"
_KQUANTS = "kquants"
QK_K = 256  # weights per K-quant super-block
FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("q4_0", 2, 32, 18, _LEGACY),
        BlockFormat("q4_1", 3, 32, 20, _LEGACY),
        BlockFormat("q5_0", 6, 32, 22, _LEGACY),
        BlockFormat("q5_1", 7, 32, 24, _LEGACY),
        BlockFormat("q8_0", 8, 32, 34, _LEGACY),
        BlockFormat("q2k", 10, QK_K, 84, _KQUANTS),
        BlockFormat("q3k", 11, QK_K, 110, _KQUANTS),
        BlockFormat("q4k", 12, QK_K, 144, _KQUANTS),
        BlockFormat("q5k", 13, QK_K, 176, _KQUANTS),
        BlockFormat("q6k", 14, QK_K, 210, _KQUANTS),
    )
}
BY_GGML_TYPE: dict[int, BlockFormat] = {f.ggml_type: f for f in FORMATS.values()}


def reference_qmatmul(x: torch.Tensor, blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    """x [..., K] @ dequantize(blocks).T in float32 on the CPU: what every fast path must match."""
    return x.detach().cpu().float() @ FORMATS[fmt].dequantize(blocks.cpu()).T


def block_format(name: str) -> BlockFormat:
    """The format called `name` on the command line; a BadInputError listing the choices otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise BadInputError(f"unknown quantization {name!r}; choose one of {', '.join(FORMATS)}") from None


def stored_format(name: str) -> BlockFormat:
    """The format an artifact's manifest names; a BadArtifactError if this llmc does not know it."""
    try:
        return FORMATS[name]
    except KeyError:
        raise BadArtifactError(
            f"the artifact stores tensors as {name!r}, which this llmc cannot read; rebuild it or upgrade llmc"
        ) from None
