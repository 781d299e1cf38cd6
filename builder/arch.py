"""Normalise a Hugging Face style config into the artifact's ModelSpec.

Every source (safetensors folder, GGUF, hub) first produces an HF-style config dict, so this is the
one place that knows what each family calls its hyperparameters.
"""

from __future__ import annotations

from typing import Any

from llmc.artifacts.manifest import ModelSpec
from llmc.errors import BadModelError

# HF `architectures` entries → our architecture name. Mistral and SmolLM2 are Llama-shaped.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def spec_from_config(config: dict[str, Any]) -> ModelSpec:
    archs = config.get("architectures") or []
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise BadModelError(
            f"model architecture {archs or config.get('model_type')!r} is not supported; supported: "
            + ", ".join(sorted(ARCHITECTURES))
        )
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        spec = ModelSpec(
            architecture=arch,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_theta(config)),
            rope_scaling=_rope_scaling(config),
            hidden_act=str(config.get("hidden_act", "silu")),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadModelError(f"model config is missing or has a malformed field: {exc}") from exc
    if config.get("sliding_window") and config.get("use_sliding_window", True) and arch == "llama":
        window = int(config["sliding_window"])
        if window < spec.max_position_embeddings:
            raise BadModelError(
                f"this model uses a sliding attention window ({window} tokens), which llmc does not support yet"
            )
    if spec.num_heads % spec.num_kv_heads:
        raise BadModelError(f"num_attention_heads {spec.num_heads} is not a multiple of num_key_value_heads")
    return spec


def _rope_theta(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(config: dict[str, Any]) -> dict[str, Any] | None:
    # transformers >= 5 folds rope_theta and rope_scaling into `rope_parameters`.
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise BadModelError(f"rope scaling {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if kind == "default":
        return None
    return {k: v for k, v in sorted(scaling.items()) if k != "rope_theta"}
