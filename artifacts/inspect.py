"""A human- and machine-readable summary of a manifest (`llmc inspect`)."""

from __future__ import annotations

from typing import Any

import msgspec

from llmc.artifacts.generation import effective
from llmc.artifacts.manifest import Manifest
from llmc.kernels.quant_formats import stored_format


def summarize(manifest: Manifest) -> dict[str, Any]:
    params = 0
    formats: dict[str, int] = {}
    for tensor in manifest.tensors:
        count = 1
        for dim in tensor.shape:
            count *= dim
        if tensor.quant is not None:  # stored as [rows, row_bytes] of GGML blocks
            count = tensor.shape[0] * stored_format(tensor.quant).cols(tensor.shape[1])
            formats[tensor.quant] = formats.get(tensor.quant, 0) + 1
        params += count
    return {
        "model_name": manifest.model_name,
        "format_version": manifest.format_version,
        "target": manifest.target,
        "dtype": manifest.dtype,
        "parameters": params,
        "tensors": len(manifest.tensors),
        "quantized_tensors": dict(sorted(formats.items())),
        "bytes": sum(f.size for f in manifest.files),
        "model": msgspec.to_builtins(manifest.model),
        "tokenizer": msgspec.to_builtins(manifest.tokenizer),
        "generation": msgspec.to_builtins(effective(manifest.generation)),  # what requests that set none get
        "build": {
            "llmc_version": manifest.build.llmc_version,
            "torch_version": manifest.build.torch_version,
            "source": manifest.build.source.name,
            "source_kind": manifest.build.source.kind,
            "flags": manifest.build.flags,
        },
        "files": {f.path: f.size for f in manifest.files},
        "cpu_kernels": msgspec.to_builtins(manifest.cpu_kernels),
    }


def report_table(report: dict[str, Any]) -> list[str]:
    """Human-readable lines of a build report (build_report.json): one per quantized tensor, then totals."""
    lines = [f"{'tensor':<44} {'format':<6} {'bytes before':>13} {'after':>12} {'rel RMSE':>9}"]
    for t in report["tensors"]:
        rmse = "carried" if t["rel_rmse"] is None else f"{t['rel_rmse']:.4f}"
        lines.append(f"{t['name']:<44} {t['format']:<6} {t['bytes_before']:>13,} {t['bytes_after']:>12,} {rmse:>9}")
    total = report["summary"]
    lines.append(
        f"{total['tensors_quantized']} tensors quantized {total['formats']}: "
        f"{total['bytes_before']:,} → {total['bytes_after']:,} bytes"
    )
    return lines
