"""manifest.json schema. Changing the meaning of a field bumps FORMAT_VERSION."""

from __future__ import annotations

from typing import Any

import msgspec

# Version of the on-disk layout. Readers refuse any other value: an old runtime cannot guess
# what a newer builder meant, and silently misreading weights is worse than refusing.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ModelSpec(msgspec.Struct, forbid_unknown_fields=True):
    """Architecture hyperparameters, normalised from whatever the source called them."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False


class TensorInfo(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    dtype: str
    shape: list[int]
    file: str


class FileInfo(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    size: int
    sha256: str


class TokenizerInfo(msgspec.Struct, forbid_unknown_fields=True):
    file: str
    chat_template_file: str | None
    bos_token: str | None
    eos_token: str | None
    # Every token id that ends generation (EOS plus e.g. <|eot_id|>), from the source's config.
    eos_token_ids: list[int]
    add_bos_token: bool = False


class GenerationDefaults(msgspec.Struct, forbid_unknown_fields=True):
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


class SourceInfo(msgspec.Struct, forbid_unknown_fields=True):
    kind: str  # "safetensors" | "gguf" | "hub"
    name: str  # what the user passed, as given
    files: list[FileInfo]  # the input files that determined the weights, with their hashes


class BuildInfo(msgspec.Struct, forbid_unknown_fields=True):
    llmc_version: str
    source: SourceInfo
    flags: dict[str, Any]
    torch_version: str


class Manifest(msgspec.Struct, forbid_unknown_fields=True):
    format_version: int
    model_name: str
    target: str
    dtype: str
    model: ModelSpec
    tokenizer: TokenizerInfo
    generation: GenerationDefaults
    tensors: list[TensorInfo]
    files: list[FileInfo]
    build: BuildInfo


def encode(manifest: Manifest) -> bytes:
    """Canonical bytes: sorted keys and a trailing newline, so equal manifests are equal files."""
    raw = msgspec.json.encode(manifest, order="sorted")
    return msgspec.json.format(raw, indent=2) + b"\n"
