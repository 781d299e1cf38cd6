"""Normalise a Hugging Face style config into the artifact's ModelSpec, and map the source's
tensor names (fused or renamed per family) onto the generic decoder's names.

Every source (safetensors folder, GGUF, hub) first produces an HF-style config dict, so this is the
one place that knows what each family calls its hyperparameters and tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llmc.artifacts.manifest import ModelSpec
from llmc.errors import BadModelError

# HF `architectures` entries → our family name.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "StableLmForCausalLM": "stablelm",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Glm4ForCausalLM": "glm4",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")


def family_of(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if family is None:
        raise BadModelError(
            f"model architecture {archs or config.get('model_type')!r} is not supported; supported: "
            + ", ".join(sorted(ARCHITECTURES))
        )
    return family


def spec_from_config(config: dict[str, Any]) -> ModelSpec:
    family = family_of(config)
    try:
        return _spec(family, config)
    except (KeyError, TypeError, ValueError) as exc:
        raise BadModelError(f"model config is missing or has a malformed field: {exc!r}") from exc


def _rope_params(config: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """transformers >= 5 keeps rope settings in `rope_parameters` (per layer type for Gemma-3);
    older configs use top-level rope_theta / rope_scaling / partial_rotary_factor."""
    params = config.get("rope_parameters") or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    elif isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    merged = dict(config.get("rope_scaling") or {})
    merged.update(params)
    return merged


def _rope_scaling(config: dict[str, Any], params: dict[str, Any]) -> dict[str, Any] | None:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise BadModelError(f"rope scaling {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if kind == "default":
        return None
    scaling = {k: v for k, v in sorted(params.items()) if k not in ("rope_theta", "partial_rotary_factor", "type")}
    scaling["rope_type"] = kind
    if kind == "longrope":
        scaling.setdefault("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        scaling.setdefault("max_position_embeddings", config.get("max_position_embeddings"))
    return scaling


def _spec(family: str, c: dict[str, Any]) -> ModelSpec:
    hidden = int(c["hidden_size"])
    heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or hidden // heads)
    rope = _rope_params(c)
    partial = float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)))
    common: dict[str, Any] = dict(
        architecture=family,
        vocab_size=int(c["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(c.get("rms_norm_eps", c.get("layer_norm_eps", 1e-6))),
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        rope_scaling=_rope_scaling(c, rope),
        hidden_act=str(c.get("hidden_act") or c.get("hidden_activation") or "silu"),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        partial_rotary_factor=partial,
    )
    bias = bool(c.get("attention_bias", False))
    common.update(qkv_bias=bias, o_bias=bias, mlp_bias=bool(c.get("mlp_bias", False)))
    if family in ("qwen2", "qwen2_moe"):
        common.update(qkv_bias=bool(c.get("qkv_bias", True)), o_bias=False)
    elif family in ("qwen3", "qwen3_moe"):
        common.update(qk_norm=True)
    if family in ("qwen2_moe", "qwen3_moe"):
        _moe(c, common)
    if family.startswith("deepseek"):
        _deepseek(family, c, common)
    elif family == "glm4":
        common.update(o_bias=False, sandwich_norm=True, rope_interleaved=True)
    elif family == "stablelm":
        if c.get("qk_layernorm") or c.get("use_parallel_residual"):
            raise BadModelError("StableLM with qk_layernorm or a parallel residual is not supported yet")
        common.update(norm="layer", qkv_bias=bool(c.get("use_qkv_bias", False)), o_bias=False)
    elif family in ("gemma2", "gemma3"):
        common.update(
            norm_weight_offset=1.0,
            sandwich_norm=True,
            embed_scale=math.sqrt(hidden),
            attn_scale=float(c.get("query_pre_attn_scalar") or head_dim) ** -0.5,
            attn_softcap=c.get("attn_logit_softcapping"),
            final_softcap=c.get("final_logit_softcapping"),
            qk_norm=family == "gemma3",
        )
        if family == "gemma3":
            local = _rope_params(c, "sliding_attention")
            common["rope_local_theta"] = float(local.get("rope_theta", c.get("rope_local_base_freq", 10000.0)))
    _sliding(family, c, common)
    spec = ModelSpec(**common)
    if spec.num_heads % spec.num_kv_heads:
        raise BadModelError(f"num_attention_heads {spec.num_heads} is not a multiple of num_key_value_heads")
    return spec


def _moe(c: dict[str, Any], common: dict[str, Any]) -> None:
    experts = int(c.get("num_experts") or c.get("num_local_experts") or 0)
    if experts == 0:
        return
    step = int(c.get("decoder_sparse_step", 1) or 1)
    dense = set(c.get("mlp_only_layers") or [])
    common.update(
        num_experts=experts,
        num_experts_per_tok=int(c["num_experts_per_tok"]),
        moe_intermediate_size=int(c["moe_intermediate_size"]),
        norm_topk_prob=bool(c.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(c.get("shared_expert_intermediate_size") or 0),
        moe_layers=[i for i in range(common["num_layers"]) if i not in dense and (i + 1) % step == 0],
    )


def _deepseek(family: str, c: dict[str, Any], common: dict[str, Any]) -> None:
    """MLA attention, group-limited routing, shared experts, the first layers dense."""
    nope, rope_dim = int(c["qk_nope_head_dim"]), int(c["qk_rope_head_dim"])
    head_dim = nope + rope_dim
    scale = head_dim**-0.5
    scaling = common["rope_scaling"] or {}
    if scaling.get("rope_type") == "yarn" and scaling.get("mscale_all_dim"):
        from llmc.model.rope import yarn_mscale

        scale *= yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
    layers = common["num_layers"]
    first_dense = int(c.get("first_k_dense_replace") or 0)
    frequency = int(c.get("moe_layer_freq") or 1)
    if family == "deepseek_v3":
        router = "group_sigmoid"
    else:
        router = "group_softmax" if c.get("topk_method") == "group_limited_greedy" else "softmax"
    # Ungrouped routing ignores the group settings: keep them neutral, so every source (a GGUF has
    # no groups for it) gives the same spec.
    grouped = router != "softmax"
    common.update(
        mla=True,
        head_dim=head_dim,
        num_kv_heads=common["num_heads"],
        q_lora_rank=int(c.get("q_lora_rank") or 0),
        kv_lora_rank=int(c["kv_lora_rank"]),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=int(c["v_head_dim"]),
        attn_scale=scale,
        rope_interleaved=bool(c.get("rope_interleave", True)),
        partial_rotary_factor=1.0,
        qkv_bias=bool(c.get("attention_bias", False)),
        o_bias=bool(c.get("attention_bias", False)),
        num_experts=int(c.get("n_routed_experts") or 0),
        num_experts_per_tok=int(c["num_experts_per_tok"]),
        moe_intermediate_size=int(c["moe_intermediate_size"]),
        norm_topk_prob=bool(c.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(c["moe_intermediate_size"]) * int(c.get("n_shared_experts") or 0),
        shared_expert_gated=False,
        moe_layers=[i for i in range(first_dense, layers) if i % frequency == 0],
        router=router,
        n_group=int(c.get("n_group") or 1) if grouped else 1,
        topk_group=int(c.get("topk_group") or 1) if grouped else 1,
        routed_scaling_factor=float(c.get("routed_scaling_factor") or 1.0),
    )


def _sliding(family: str, c: dict[str, Any], common: dict[str, Any]) -> None:
    """Which layers use a sliding window, and how wide it is."""
    window = c.get("sliding_window")
    if not window or (family.startswith("qwen") and not c.get("use_sliding_window", False)):
        return
    layers = common["num_layers"]
    types = c.get("layer_types")
    if not types:
        if family == "gemma2":
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        elif family == "gemma3":
            pattern = int(c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6)
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
        else:
            types = ["sliding_attention"] * layers
    if "sliding_attention" not in types:
        return
    common["sliding_window"] = int(window)
    common["layer_types"] = [str(t) for t in types]


@dataclass(frozen=True)
class TensorSource:
    """Where a canonical tensor comes from: a source tensor, a row range of a fused one, or (for
    experts saved one by one) a stack over experts of the concatenation of each group's tensors."""

    name: str
    rows: tuple[int, int] | None = None
    stack: tuple[tuple[str, ...], ...] | None = None


