"""A GGUF file as a model source: metadata → HF-style config, blocks dequantized, Q/K un-permuted.

Each llama.cpp architecture llmc runs maps back onto its Hugging Face family: tensors get the HF
names `builder/arch.py` already knows (fused ones, like Phi-3's `attn_qkv`, stay fused and are
split there), and llama.cpp's conventions are undone where they differ from HF's: the llama
arch's interleaved Q/K rows, Gemma's norms stored as (1 + w), stacked experts split in gate and up.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmc.builder.gguf_tokenizer import read_gguf_fields, tokenizer_from_gguf
from llmc.builder.sources.base import ModelSource, TensorMeta, TokenizerBundle
from llmc.errors import BadModelError
from llmc.kernels.quant_formats import BY_GGML_TYPE

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
}
SUPPORTED_GGUF_ARCHITECTURES = tuple(HF_ARCHITECTURES)
GEMMA_ARCHITECTURES = ("gemma2", "gemma3")
MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe")
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
}
# Stacked experts: llama.cpp keeps gate and up apart, transformers 5 (and llmc) stack them as one.
JOINED_EXPERTS = {"ffn_gate_exps.weight": 0, "ffn_up_exps.weight": 1}
EXPERTS_GATE_UP = "mlp.experts.gate_up_proj"
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output_norm.bias": "model.norm.bias",
    "output.weight": "lm_head.weight",
}
# Phi-3's longrope factors live in tensors; they become config, not weights.
ROPE_FACTORS = {"rope_factors_short.weight": "short_factor", "rope_factors_long.weight": "long_factor"}
# Stored 1-D ({n_embd}) as llama.cpp declares it; HF's linear layer has one row.
ROW_VECTORS = ("mlp.shared_expert_gate.weight",)
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

# Bounds on metadata values used to size or loop (far above any real model).
MAX_LAYERS = 4096
MAX_WIDTH = 1 << 20  # hidden / feed-forward / head sizes, vocabulary
MAX_HEADS = 4096
MAX_EXPERTS = 4096
MAX_CONTEXT = 1 << 26


def layer_names(arch: str) -> dict[str, str]:
    """GGUF layer-local tensor name → HF layer-local name, for one llama.cpp architecture."""
    return {**_LAYER_NAMES, **ARCH_LAYER_NAMES.get(arch, {})}


def _unpermute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved rope pairs → HF's rotate-half halves)."""
    # llama.cpp's converter reshaped rows as (head, 2, half) and swapped the last two; undo that.
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class GgufSource(ModelSource):
    def __init__(self, path: Path, name: str) -> None:
        import gguf  # the builder's dependency, not the runtime's

        try:
            self._reader = gguf.GGUFReader(str(path), "r")
        except (ValueError, OSError) as exc:
            raise BadModelError(f"{path} is not a readable GGUF file: {exc}") from exc
        fields = read_gguf_fields(self._reader)
        arch = fields.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise BadModelError(
                f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
            )
        self._arch: str = arch
        locals_ = layer_names(arch)
        # HF name → the GGUF tensors it is made of (several: joined along rows, i.e. dim -2).
        parts: dict[str, dict[int, Any]] = {}
        extra: dict[str, Any] = {}
        for tensor in self._reader.tensors:
            match = _LAYER_RE.match(tensor.name)
            local = match.group(2) if match else ""
            if tensor.name in GLOBAL_NAMES:
                parts.setdefault(GLOBAL_NAMES[tensor.name], {})[0] = tensor
            elif tensor.name in ROPE_FACTORS and arch == "phi3":
                extra[ROPE_FACTORS[tensor.name]] = tensor
            elif match and local in locals_:
                parts.setdefault(f"model.layers.{match.group(1)}.{locals_[local]}", {})[0] = tensor
            elif match and local in JOINED_EXPERTS and arch in MOE_ARCHITECTURES:
                parts.setdefault(f"model.layers.{match.group(1)}.{EXPERTS_GATE_UP}", {})[JOINED_EXPERTS[local]] = tensor
            else:
                raise BadModelError(f"GGUF tensor {tensor.name!r} is not part of the {arch} layout llmc knows")
        for hf, found in parts.items():
            if sorted(found) != list(range(len(found))) or (hf.endswith(EXPERTS_GATE_UP) and len(found) != 2):
                raise BadModelError(f"GGUF tensors for {hf} are incomplete (need both ffn_gate_exps and ffn_up_exps)")
        self._parts = {hf: [found[i] for i in sorted(found)] for hf, found in parts.items()}
        config = _config_from_fields(arch, fields, self._parts, extra)
        tok = tokenizer_from_gguf(fields)
        bundle = TokenizerBundle(
            tokenizer_json=tok.tokenizer_json,
            chat_template=tok.chat_template,
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
            eos_token_ids=tok.eos_token_ids,
            add_bos_token=tok.add_bos_token,
        )
        super().__init__("gguf", name, config, bundle, {}, [path])
        self._n_head = config["num_attention_heads"]
        self._n_kv_head = config["num_key_value_heads"]

    def tensors(self) -> dict[str, TensorMeta]:
        out = {}
        for name, parts in self._parts.items():
            shapes = [[int(d) for d in reversed(p.shape.tolist())] for p in parts]
            shape = shapes[0]
            if len(parts) > 1:
                shape[-2] = sum(s[-2] for s in shapes)
            if name.endswith(ROW_VECTORS) and len(shape) == 1:
                shape = [1, *shape]
            out[name] = TensorMeta(shape=shape, dtype=torch.float32)
        return out

    def block_format(self, name: str) -> str | None:
        parts = self._parts[name]
        fmt = BY_GGML_TYPE.get(int(parts[0].tensor_type))
        if fmt is None or len(parts) != 1 or len(parts[0].shape) != 2:
            return None
        return fmt.name

    def blocks(self, name: str) -> torch.Tensor:
        assert self.block_format(name) is not None, name
        # Rows are independent runs of blocks, so un-permuting Q/K rows works on the bytes as is.
        return self._unpermute_qk(name, torch.from_numpy(np.array(self._parts[name][0].data, dtype=np.uint8)))

    def _unpermute_qk(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        if self._arch not in PERMUTED_QK_ARCHITECTURES:
            return rows
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            return _unpermute(rows, self._n_head)
        if name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
            return _unpermute(rows, self._n_kv_head)
        return rows

    def load(self, name: str) -> torch.Tensor:
        tensor = torch.cat([_dequantize(t) for t in self._parts[name]], dim=-2 if len(self._parts[name]) > 1 else 0)
        if name.endswith(ROW_VECTORS) and tensor.dim() == 1:
            tensor = tensor.unsqueeze(0)
        if self._arch in GEMMA_ARCHITECTURES and name.endswith("norm.weight"):
            # Exact: (1 + w) - 1 in float32 gives back a w' with 1 + w' == 1 + w, all the runtime computes.
            tensor = tensor - GEMMA_NORM_OFFSET
        return self._unpermute_qk(name, tensor)


def _dequantize(tensor: Any) -> torch.Tensor:
    import gguf

    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = [int(d) for d in reversed(tensor.shape.tolist())]
    # np.array copies: F32 tensors come back as read-only views of the memory-mapped file.
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)


