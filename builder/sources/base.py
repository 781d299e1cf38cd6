"""What every model source gives the builder: an HF-style config, a tokenizer, and lazy tensors."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class TokenizerBundle:
    tokenizer_json: bytes
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: list[int]
    add_bos_token: bool


@dataclass(frozen=True)
class TensorMeta:
    shape: list[int]
    dtype: torch.dtype  # the dtype `load` returns, before the build's dtype conversion


@dataclass
class ModelSource(abc.ABC):
    kind: str
    name: str
    config: dict[str, Any]
    tokenizer: TokenizerBundle
    generation_config: dict[str, Any]
    input_files: list[Path] = field(default_factory=list)

    @abc.abstractmethod
    def tensors(self) -> dict[str, TensorMeta]:
        """Canonical (HF Llama-layout) tensor names and what `load` returns for each."""

    @abc.abstractmethod
    def load(self, name: str) -> torch.Tensor:
        """One tensor in canonical layout; sources read lazily so only one shard is ever resident."""

    def block_format(self, name: str) -> str | None:
        """The GGML block format (llmc's name) the source stores `name` in, if llmc knows it, so the
        build can carry the blocks over instead of requantizing; else None. Metadata only."""
        return None

    def blocks(self, name: str) -> torch.Tensor:
        """`name`'s blocks as stored, uint8 [rows, row_bytes]; only for names with a block_format."""
        raise NotImplementedError(f"{self.kind} sources store no GGML blocks")

    @property
    def quantization(self) -> dict[str, Any] | None:
        """A pre-quantized source's scheme (source_format, bits, group_size, act_order), else None."""
        return None

    def input_permutation(self, name: str) -> torch.Tensor | None:
        """The order (int32) of the input columns in `blocks(name)`, when it is not the identity
        (act-order checkpoints store groups contiguous); the layer gathers its input in that order."""
        return None

    def repack_error(self, name: str) -> tuple[float, float] | None:
        """After `blocks(name)` of a repacked source: (relative RMSE, max abs error) of the blocks
        against the source's reference dequantization; None where the blocks are the source's own."""
        return None
