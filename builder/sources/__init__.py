"""Pick the model source from the CLI's --m / --f / --w flags."""

from __future__ import annotations

from pathlib import Path

from llmc.builder.sources.base import ModelSource, TensorMeta, TokenizerBundle
from llmc.errors import BadInputError

__all__ = ["ModelSource", "TensorMeta", "TokenizerBundle", "open_source"]


def open_source(model: str | None, gguf_file: str | None = None, weights: str | None = None) -> ModelSource:
    """--m is an HF id, a local folder or a .gguf path; --f a GGUF file (alone, or inside --m's folder/repo)."""
    # Imported per branch: a safetensors build needs neither gguf nor huggingface_hub.
    from llmc.builder.sources import hub
    from llmc.builder.sources.prequantized import PrequantizedSource, prequantized_config
    from llmc.builder.sources.safetensors_folder import SafetensorsFolderSource

    if not model and not gguf_file:
        raise BadInputError("nothing to build: pass --m MODEL (HF id, folder or .gguf) or --f FILE.gguf")
    if gguf_file:
        from llmc.builder.sources.gguf_file import GgufSource

        path = Path(gguf_file)
        if not path.is_file() and model and Path(model).is_dir():
            path = Path(model) / gguf_file
        if not path.is_file() and model and not Path(model).exists():
            path = hub.resolve(model, gguf_file)
        if not path.is_file():
            raise BadInputError(f"GGUF file {gguf_file} not found (looked beside --m too)")
        return GgufSource(path, name=model or path.name)
    assert model is not None
    path = Path(model)
    if path.is_file():
        if path.suffix != ".gguf":
            raise BadInputError(f"{model} is a file but not a .gguf; pass a model folder, a .gguf file or an HF id")
        from llmc.builder.sources.gguf_file import GgufSource

        return GgufSource(path, name=model)
    if not path.is_dir():
        if model.count("/") != 1 or model.startswith((".", "/")):
            raise BadInputError(f"{model} is neither an existing path nor a Hugging Face id of the form owner/name")
        path = hub.resolve(model)
    weights_folder = Path(weights) if weights else None
    if prequantized_config(path) is not None:  # GPTQ / AWQ / compressed-tensors: repacked at build
        return PrequantizedSource(path, name=model, weights_folder=weights_folder)
    return SafetensorsFolderSource(path, name=model, weights_folder=weights_folder)
