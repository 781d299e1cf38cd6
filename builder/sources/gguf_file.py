"""A GGUF file as a model source: metadata → HF-style config, blocks dequantized, Q/K un-permuted."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmc.builder.gguf_tokenizer import read_gguf_fields, tokenizer_from_gguf
from llmc.builder.sources.base import ModelSource, TensorMeta, TokenizerBundle
from llmc.errors import BadModelError
from llmc.kernels.quant_formats import BY_GGML_TYPE

# llama.cpp's tensor names → HF Llama names. `{n}` is the layer index.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


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
        self._tensors: dict[str, Any] = {}
        for tensor in self._reader.tensors:
            hf = _hf_name(tensor.name)
            if hf is None:
                raise BadModelError(f"GGUF tensor {tensor.name!r} is not part of the {arch} layout llmc knows")
            self._tensors[hf] = tensor
        config = _config_from_fields(arch, fields, tied="lm_head.weight" not in self._tensors)
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
        return {
            name: TensorMeta(shape=[int(d) for d in reversed(t.shape.tolist())], dtype=torch.float32)
            for name, t in self._tensors.items()
        }

    def blocks(self, name: str) -> tuple[str, torch.Tensor] | None:
        tensor = self._tensors[name]
        fmt = BY_GGML_TYPE.get(int(tensor.tensor_type))
        if fmt is None or len(tensor.shape) != 2:
            return None
        # Rows are independent runs of blocks, so un-permuting Q/K rows works on the bytes as is.
        return fmt.name, self._unpermute_qk(name, torch.from_numpy(np.array(tensor.data, dtype=np.uint8)))

    def _unpermute_qk(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            return _unpermute(rows, self._n_head)
        if name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
            return _unpermute(rows, self._n_kv_head)
        return rows

    def load(self, name: str) -> torch.Tensor:
        import gguf

        tensor = self._tensors[name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = [int(d) for d in reversed(tensor.shape.tolist())]
        # np.array copies: F32 tensors come back as read-only views of the memory-mapped file.
        return self._unpermute_qk(name, torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape))


def _config_from_fields(arch: str, fields: dict[str, Any], tied: bool) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise BadModelError(f"GGUF metadata key {arch}.{key} is missing")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    vocab = fields.get(f"{arch}.vocab_size") or len(fields.get("tokenizer.ggml.tokens") or [])
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(
            fields.get(f"{arch}.attention.key_length") or fields.get(f"{arch}.rope.dimension_count") or hidden // heads
        ),
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": tied,
    }
    scaling_type = fields.get(f"{arch}.rope.scaling.type")
    if scaling_type == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise BadModelError(f"GGUF rope scaling {scaling_type!r} is not supported yet")
    return config
