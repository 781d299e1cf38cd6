"""A Hugging Face hub id, resolved through huggingface_hub's cache (offline when already cached)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from llmc.errors import BadModelError

# What a build needs from a repository; everything else (pytorch_model.bin, onnx, ...) is skipped.
_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
# The file a safetensors build cannot do without: the reachability probe asks the hub for it.
_CONFIG_FILE = "config.json"
# One HEAD request, without huggingface_hub's retries, before any download: with no network
# (or a firewall) a build fails in a moment instead of after five retries with backoff (25 s of
# "Retrying in 8s" lines). The hub answers a HEAD well under a second on a working link; 5 s
# leaves room for a slow one and is all a black-holed connection costs.
HUB_PROBE_TIMEOUT_S = 5.0


def resolve(repo_id: str, filename: str | None = None) -> Path:
    """Return the local snapshot folder (or the one file) for `repo_id`, downloading only if not cached."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.utils import disable_progress_bars

    patterns = [filename] if filename else _PATTERNS
    download = f"hf download {repo_id}" + (f" {filename}" if filename else "")
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename, local_files_only=True))
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if constants.HF_HUB_OFFLINE:
        raise BadModelError(
            f"model {repo_id!r} is not a local path and is not in the Hugging Face cache, and HF_HUB_OFFLINE "
            f"is set: download it where there is network with `{download}` (then HF_HUB_OFFLINE=1 builds "
            "use the cache), or pass a local folder or .gguf file"
        )
    _probe(repo_id, filename or _CONFIG_FILE, download)
    if not sys.stderr.isatty():
        disable_progress_bars()  # huggingface_hub's bars are for people, not for logs and pipes
    failures: tuple[type[Exception], ...] = (
        LocalEntryNotFoundError,
        HfHubHTTPError,
        OSError,
        ValueError,
        *_network_errors(),
    )
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename))
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except failures as exc:
        raise BadModelError(
            f"model {repo_id!r} could not be downloaded ({type(exc).__name__}); retry, or download it first "
            f"with `{download}` (HF_HUB_OFFLINE=1 then builds from the cache), or pass a local folder or .gguf file"
        ) from exc


def _probe(repo_id: str, filename: str, download: str) -> None:
    """Ask the hub for one file's metadata, once and briefly; say plainly why a download cannot work."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
    )

    unreachable: tuple[type[Exception], ...] = (HfHubHTTPError, OSError, *_network_errors())
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError as exc:
        raise BadModelError(
            f"model {repo_id!r} is gated: accept its license on the hub, log in with `hf auth login`, then retry"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise BadModelError(
            f"model {repo_id!r} is not a local path and not a repository on the Hugging Face hub (or it is "
            "private: log in with `hf auth login`); check the name"
        ) from exc
    except EntryNotFoundError as exc:
        hint = "pass the .gguf file with -f FILE" if filename == _CONFIG_FILE else "check the file name"
        raise BadModelError(f"model {repo_id!r} has no {filename} on the hub; {hint}") from exc
    except unreachable as exc:
        raise BadModelError(
            f"model {repo_id!r} is not in the Hugging Face cache and the hub ({constants.ENDPOINT}) could not be "
            f"reached ({type(exc).__name__}); on a machine with network run `{download}`, then build with "
            "HF_HUB_OFFLINE=1 from the cache, or pass a local folder or .gguf file"
        ) from exc


def _network_errors() -> tuple[type[Exception], ...]:
    """The transport errors of the HTTP library huggingface_hub uses: httpx (1.x; the `httpx2`
    fork in some releases) or requests (before 1.0). None of them derives from OSError."""
    errors: list[type[Exception]] = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)
