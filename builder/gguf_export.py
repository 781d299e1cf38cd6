"""`llmc export ART --gguf FILE`: write an artifact back to a GGUF file that llama.cpp loads.

Llama-family artifacts with a byte-level BPE tokenizer (llama.cpp's `gpt2` tokenizer model) are
supported for now; float tensors are written in the artifact's float dtype (f32, or f16 for f16/bf16
artifacts, since GGUF's BF16 support varies across llama.cpp builds) and quantized tensors as the
GGML blocks they already are, byte for byte. Q and K rows are permuted back into llama.cpp's
interleaved rope order (rows are independent runs of blocks, so this works on blocks too), the
inverse of what the GGUF source undoes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmc.artifacts.reader import Artifact
from llmc.builder.gguf_tokenizer import PRE_TOKENIZERS, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED
from llmc.errors import BadInputError
from llmc.kernels.quant_formats import stored_format

_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
EXPORTABLE = ("llama", "mistral")


def gguf_name(name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".")
    local = ".".join(parts[3:])
    if parts[:2] == ["model", "layers"] and local in _LAYER:
        return f"blk.{parts[2]}.{_LAYER[local]}"
    raise BadInputError(f"tensor {name} has no GGUF name in llmc's exporter")


def _permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half row order → llama.cpp's interleaved pairs (as llama.cpp's converter does)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _tokenizer_fields(tokenizer_json: dict[str, Any]) -> dict[str, Any]:
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise BadInputError("only byte-level BPE tokenizers can be exported to GGUF for now")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])[:-1]
    name = next((k for k, v in PRE_TOKENIZERS.items() if v == steps), None)
    if name is None:
        raise BadInputError("this tokenizer's pre-tokenizer has no llama.cpp name; it cannot be exported to GGUF")
    vocab: dict[str, int] = model["vocab"]
    added = {t["id"]: t for t in tokenizer_json.get("added_tokens", [])}
    size = max([*vocab.values(), *added]) + 1
    tokens = [""] * size
    types = [TOKEN_NORMAL] * size
    for token, index in vocab.items():
        tokens[index] = token
    for index, entry in added.items():
        tokens[index] = entry["content"]
        types[index] = TOKEN_CONTROL if entry.get("special") else TOKEN_USER_DEFINED
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": name}


# The file type a GGUF reports (informational: llama.cpp reads each tensor's own type) for the
# format most of the quantized tensors have; K-quant builds follow the _M mixes (quant_plan.py).
_FILE_TYPES = {
    "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1",
    "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1",
    "q8_0": "MOSTLY_Q8_0",
    "q2k": "MOSTLY_Q2_K",
    "q3k": "MOSTLY_Q3_K_M",
    "q4k": "MOSTLY_Q4_K_M",
    "q5k": "MOSTLY_Q5_K_M",
    "q6k": "MOSTLY_Q6_K",
}


def _file_type(gguf: Any, formats: list[str], half: bool) -> Any:
    if formats:
        most = max(sorted(set(formats)), key=formats.count)
        return getattr(gguf.LlamaFileType, _FILE_TYPES[most])
    return gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32


def export_gguf(artifact_dir: Path, out: Path) -> Path:
    import gguf

    artifact = Artifact.open(artifact_dir)
    manifest = artifact.manifest
    spec = manifest.model
    if spec.architecture not in EXPORTABLE:
        raise BadInputError(f"GGUF export supports {', '.join(EXPORTABLE)} artifacts; this one is {spec.architecture}")
    tok = _tokenizer_fields(json.loads((artifact.root / manifest.tokenizer.file).read_text(encoding="utf-8")))
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(manifest.model_name)
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_vocab_size(spec.vocab_size)
    half = manifest.dtype in ("f16", "bf16")
    quant = {t.name: t.quant for t in manifest.tensors if t.quant is not None}
    writer.add_file_type(_file_type(gguf, list(quant.values()), half))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    info = manifest.tokenizer
    vocab_index = {t: i for i, t in enumerate(tok["tokens"])}
    if info.bos_token in vocab_index:
        writer.add_bos_token_id(vocab_index[info.bos_token])
    if info.eos_token in vocab_index:
        writer.add_eos_token_id(vocab_index[info.eos_token])
    writer.add_add_bos_token(info.add_bos_token)
    if info.chat_template_file:
        writer.add_chat_template((artifact.root / info.chat_template_file).read_text(encoding="utf-8"))
    for name, tensor in artifact.weights():
        if name == "lm_head.weight" and spec.tie_word_embeddings:
            continue
        data = tensor if name in quant else tensor.float()
        if name.endswith("self_attn.q_proj.weight"):
            data = _permute(data, spec.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            data = _permute(data, spec.num_kv_heads)
        array: np.ndarray = data.contiguous().numpy()
        if name in quant:
            qtype = gguf.GGMLQuantizationType(stored_format(quant[name]).ggml_type)
            writer.add_tensor(gguf_name(name), array, raw_shape=array.shape, raw_dtype=qtype)
            continue
        if half and data.dim() > 1:  # norms stay f32, as llama.cpp's converter writes them
            array = array.astype(np.float16)
        writer.add_tensor(gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