def _decimal(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that reads back as it (1e-06, not
    9.99999997e-07): what the source config said, for every value a config would write."""
    return float(str(np.float32(value)))


def _bounded(key: str, value: Any, limit: int, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= limit:
        raise BadModelError(f"GGUF metadata {key} = {value!r} is out of range [{minimum}, {limit}]")
    return value


def _config_from_fields(
    arch: str, fields: dict[str, Any], parts: dict[str, list[Any]], extra: dict[str, Any]
) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise BadModelError(f"GGUF metadata key {arch}.{key} is missing")
        return value

    def count(key: str, limit: int, default: Any = None, minimum: int = 1) -> int:
        return _bounded(f"{arch}.{key}", get(key, default), limit, minimum)

    hidden = count("embedding_length", MAX_WIDTH)
    heads = count("attention.head_count", MAX_HEADS)
    layers = count("block_count", MAX_LAYERS)
    vocab = fields.get(f"{arch}.vocab_size") or len(fields.get("tokenizer.ggml.tokens") or [])
    head_dim = fields.get(f"{arch}.attention.key_length")
    if head_dim is None and arch in PERMUTED_QK_ARCHITECTURES:
        head_dim = fields.get(f"{arch}.rope.dimension_count")
    head_dim = _bounded(f"{arch}.attention.key_length", head_dim or hidden // heads, MAX_WIDTH)
    rope_dim = _bounded(f"{arch}.rope.dimension_count", get("rope.dimension_count", head_dim), head_dim)
    has = {name.split(".", 3)[-1] for name in parts}  # layer-local HF names present in some layer
    config: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[arch]],
        "hidden_size": hidden,
        "intermediate_size": count("feed_forward_length", MAX_WIDTH),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": count("attention.head_count_kv", MAX_HEADS, heads),
        "head_dim": head_dim,
        "max_position_embeddings": count("context_length", MAX_CONTEXT),
        "rope_theta": _decimal(get("rope.freq_base", 10000.0)),
        "vocab_size": _bounded(f"{arch}.vocab_size", vocab, MAX_WIDTH),
        "tie_word_embeddings": "lm_head.weight" not in parts,
        "attention_bias": "self_attn.q_proj.bias" in has,
    }
    if arch == "stablelm":
        config["layer_norm_eps"] = _decimal(get("attention.layer_norm_epsilon"))
        config["use_qkv_bias"] = config["attention_bias"]
        config["qk_layernorm"] = "self_attn.q_norm.weight" in has
        config["use_parallel_residual"] = "post_attention_layernorm.weight" not in has
    else:
        config["rms_norm_eps"] = _decimal(get("attention.layer_norm_rms_epsilon"))
    if rope_dim != head_dim:
        config["partial_rotary_factor"] = rope_dim / head_dim
    window = fields.get(f"{arch}.attention.sliding_window")
    if window:
        config["sliding_window"] = _bounded(f"{arch}.attention.sliding_window", window, MAX_CONTEXT)
        config["use_sliding_window"] = True  # Qwen configs need saying so
        if arch == "llama":
            config["architectures"] = ["MistralForCausalLM"]
    pattern = fields.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise BadModelError(f"GGUF {arch}.attention.sliding_window_pattern has {len(pattern)} layers, not {layers}")
        config["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
    elif isinstance(pattern, int) and window:
        config["sliding_window_pattern"] = _bounded(f"{arch}.attention.sliding_window_pattern", pattern, layers)
    _rope_scaling(arch, fields, config, extra, rope_dim)
    if arch in GEMMA_ARCHITECTURES:
        _gemma(arch, fields, config)
    if arch in MOE_ARCHITECTURES:
        _moe(arch, fields, config, layers, parts)
    return config


def _rope_scaling(
    arch: str, fields: dict[str, Any], config: dict[str, Any], extra: dict[str, Any], rope_dim: int
) -> None:
    scaling_type = fields.get(f"{arch}.rope.scaling.type")
    if scaling_type == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": _decimal(fields[f"{arch}.rope.scaling.factor"])}
    elif extra and set(extra) == set(ROPE_FACTORS.values()):  # Phi-3's longrope
        rope: dict[str, Any] = {"rope_type": "longrope", "rope_theta": config["rope_theta"]}
        for key, tensor in extra.items():
            if int(np.prod(tensor.shape.tolist())) != rope_dim // 2:
                raise BadModelError(f"GGUF {key} tensor has {tensor.shape.tolist()} values, rope needs {rope_dim // 2}")
            rope[key] = _dequantize(tensor).flatten().tolist()
        original = _bounded(
            f"{arch}.rope.scaling.original_context_length",
            fields.get(f"{arch}.rope.scaling.original_context_length"),
            MAX_CONTEXT,
        )
        config["original_max_position_embeddings"] = original
        attn_factor = fields.get(f"{arch}.rope.scaling.attn_factor")
        if attn_factor is not None and not math.isclose(
            float(attn_factor), longrope_attn_factor(config["max_position_embeddings"], original), rel_tol=1e-6
        ):
            rope["attention_factor"] = float(attn_factor)
        config["rope_parameters"] = rope
    elif extra:
        raise BadModelError("GGUF file has only one of rope_factors_short / rope_factors_long")
    elif scaling_type not in (None, "none"):
        raise BadModelError(f"GGUF rope scaling {scaling_type!r} is not supported yet")


def longrope_attn_factor(max_positions: int, original: int) -> float:
    """Phi-3's attention scaling for longrope (what HF computes when the config gives none)."""
    scale = max_positions / original
    return 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))