# Per family: layer-local source suffix → canonical suffix.
_RENAMES: dict[str, dict[str, str]] = {
    "gemma2": {
        "post_attention_layernorm.weight": "post_self_attn_layernorm.weight",
        "pre_feedforward_layernorm.weight": "post_attention_layernorm.weight",
        "post_feedforward_layernorm.weight": "post_mlp_layernorm.weight",
    },
}
_RENAMES["gemma3"] = _RENAMES["gemma2"]


def tensor_plan(spec: ModelSpec, source_names: list[str]) -> dict[str, TensorSource]:
    """Canonical tensor name → its source, splitting fused projections (Phi-3, GLM-4)."""
    q = spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    inter = spec.intermediate_size
    renames = _RENAMES.get(spec.architecture, {})
    plan: dict[str, TensorSource] = {}
    per_expert = [n for n in source_names if ".mlp.experts." in n and n.split(".mlp.experts.")[1][:1].isdigit()]
    for layer_prefix in sorted({n.split(".mlp.experts.")[0] for n in per_expert}):
        experts = range(spec.num_experts)
        base = f"{layer_prefix}.mlp.experts"
        gate_up = tuple((f"{base}.{e}.gate_proj.weight", f"{base}.{e}.up_proj.weight") for e in experts)
        down = tuple((f"{base}.{e}.down_proj.weight",) for e in experts)
        plan[f"{base}.gate_up_proj"] = TensorSource(gate_up[0][0], stack=gate_up)
        plan[f"{base}.down_proj"] = TensorSource(down[0][0], stack=down)
    for name in sorted(set(source_names) - set(per_expert)):
        if name.endswith("rotary_emb.inv_freq"):
            continue  # older checkpoints saved the rope table; it is recomputed
        prefix, _, suffix = name.rpartition(".self_attn.")
        if suffix.startswith("qkv_proj."):
            kind = suffix.removeprefix("qkv_proj.")
            for part, (start, stop) in zip("qkv", [(0, q), (q, q + kv), (q + kv, q + 2 * kv)], strict=True):
                plan[f"{prefix}.self_attn.{part}_proj.{kind}"] = TensorSource(name, (start, stop))
            continue
        prefix, _, suffix = name.rpartition(".mlp.")
        if suffix.startswith("gate_up_proj."):
            kind = suffix.removeprefix("gate_up_proj.")
            plan[f"{prefix}.mlp.gate_proj.{kind}"] = TensorSource(name, (0, inter))
            plan[f"{prefix}.mlp.up_proj.{kind}"] = TensorSource(name, (inter, 2 * inter))
            continue
        parts = name.split(".")
        local = ".".join(parts[3:])
        if name.startswith("model.layers.") and local in renames:
            name_out = ".".join([*parts[:3], renames[local]])
        else:
            name_out = name
        if spec.architecture.startswith("deepseek"):
            name_out = name_out.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
        plan[name_out] = TensorSource(name)
    return plan
