"""The build report of a quantized artifact: per tensor its format, bytes before and after, and
relative RMSE (||w - dequantize(quantize(w))|| / ||w||), so a user sees what the quantization cost
(measured on evenly spread rows of the tensors above RMSE_SAMPLE_WEIGHTS weights)."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import torch

from llmc.builder.quant_plan import QuantChoice
from llmc.quant.formats import FORMATS

REPORT_FILE = "build_report.json"
# Significant digits kept for the RMSE: enough to compare quantizers, few enough that the report
# stays byte-identical across rebuilds (float summation order can move the last bits).
_RMSE_DIGITS = 4
_FLOAT_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
# Weights per slice when measuring the error: the float64 copies (weight, dequantized) then take
# 2 x 8 bytes x this (64 MiB) whatever the tensor's size, instead of 4x the tensor in float32
# (an 8 GB peak for Llama-3's 128k x 2k embedding).
_RMSE_SLICE_WEIGHTS = 1 << 22
# Weights the error is measured on per tensor: beyond this, every k-th row (evenly spread, the
# same rows on every build, so the report stays reproducible). Measuring all of a 3B model's
# weights in float64 took twice as long as quantizing them natively (3072x8192 q4k: 1.7 s vs
# 0.8 s on 2 cores); 4M weights estimate a tensor's relative RMSE to about 0.1 % of its value
# (0.07125 vs 0.07131 on that tensor with row scales from 0.1 to 3), plenty to compare formats.
RMSE_SAMPLE_WEIGHTS = 1 << 22


class TensorReport(msgspec.Struct):
    name: str
    format: str
    shape: list[int]
    bytes_before: int  # the tensor in the build's float dtype
    bytes_after: int
    rel_rmse: float | None  # None: blocks carried over from the source, nothing was requantized
    reason: str
    # A pre-quantized source's tensor: its format ("gptq-v1", ...), and rel_rmse / max_abs_err of
    # the repacked blocks against the source's own dequantization (0 up to the f16 rounding of m).
    source_format: str | None = None
    max_abs_err: float | None = None


def _error_norms(fmt: str, weight: torch.Tensor, blocks: torch.Tensor) -> tuple[float, float]:
    """||w - dequantize(blocks)|| and ||w||, in float64, a slice of rows at a time, over every
    k-th row where the tensor has more than RMSE_SAMPLE_WEIGHTS weights."""
    cols = max(1, weight.shape[-1])
    stride = max(1, -(-weight.shape[0] * cols // RMSE_SAMPLE_WEIGHTS))
    if stride > 1:
        weight, blocks = weight[::stride], blocks[::stride]
    rows = max(1, _RMSE_SLICE_WEIGHTS // cols)
    err_sq = norm_sq = 0.0
    for start in range(0, weight.shape[0], rows):
        w = weight[start : start + rows].double()
        diff = w - FORMATS[fmt].dequantize(blocks[start : start + rows].contiguous()).double()
        err_sq += float(diff.square().sum())
        norm_sq += float(w.square().sum())
    return math.sqrt(err_sq), math.sqrt(norm_sq)


class QuantReport:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.tensors: list[TensorReport] = []

    def add(
        self, name: str, choice: QuantChoice, shape: list[int], blocks: torch.Tensor, weight: torch.Tensor | None
    ) -> None:
        assert choice.format is not None
        rmse = None
        if weight is not None:
            err, norm = _error_norms(choice.format, weight, blocks)
            rmse = float(f"{err / norm if norm > 0 else 0.0:.{_RMSE_DIGITS}g}")
        before = shape[0] * shape[1] * _FLOAT_BYTES[self.dtype]
        self.tensors.append(TensorReport(name, choice.format, list(shape), before, blocks.numel(), rmse, choice.reason))

    def add_repacked(self, name: str, source_format: str, rel_rmse: float, max_abs_err: float) -> None:
        """Record a repacked tensor's error against its source's dequantization (after `add`)."""
        entry = self.tensors[-1]
        assert entry.name == name, "add_repacked follows the tensor's add"
        entry.rel_rmse = float(f"{rel_rmse:.{_RMSE_DIGITS}g}")
        entry.max_abs_err = float(f"{max_abs_err:.{_RMSE_DIGITS}g}")
        entry.source_format = source_format

    def summary(self) -> dict[str, Any]:
        by_format: dict[str, int] = {}
        for t in self.tensors:
            by_format[t.format] = by_format.get(t.format, 0) + 1
        return {
            "tensors_quantized": len(self.tensors),
            "formats": dict(sorted(by_format.items())),
            "bytes_before": sum(t.bytes_before for t in self.tensors),
            "bytes_after": sum(t.bytes_after for t in self.tensors),
        }

    def report_body(self) -> dict[str, Any]:
        return {"tensors": sorted(self.tensors, key=lambda t: t.name)}

    def encode(self) -> bytes:
        body = {"summary": self.summary(), **self.report_body()}
        return msgspec.json.format(msgspec.json.encode(body, order="sorted"), indent=2) + b"\n"