# llama.cpp derives Gemma's query scale from the model size: the 27B models scale by hidden/heads.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma(arch: str, fields: dict[str, Any], config: dict[str, Any]) -> None:
    config["hidden_activation"] = "gelu_pytorch_tanh"
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = fields.get(f"{arch}.{key}")
        config[key] = None if value is None else _decimal(value)
    scale = fields.get(f"{arch}.attention.scale")
    if scale:
        config["query_pre_attn_scalar"] = float(scale) ** -2
    elif config["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch]:
        config["query_pre_attn_scalar"] = config["hidden_size"] // config["num_attention_heads"]
    else:
        config["query_pre_attn_scalar"] = config["head_dim"]
    if arch == "gemma3":
        config["rope_local_base_freq"] = _decimal(fields.get(f"{arch}.rope.freq_base_swa", 10000.0))
        config.setdefault("sliding_window_pattern", 6)  # llama.cpp's fixed 5 local : 1 global


def _moe(arch: str, fields: dict[str, Any], config: dict[str, Any], layers: int, parts: dict[str, list[Any]]) -> None:
    def count(key: str, limit: int, default: Any = None) -> int:
        return _bounded(f"{arch}.{key}", fields.get(f"{arch}.{key}", default), limit, 0)

    config["num_experts"] = count("expert_count", MAX_EXPERTS)
    config["num_experts_per_tok"] = count("expert_used_count", config["num_experts"])
    config["moe_intermediate_size"] = count("expert_feed_forward_length", MAX_WIDTH)
    config["shared_expert_intermediate_size"] = count("expert_shared_feed_forward_length", MAX_WIDTH, 0)
    config["norm_topk_prob"] = bool(fields.get(f"{arch}.expert_weights_norm", arch == "qwen3moe"))
    config["mlp_only_layers"] = [i for i in range(layers) if f"model.layers.{i}.mlp.gate.weight" not in parts]
