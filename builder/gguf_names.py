"""llama.cpp's GGUF naming conventions, shared by the GGUF reader (builder/sources/gguf_file.py)
and `llmc export` (builder/gguf_export.py): architecture names, tensor names and how they map onto
the Hugging Face names builder/arch.py knows. One table each way, so a file llmc writes reads back.
"""

from __future__ import annotations

from llmc.errors import BadInputError

# GGUF `general.architecture` → the HF architecture it is loaded as (llama.cpp's `llama` arch also
# carries Mistral; a sliding window in its metadata says which).
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "stablelm": "StableLmForCausalLM",
    "glm4": "Glm4ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "deepseek2": "DeepseekV2ForCausalLM",  # V3 when its router is a sigmoid (see _deepseek2)
}
SUPPORTED_GGUF_ARCHITECTURES = tuple(HF_ARCHITECTURES)
GEMMA_ARCHITECTURES = ("gemma2", "gemma3")
MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe")
# Architectures whose routed experts are stacked ffn_{gate,up,down}_exps tensors.
STACKED_EXPERT_ARCHITECTURES = (*MOE_ARCHITECTURES, "deepseek2")
# llama.cpp's Gemma converter stores RMSNorm weights as (1 + w); HF (and llmc's spec) keep w.
GEMMA_NORM_OFFSET = 1.0
# Only llama.cpp's `llama` arch rotates interleaved pairs; its converter permutes HF's Q/K rows for it.
PERMUTED_QK_ARCHITECTURES = ("llama",)

# llama.cpp's tensor names → HF names. `{n}` is the layer index.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_MOE_NAMES = {
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
_GEMMA_NAMES = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# Phi-3 and GLM-4 keep gate and up fused in `ffn_up` (gate rows first), as HF's gate_up_proj does.
_FUSED_UP = {"ffn_up.weight": "mlp.gate_up_proj.weight"}
ARCH_LAYER_NAMES: dict[str, dict[str, str]] = {
    "phi3": {"attn_qkv.weight": "self_attn.qkv_proj.weight", **_FUSED_UP},
    "gemma2": _GEMMA_NAMES,
    "gemma3": _GEMMA_NAMES,
    "stablelm": {"attn_norm.bias": "input_layernorm.bias", "ffn_norm.bias": "post_attention_layernorm.bias"},
    "glm4": {
        "post_attention_norm.weight": "post_self_attn_layernorm.weight",
        "post_ffw_norm.weight": "post_mlp_layernorm.weight",
        **_FUSED_UP,
    },
    "qwen2moe": _MOE_NAMES,
    "qwen3moe": _MOE_NAMES,
    # Latent attention; shared experts already under llmc's canonical `shared_expert` name.
    "deepseek2": {
        **_MOE_NAMES,
        "attn_q_a.weight": "self_attn.q_a_proj.weight",
        "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
        "attn_q_b.weight": "self_attn.q_b_proj.weight",
        "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
        "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
        "attn_kv_b.weight": "self_attn.kv_b_proj.weight",  # older files; current ones split it (below)
        "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    },
}
# Stacked experts: llama.cpp keeps gate and up apart, transformers 5 (and llmc) stack them as one.
JOINED_EXPERTS = {"ffn_gate_exps.weight": 0, "ffn_up_exps.weight": 1}
EXPERTS_GATE_UP = "mlp.experts.gate_up_proj"
# llama.cpp's converter splits latent attention's kv_b_proj per head into k_b (transposed, so the
# key half can be absorbed into the query) and v_b; both are joined back into kv_b_proj.
SPLIT_KV_B = {"attn_k_b.weight": 0, "attn_v_b.weight": 1}
KV_B_PROJ = "self_attn.kv_b_proj.weight"
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output_norm.bias": "model.norm.bias",
    "output.weight": "lm_head.weight",
}
# Phi-3's longrope factors live in tensors; they become config, not weights.
ROPE_FACTORS = {"rope_factors_short.weight": "short_factor", "rope_factors_long.weight": "long_factor"}
# Llama-3 rope scaling, as llama.cpp stores it: one frequency divisor per rotated pair.
ROPE_FREQS = "rope_freqs.weight"
# Stored 1-D ({n_embd}) as llama.cpp declares it; HF's linear layer has one row.
ROW_VECTORS = ("mlp.shared_expert_gate.weight",)


def layer_names(arch: str) -> dict[str, str]:
    """GGUF layer-local tensor name → HF layer-local name, for one llama.cpp architecture."""
    return {**_LAYER_NAMES, **ARCH_LAYER_NAMES.get(arch, {})}


# llmc family → llama.cpp architecture.
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "stablelm": "stablelm",
    "glm4": "glm4",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
}
EXPORTABLE = tuple(GGUF_ARCHITECTURES)
GLOBAL_GGUF_NAMES = {hf: gguf for gguf, hf in GLOBAL_NAMES.items()}
# Gemma's canonical norm names (builder/arch.py renames them) → the HF names GGUF names map from.
_GEMMA_CANONICAL = {
    "post_self_attn_layernorm.weight": "post_attention_layernorm.weight",
    "post_attention_layernorm.weight": "pre_feedforward_layernorm.weight",
    "post_mlp_layernorm.weight": "post_feedforward_layernorm.weight",
}


def layer_table(arch: str) -> dict[str, str]:
    """Canonical layer-local name → GGUF layer-local name."""
    table = {hf: gguf for gguf, hf in layer_names(arch).items()}
    if arch in GEMMA_ARCHITECTURES:
        renamed = {canonical: table[hf] for canonical, hf in _GEMMA_CANONICAL.items()}
        table = {k: v for k, v in table.items() if k not in _GEMMA_CANONICAL.values()} | renamed
    return table


def gguf_name(name: str, arch: str = "llama") -> str:
    """The GGUF name of a canonical (or, for fused tensors, HF) tensor name."""
    if name in GLOBAL_GGUF_NAMES:
        return GLOBAL_GGUF_NAMES[name]
    parts = name.split(".")
    local = ".".join(parts[3:])
    table = layer_table(arch)
    if parts[:2] == ["model", "layers"] and local in table:
        return f"blk.{parts[2]}.{table[local]}"
    raise BadInputError(f"tensor {name} has no GGUF name in llmc's {arch} exporter")
