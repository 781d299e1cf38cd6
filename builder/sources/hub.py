"""A Hugging Face hub id, resolved through huggingface_hub's cache (offline when already cached)."""

from __future__ import annotations

from pathlib import Path

from llmc.errors import BadModelError

# What a build needs from a repository; everything else (pytorch_model.bin, onnx, ...) is skipped.
_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def resolve(repo_id: str, filename: str | None = None) -> Path:
    """Return the local snapshot folder (or the one file) for `repo_id`, downloading only if not cached."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [filename] if filename else _PATTERNS
    try:
        try:
            if filename:
                return Path(hf_hub_download(repo_id, filename, local_files_only=True))
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except LocalEntryNotFoundError:
            if filename:
                return Path(hf_hub_download(repo_id, filename))
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise BadModelError(
            f"model {repo_id!r} is not a local path, is not in the Hugging Face cache, and could not be "
            f"downloaded ({type(exc).__name__}); pass a local folder or .gguf file, or download it first "
            "with `huggingface-cli download`"
        ) from exc
