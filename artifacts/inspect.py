"""A human- and machine-readable summary of a manifest (`llmc inspect`)."""

from __future__ import annotations

from typing import Any

import msgspec

from llmc.artifacts.manifest import Manifest


def summarize(manifest: Manifest) -> dict[str, Any]:
    params = 0
    for tensor in manifest.tensors:
        count = 1
        for dim in tensor.shape:
            count *= dim
        params += count
    return {
        "model_name": manifest.model_name,
        "format_version": manifest.format_version,
        "target": manifest.target,
        "dtype": manifest.dtype,
        "parameters": params,
        "tensors": len(manifest.tensors),
        "bytes": sum(f.size for f in manifest.files),
        "model": msgspec.to_builtins(manifest.model),
        "tokenizer": msgspec.to_builtins(manifest.tokenizer),
        "generation": msgspec.to_builtins(manifest.generation),
        "build": {
            "llmc_version": manifest.build.llmc_version,
            "torch_version": manifest.build.torch_version,
            "source": manifest.build.source.name,
            "source_kind": manifest.build.source.kind,
            "flags": manifest.build.flags,
        },
        "files": {f.path: f.size for f in manifest.files},
    }
