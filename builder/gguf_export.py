"""`llmc export ART --gguf FILE`: write an artifact back to a GGUF file that llama.cpp loads.

Every family with a llama.cpp architecture is written in that architecture's layout (see
`builder/sources/gguf_file.py`, which reads it back): Mistral as `llama`, Qwen2-MoE as `qwen2moe`,
and so on. Artifacts with a byte-level BPE tokenizer (llama.cpp's `gpt2` tokenizer model) are
supported for now; float tensors are written in the artifact's float dtype (f32, or f16 for
f16/bf16 artifacts, since GGUF's BF16 support varies across llama.cpp builds; a float16 embedding
kept in a float32 artifact stays f16) and quantized tensors
as the GGML blocks they already are, byte for byte. llama.cpp's conventions are applied as its
converter does: Q and K rows permuted into interleaved rope order for the `llama` arch (rows are
independent runs of blocks, so this works on blocks too), Gemma norms stored as (1 + w), Phi-3's
q/k/v and the Phi-3 / GLM-4 gate and up projections fused, stacked experts split into gate and up,
DeepSeek's kv_b_proj split per head into attn_k_b (transposed) and attn_v_b, and Llama-3 rope
scaling written as the `rope_freqs` divisors.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmc.artifacts.generation import effective
from llmc.artifacts.manifest import GenerationDefaults, ModelSpec
from llmc.artifacts.reader import Artifact
from llmc.builder.gguf_names import (
    EXPERTS_GATE_UP,
    EXPORTABLE,
    GEMMA_ARCHITECTURES,
    GGUF_ARCHITECTURES,
    JOINED_EXPERTS,
    KV_B_PROJ,
    PERMUTED_QK_ARCHITECTURES,
    ROPE_FACTORS,
    ROPE_FREQS,
    ROW_VECTORS,
    SPLIT_KV_B,
    gguf_name,
)
from llmc.builder.gguf_tokenizer import (
    PRE_TOKENIZERS,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
)
from llmc.builder.sources.gguf_file import (
    YARN_LOG_MULTIPLIER_SCALE,
    llama3_rope_factors,
    llama3_scaling_from_factors,
    longrope_attn_factor,
    split_kv_b,
)
from llmc.errors import BadArtifactError, BadInputError
from llmc.quant.formats import stored_format

# Tensor bytes kept in memory before the export's scratch file spills to disk: a few tensors' worth.
_SPOOL_BYTES = 64 * 1024 * 1024
# Projections llama.cpp stores fused, per architecture: fused HF name → its canonical parts, in row order.
_FUSED: dict[str, dict[str, tuple[str, ...]]] = {
    "phi3": {
        "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    },
    "glm4": {"mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")},
}
# Where llama.cpp has no place for a value, the export is refused rather than silently different.
_ROPE_SCALING: dict[str, tuple[str, ...] | None] = {
    "linear": None,
    "longrope": ("phi3",),
    "llama3": ("llama",),
    "yarn": ("deepseek2",),
}
# The YaRN settings llama.cpp's deepseek2 reads (see gguf_file._yarn); any other key is refused.
_YARN_KEYS = {
    "rope_type",
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
}
_LLAMA3_KEYS = {"rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}


def _permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half row order → llama.cpp's interleaved pairs (as llama.cpp's converter does)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _tokenizer_fields(tokenizer_json: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise BadInputError("only byte-level BPE tokenizers can be exported to GGUF for now")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])[:-1]
    name = next((k for k, v in PRE_TOKENIZERS.items() if v == steps), None)
    if name is None:
        raise BadInputError("this tokenizer's pre-tokenizer has no llama.cpp name; it cannot be exported to GGUF")
    vocab: dict[str, int] = model.get("vocab") or {}
    added_tokens = tokenizer_json.get("added_tokens") or []
    if not isinstance(vocab, dict) or not isinstance(added_tokens, list):
        raise BadArtifactError("the artifact's tokenizer.json has no vocabulary object or added_tokens list")
    if not all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in added_tokens):
        raise BadArtifactError("the artifact's tokenizer.json has an added token without a string content")
    added = {t.get("id"): t for t in added_tokens}
    # llama.cpp wants one token per embedding row: pad as its converter does, with unused tokens.
    # The ids come from a stranger's file: a list as long as the largest one is made below, so
    # each must be a row of the model or one of the tokens the file lists (3e9 took 7 GB).
    limit = max(vocab_size, len(vocab) + len(added))
    for index in [*vocab.values(), *added]:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < limit:
            raise BadArtifactError(
                f"the artifact's tokenizer.json has the token id {index!r}, not in 0..{limit - 1} "
                f"(the model's {vocab_size} rows, or as many as the file lists); rebuild the artifact"
            )
    size = max([*vocab.values(), *added, vocab_size - 1]) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TOKEN_UNUSED] * size
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = TOKEN_NORMAL
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


def _check_exportable(spec: ModelSpec, arch: str) -> None:
    """Refuse what the GGUF layout cannot say, rather than writing a file that means something else."""
    scaling = (spec.rope_scaling or {}).get("rope_type")
    if scaling is not None and (scaling not in _ROPE_SCALING or arch not in (_ROPE_SCALING[scaling] or (arch,))):
        raise BadInputError(f"{spec.architecture} with {scaling} rope scaling cannot be exported to GGUF yet")
    if arch == "gemma2" and not spec.tie_word_embeddings:
        raise BadInputError("llama.cpp's gemma2 has no separate output matrix: untied Gemma-2 cannot be exported")
    if spec.qkv_bias != spec.o_bias and arch not in ("qwen2", "qwen2moe", "stablelm", "glm4"):
        raise BadInputError(f"{spec.architecture} with a q/k/v bias but no output bias cannot be exported to GGUF")
    if scaling == "llama3":
        _check_llama3(spec)
    if arch == "deepseek2":
        _check_deepseek2(spec)


def _check_llama3(spec: ModelSpec) -> None:
    """The llama3 parameters must come back from the divisors alone (plus the original context)."""
    scaling = dict(spec.rope_scaling or {})
    dim = round(spec.head_dim * spec.partial_rotary_factor)
    if set(scaling) != _LLAMA3_KEYS:
        raise BadInputError(f"llama3 rope scaling with keys {sorted(scaling)} cannot be exported to GGUF")
    factors = llama3_rope_factors(dim, spec.rope_theta, scaling).tolist()
    original = int(scaling["original_max_position_embeddings"])
    if llama3_scaling_from_factors(factors, spec.rope_theta, dim, original) != scaling:
        raise BadInputError(
            "this model's llama3 rope scaling leaves too few blended frequencies to be read back from "
            "llama.cpp's rope_freqs; it cannot be exported to GGUF"
        )


def _check_deepseek2(spec: ModelSpec) -> None:
    """What llama.cpp's deepseek2 cannot say: biases, rotate-half rope, MoE layers that are not one
    run after the dense ones, a shared-expert width that is not a whole number of experts."""
    if spec.qkv_bias or spec.o_bias or spec.mlp_bias:
        raise BadInputError("llama.cpp's deepseek2 has no attention or MLP biases; this model cannot be exported")
    if not spec.rope_interleaved:
        raise BadInputError("llama.cpp's deepseek2 rotates interleaved pairs; rotate-half DeepSeek cannot be exported")
    first_dense = min(spec.moe_layers or [spec.num_layers])
    if spec.moe_layers != list(range(first_dense, spec.num_layers)):
        raise BadInputError("llama.cpp's deepseek2 needs every layer after the leading dense ones to be MoE")
    if not spec.moe_intermediate_size or spec.shared_expert_intermediate_size % spec.moe_intermediate_size:
        raise BadInputError("the shared experts' width is not a whole number of experts; cannot export to GGUF")
    if spec.router not in ("softmax", "group_softmax", "group_sigmoid"):
        raise BadInputError(f"router {spec.router!r} has no deepseek2 form")
    scaling = spec.rope_scaling or {}
    # llama.cpp has no key for YaRN's mscale: it takes it equal to mscale_all_dim.
    yarn_unsaid = set(scaling) - _YARN_KEYS or scaling.get("mscale") != scaling.get("mscale_all_dim")
    if scaling.get("rope_type") == "yarn" and yarn_unsaid:
        raise BadInputError(f"YaRN settings {scaling} have no llama.cpp deepseek2 form; cannot export to GGUF")


def _metadata(writer: Any, gguf: Any, spec: ModelSpec, arch: str) -> None:
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    if arch == "deepseek2":
        _deepseek2_metadata(writer, gguf, spec)
    else:
        writer.add_head_count_kv(spec.num_kv_heads)
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
        writer.add_rope_dimension_count(round(spec.head_dim * spec.partial_rotary_factor))
    writer.add_rope_freq_base(spec.rope_theta)
    if spec.norm == "layer":
        writer.add_layer_norm_eps(spec.rms_norm_eps)
    else:
        writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_vocab_size(spec.vocab_size)
    if spec.sliding_window is not None and spec.layer_types is not None:
        writer.add_sliding_window(spec.sliding_window)
        if len(set(spec.layer_types)) > 1:
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in spec.layer_types])
    if spec.rope_local_theta is not None:
        writer.add_rope_freq_base_swa(spec.rope_local_theta)
    if spec.attn_softcap is not None:
        writer.add_attn_logit_softcapping(spec.attn_softcap)
    if spec.final_softcap is not None:
        writer.add_final_logit_softcapping(spec.final_softcap)
    if spec.attn_scale is not None and arch in GEMMA_ARCHITECTURES:
        writer.add_attention_scale(spec.attn_scale)  # llama.cpp guesses it from the model size
    scaling = spec.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling.get("rope_type") == "longrope":
        original = int(scaling["original_max_position_embeddings"])
        writer.add_rope_scaling_orig_ctx_len(original)
        factor = scaling.get("attention_factor")
        writer.add_rope_scaling_attn_factors(
            float(factor) if factor is not None else longrope_attn_factor(spec.max_position_embeddings, original)
        )
    elif scaling.get("rope_type") == "llama3":
        # llama.cpp reads only the divisors (rope_freqs); the original context pins down which
        # llama3 parameters they came from when llmc reads the file back.
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif scaling.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        if "beta_fast" in scaling:
            writer.add_rope_scaling_yarn_beta_fast(float(scaling["beta_fast"]))
        if "beta_slow" in scaling:
            writer.add_rope_scaling_yarn_beta_slow(float(scaling["beta_slow"]))
        if scaling.get("mscale_all_dim") is not None:
            writer.add_rope_scaling_yarn_log_mul(YARN_LOG_MULTIPLIER_SCALE * float(scaling["mscale_all_dim"]))
    if arch == "deepseek2":
        return  # experts written by _deepseek2_metadata
    if spec.num_experts:
        writer.add_expert_count(spec.num_experts)
        writer.add_expert_used_count(spec.num_experts_per_tok)
        writer.add_expert_feed_forward_length(spec.moe_intermediate_size)
        writer.add_expert_weights_norm(spec.norm_topk_prob)
        if spec.shared_expert_intermediate_size:
            writer.add_expert_shared_feed_forward_length(spec.shared_expert_intermediate_size)


def _sampling_metadata(writer: Any, defaults: GenerationDefaults) -> None:
    """The sampling defaults as llama.cpp's `general.sampling.*` keys (its server takes them as its
    defaults; `llmc build` reads them back). Its top-k and min-p of 0 also mean "no cut"."""
    writer.add_sampling_temp(defaults.temperature)
    writer.add_sampling_top_p(defaults.top_p)
    writer.add_sampling_top_k(defaults.top_k)
    writer.add_sampling_min_p(defaults.min_p)
    writer.add_sampling_penalty_repeat(defaults.repetition_penalty)


def _deepseek2_metadata(writer: Any, gguf: Any, spec: ModelSpec) -> None:
    """Latent attention as llama.cpp runs it (one shared key/value head of kv_lora_rank + rope
    dimensions), the per-head sizes in the `_mla` keys, and the routing."""
    writer.add_head_count_kv(1)
    writer.add_key_length(spec.kv_lora_rank + spec.qk_rope_head_dim)
    writer.add_value_length(spec.kv_lora_rank)
    writer.add_key_length_mla(spec.qk_nope_head_dim + spec.qk_rope_head_dim)
    writer.add_value_length_mla(spec.v_head_dim)
    writer.add_rope_dimension_count(spec.qk_rope_head_dim)
    # Written even when 0: llama.cpp requires the key for all but a few known model sizes.
    writer.add_q_lora_rank(spec.q_lora_rank)
    writer.add_kv_lora_rank(spec.kv_lora_rank)
    writer.add_leading_dense_block_count(min(spec.moe_layers or [spec.num_layers]))
    writer.add_expert_count(spec.num_experts)
    writer.add_expert_used_count(spec.num_experts_per_tok)
    writer.add_expert_feed_forward_length(spec.moe_intermediate_size)
    writer.add_expert_shared_count(spec.shared_expert_intermediate_size // spec.moe_intermediate_size)
    writer.add_expert_weights_scale(spec.routed_scaling_factor)
    writer.add_expert_weights_norm(spec.norm_topk_prob)
    sigmoid = spec.router == "group_sigmoid"
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    if spec.router != "softmax":  # ungrouped V2 routing: llama.cpp groups whenever the count is > 1
        writer.add_expert_group_count(spec.n_group)
        writer.add_expert_group_used_count(spec.topk_group)


def _dequantized(tensor: torch.Tensor, fmt: str | None) -> torch.Tensor:
    return tensor.float() if fmt is None else stored_format(fmt).dequantize(tensor).float()


def _gguf_tensors(
    spec: ModelSpec, arch: str, weights: Mapping[str, torch.Tensor], quant: dict[str, str]
) -> Iterator[tuple[str, torch.Tensor, str | None]]:
    """(GGUF name, data, GGML block format or None for float) for every tensor, in llama.cpp's
    layout; `weights` may read each tensor on lookup (Artifact.lazy_weights), so one is held at a time."""
    fused = {part: (whole, parts) for whole, parts in _FUSED.get(arch, {}).items() for part in parts}
    scaling = spec.rope_scaling or {}
    if scaling.get("rope_type") == "longrope":
        for gguf_key, key in ROPE_FACTORS.items():
            yield gguf_key, torch.tensor(scaling[key], dtype=torch.float32), None
    elif scaling.get("rope_type") == "llama3":
        dim = round(spec.head_dim * spec.partial_rotary_factor)
        yield ROPE_FREQS, torch.from_numpy(llama3_rope_factors(dim, spec.rope_theta, scaling)), None
    for name in weights:
        if name == "lm_head.weight" and spec.tie_word_embeddings:
            continue
        prefix, local = ".".join(name.split(".")[:3]), ".".join(name.split(".")[3:])
        if local in fused:
            whole, parts = fused[local]
            if local != parts[0]:
                continue  # written with its first part
            names = [f"{prefix}.{p}" for p in parts]
            formats = {quant.get(n) for n in names}
            if len(formats) == 1:  # same format (or all float): rows concatenate as they are
                yield gguf_name(f"{prefix}.{whole}", arch), torch.cat([weights[n] for n in names]), formats.pop()
            else:
                yield (
                    gguf_name(f"{prefix}.{whole}", arch),
                    torch.cat([_dequantized(weights[n], quant.get(n)) for n in names]),
                    None,
                )
            continue
        tensor = weights[name]  # looked up only now: a lazy mapping reads it here
        if arch == "deepseek2" and local == KV_B_PROJ:
            halves = split_kv_b(_dequantized(tensor, quant.get(name)), spec.num_heads, spec.qk_nope_head_dim)
            for gguf_local, half in zip(SPLIT_KV_B, halves, strict=True):
                yield f"blk.{name.split('.')[2]}.{gguf_local}", half, None
            continue
        if local == EXPERTS_GATE_UP:
            gate, up = tensor.float().chunk(2, dim=1)
            for gguf_local, half in zip(JOINED_EXPERTS, (gate, up), strict=True):
                yield f"blk.{name.split('.')[2]}.{gguf_local}", half, None
            continue
        # float16 tables (a checkpoint's own precision, builder/build.py) stay F16, which GGUF has;
        # vectors (norms, biases) are F32 whatever the artifact holds: llama.cpp multiplies f32
        # activations by them and aborts on an F16 one (`binary_op: unsupported types`)
        table = tensor.dtype == torch.float16 and tensor.dim() > 1
        data = tensor if name in quant or table else tensor.float()
        if arch in PERMUTED_QK_ARCHITECTURES and local == "self_attn.q_proj.weight":
            data = _permute(data, spec.num_heads)
        elif arch in PERMUTED_QK_ARCHITECTURES and local == "self_attn.k_proj.weight":
            data = _permute(data, spec.num_kv_heads)
        elif spec.norm_weight_offset and name.endswith("norm.weight"):
            data = data + spec.norm_weight_offset  # llama.cpp multiplies by the stored weight
        elif name.endswith(ROW_VECTORS):
            data = data.flatten()
        yield gguf_name(name, arch), data, quant.get(name)


def export_gguf(artifact_dir: Path, out: Path) -> Path:
    """Write the artifact as the GGUF file `out`, which must not exist yet: a file already there may
    be the user's own (the GGUF the artifact was built from), and export never overwrites one.
    The file is written under a temporary name beside `out` and linked into place once complete."""
    import gguf

    if out.exists() or out.is_symlink():
        raise BadInputError(
            f"{out} already exists; llmc export never overwrites a file: remove it or choose another --gguf path"
        )
    if not out.parent.is_dir():
        raise BadInputError(f"the folder {out.parent} does not exist; create it or choose another --gguf path")
    artifact = Artifact.open(artifact_dir)
    manifest = artifact.manifest
    if any(t.name.endswith(".input_perm") for t in manifest.tensors):
        raise BadInputError(
            "this artifact was built from an act-order (desc_act) checkpoint: its layers gather their input "
            "in a stored order, which GGUF cannot express; rebuild it with --isq none to export it"
        )
    spec = manifest.model
    arch = GGUF_ARCHITECTURES.get(spec.architecture)
    if arch is None:
        raise BadInputError(f"GGUF export supports {', '.join(EXPORTABLE)} artifacts; this one is {spec.architecture}")
    _check_exportable(spec, arch)
    try:
        tokenizer_json = json.loads(artifact.read_verified(manifest.tokenizer.file))
    except (ValueError, RecursionError) as exc:
        raise BadArtifactError(f"the artifact's {manifest.tokenizer.file} is not usable JSON ({exc})") from exc
    tok = _tokenizer_fields(tokenizer_json, spec.vocab_size)
    partial = out.parent / f".{out.name}.llmc-export-{secrets.token_hex(4)}"
    try:
        _write_gguf(gguf, artifact, arch, tok, partial)
        _link_into_place(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def _link_into_place(partial: Path, out: Path) -> None:
    """Give the complete file its name, failing rather than replacing a file that appeared since."""
    try:
        os.link(partial, out)
    except FileExistsError as exc:
        raise BadInputError(f"{out} appeared while exporting; llmc export never overwrites a file") from exc
    except OSError:  # a filesystem without hard links: rename, after checking once more
        if out.exists() or out.is_symlink():
            raise BadInputError(f"{out} appeared while exporting; llmc export never overwrites a file") from None
        partial.rename(out)


def _write_gguf(gguf: Any, artifact: Artifact, arch: str, tok: dict[str, Any], path: Path) -> None:
    manifest = artifact.manifest
    spec = manifest.model
    # Each tensor goes to a scratch file beside the output as soon as it is made (the writer would
    # otherwise hold every tensor until the header is written); the file is anonymous (unlinked
    # at once), so nothing is left behind however the export ends.
    writer = gguf.GGUFWriter(str(path), arch, use_temp_file=True)
    # Not a `with`: the writer closes it once copied (write_tensors_to_file); on failure, garbage collection does.
    writer.temp_file = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES, mode="w+b", dir=str(path.parent))  # noqa: SIM115
    writer.add_name(manifest.model_name)
    _metadata(writer, gguf, spec, arch)
    _sampling_metadata(writer, effective(manifest.generation))
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
        writer.add_chat_template(artifact.read_verified(info.chat_template_file).decode("utf-8"))
    for name, data, fmt in _gguf_tensors(spec, arch, artifact.lazy_weights(), quant):
        array: np.ndarray = data.contiguous().numpy()
        if fmt is not None:
            qtype = gguf.GGMLQuantizationType(stored_format(fmt).ggml_type)
            writer.add_tensor(name, array, raw_shape=array.shape, raw_dtype=qtype)
            continue
        if half and data.dim() > 1:  # norms stay f32, as llama.cpp's converter writes them
            array = array.astype(np.float16)
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
