"""A GGUF file as a model source: metadata → HF-style config, blocks dequantized, Q/K un-permuted.

Each llama.cpp architecture llmc runs maps back onto its Hugging Face family: tensors get the HF
names `builder/arch.py` already knows (fused ones, like Phi-3's `attn_qkv`, stay fused and are
split there), and llama.cpp's conventions are undone where they differ from HF's: the llama
arch's interleaved Q/K rows, Gemma's norms stored as (1 + w), stacked experts split in gate and up,
DeepSeek's kv_b_proj split per head into attn_k_b / attn_v_b, and Llama-3 rope scaling stored as
per-pair frequency divisors (`rope_freqs`), read back as the llama3 parameters that give them.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmc.builder.gguf_names import (
    EXPERTS_GATE_UP,
    GEMMA_ARCHITECTURES,
    GEMMA_NORM_OFFSET,
    GLOBAL_NAMES,
    HF_ARCHITECTURES,
    JOINED_EXPERTS,
    KV_B_PROJ,
    MOE_ARCHITECTURES,
    PERMUTED_QK_ARCHITECTURES,
    ROPE_FACTORS,
    ROPE_FREQS,
    ROW_VECTORS,
    SPLIT_KV_B,
    STACKED_EXPERT_ARCHITECTURES,
    SUPPORTED_GGUF_ARCHITECTURES,
    layer_names,
)
from llmc.builder.gguf_tokenizer import read_gguf_fields, tokenizer_from_gguf
from llmc.builder.sources.base import ModelSource, TensorMeta, TokenizerBundle
from llmc.errors import BadModelError
from llmc.quant.formats import BY_GGML_TYPE

# The divisors are float32, and llama.cpp's converter computes them in float32 arithmetic: llama3
# parameters read back from them must reproduce every divisor to this relative tolerance.
ROPE_FREQS_RTOL = 1e-5
# Llama-3's low_freq_factor, assumed when a file does not say the original context (llama.cpp's
# converter never does): the divisors fix only the ratios of the three llama3 parameters.
LLAMA3_LOW_FREQ_FACTOR = 1.0
# llama.cpp's deepseek2 stores YaRN's mscale_all_dim times this as `rope.scaling.yarn_log_multiplier`.
YARN_LOG_MULTIPLIER_SCALE = 0.1
# gguf's ExpertGatingFuncType.SIGMOID: DeepSeek-V3's router.
EXPERT_GATING_SIGMOID = 2
# Significant digits tried, fewest first, when reading llama3 parameters back as decimals.
MAX_DECIMAL_DIGITS = 17
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

# Bounds on metadata values used to size or loop (far above any real model).
MAX_LAYERS = 4096
MAX_WIDTH = 1 << 20  # hidden / feed-forward / head sizes, vocabulary
MAX_HEADS = 4096
MAX_EXPERTS = 4096
MAX_CONTEXT = 1 << 26


def _unpermute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved rope pairs → HF's rotate-half halves)."""
    # llama.cpp's converter reshaped rows as (head, 2, half) and swapped the last two; undo that.
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class GgufSource(ModelSource):
    def __init__(self, path: Path, name: str) -> None:
        from llmc.builder.gguf_reader import FastGGUFReader  # gguf: the builder's dependency, not the runtime's

        try:
            self._reader = FastGGUFReader(str(path), "r")
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
            elif tensor.name == ROPE_FREQS and arch == "llama":
                extra[ROPE_FREQS] = tensor
            elif match and local in locals_:
                parts.setdefault(f"model.layers.{match.group(1)}.{locals_[local]}", {})[0] = tensor
            elif match and local in JOINED_EXPERTS and arch in STACKED_EXPERT_ARCHITECTURES:
                parts.setdefault(f"model.layers.{match.group(1)}.{EXPERTS_GATE_UP}", {})[JOINED_EXPERTS[local]] = tensor
            elif match and local in SPLIT_KV_B and arch == "deepseek2":
                parts.setdefault(f"model.layers.{match.group(1)}.{KV_B_PROJ}", {})[SPLIT_KV_B[local]] = tensor
            else:
                raise BadModelError(f"GGUF tensor {tensor.name!r} is not part of the {arch} layout llmc knows")
        for hf, found in parts.items():
            joined = hf.endswith(EXPERTS_GATE_UP) or (hf.endswith(KV_B_PROJ) and len(found) > 1)
            if sorted(found) != list(range(len(found))) or (joined and len(found) != 2):
                raise BadModelError(
                    f"GGUF tensors for {hf} are incomplete (need both ffn_gate_exps and ffn_up_exps, "
                    "or both attn_k_b and attn_v_b)"
                )
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
        super().__init__("gguf", name, config, bundle, _sampling_from_fields(fields), [path])
        self._n_head = config["num_attention_heads"]
        self._n_kv_head = config["num_key_value_heads"]

    def tensors(self) -> dict[str, TensorMeta]:
        out = {}
        for name, parts in self._parts.items():
            shapes = [[int(d) for d in reversed(p.shape.tolist())] for p in parts]
            shape = shapes[0]
            if name.endswith(KV_B_PROJ) and len(parts) > 1:
                (heads, rank, nope), (_, v_dim, _) = shapes
                shape = [heads * (nope + v_dim), rank]
            elif len(parts) > 1:
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
        rows = torch.from_numpy(np.array(self._parts[name][0].data, dtype=np.uint8))
        self._release()
        return self._unpermute_qk(name, rows)

    def _release(self) -> None:
        """Drop the file's pages just read from this process's memory (the page cache keeps them):
        a mapped page read once stays resident until unmapped, so without this a build's RSS would
        grow to the whole GGUF file as it streams through it. The tensor was copied out already."""
        mapping = getattr(self._reader.data, "_mmap", None)  # numpy.memmap's mmap.mmap
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError, ValueError):
                mapping.madvise(mmap.MADV_DONTNEED)

    def _unpermute_qk(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        if self._arch not in PERMUTED_QK_ARCHITECTURES:
            return rows
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            return _unpermute(rows, self._n_head)
        if name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
            return _unpermute(rows, self._n_kv_head)
        return rows

    def load(self, name: str) -> torch.Tensor:
        parts = [_dequantize(t) for t in self._parts[name]]
        self._release()
        if name.endswith(KV_B_PROJ) and len(parts) > 1:
            return _join_kv_b(*parts)
        tensor = torch.cat(parts, dim=-2 if len(parts) > 1 else 0)
        if name.endswith(ROW_VECTORS) and tensor.dim() == 1:
            tensor = tensor.unsqueeze(0)
        if self._arch in GEMMA_ARCHITECTURES and name.endswith("norm.weight"):
            # Exact: (1 + w) - 1 in float32 gives back a w' with 1 + w' == 1 + w, all the runtime computes.
            tensor = tensor - GEMMA_NORM_OFFSET
        return self._unpermute_qk(name, tensor)


def _join_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """attn_k_b [heads, rank, nope] and attn_v_b [heads, v, rank] → kv_b_proj [heads * (nope + v), rank]."""
    heads, rank, _ = k_b.shape
    if v_b.dim() != 3 or v_b.shape[0] != heads or v_b.shape[2] != rank:
        raise BadModelError(f"GGUF attn_k_b {list(k_b.shape)} and attn_v_b {list(v_b.shape)} do not fit together")
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, rank).contiguous()


def split_kv_b(kv_b: torch.Tensor, heads: int, nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj → (attn_k_b, attn_v_b) as llama.cpp's converter writes them; inverse of _join_kv_b."""
    per_head = kv_b.reshape(heads, -1, kv_b.shape[-1])
    return per_head[:, :nope].transpose(1, 2).contiguous(), per_head[:, nope:].contiguous()


def _dequantize(tensor: Any) -> torch.Tensor:
    import gguf

    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = [int(d) for d in reversed(tensor.shape.tolist())]
    # np.array copies: F32 tensors come back as read-only views of the memory-mapped file.
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)


# llama.cpp's `general.sampling.*` metadata (written by recent converters and `llmc export`) under
# the generation_config.json names the builder reads (artifacts/generation.py validates them).
_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def _sampling_from_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The GGUF's sampling defaults as a generation config ({} where it carries none)."""
    out: dict[str, Any] = {}
    for key, name in _SAMPLING_KEYS.items():
        value = fields.get(key)
        if isinstance(value, float):
            out[name] = _decimal(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            out[name] = value
    return out


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
    if arch == "deepseek2":
        _deepseek2(fields, config, rope_dim)
    return config


def _rope_scaling(
    arch: str, fields: dict[str, Any], config: dict[str, Any], extra: dict[str, Any], rope_dim: int
) -> None:
    scaling_type = fields.get(f"{arch}.rope.scaling.type")
    original = fields.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        original = _bounded(f"{arch}.rope.scaling.original_context_length", original, MAX_CONTEXT)
    if scaling_type == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": _decimal(fields[f"{arch}.rope.scaling.factor"])}
    elif ROPE_FREQS in extra:
        tensor = extra[ROPE_FREQS]
        if int(np.prod(tensor.shape.tolist())) != rope_dim // 2:
            raise BadModelError(f"GGUF {ROPE_FREQS} has {tensor.shape.tolist()} values, rope needs {rope_dim // 2}")
        factors = _dequantize(tensor).flatten().tolist()
        scaling = llama3_scaling_from_factors(factors, config["rope_theta"], rope_dim, original)
        if scaling is None:
            raise BadModelError(
                f"GGUF {ROPE_FREQS} is not Llama-3 rope scaling; other per-pair factors are not supported"
            )
        config["rope_scaling"] = scaling
    elif scaling_type == "yarn" and arch == "deepseek2":
        config["rope_scaling"] = _yarn(arch, fields, original)
    elif extra and set(extra) == set(ROPE_FACTORS.values()):  # Phi-3's longrope
        rope: dict[str, Any] = {"rope_type": "longrope", "rope_theta": config["rope_theta"]}
        for key, tensor in extra.items():
            if int(np.prod(tensor.shape.tolist())) != rope_dim // 2:
                raise BadModelError(f"GGUF {key} tensor has {tensor.shape.tolist()} values, rope needs {rope_dim // 2}")
            rope[key] = _dequantize(tensor).flatten().tolist()
        original = _bounded(f"{arch}.rope.scaling.original_context_length", original, MAX_CONTEXT)
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


def _yarn(arch: str, fields: dict[str, Any], original: int | None) -> dict[str, Any]:
    """YaRN as llama.cpp's deepseek2 reads it: the log multiplier is 0.1 * mscale_all_dim, and
    mscale, which has no key, is taken equal to mscale_all_dim (as in DeepSeek's configs)."""
    if original is None:
        raise BadModelError(f"GGUF YaRN rope scaling needs {arch}.rope.scaling.original_context_length")
    scaling: dict[str, Any] = {
        "rope_type": "yarn",
        "factor": _decimal(fields[f"{arch}.rope.scaling.factor"]),
        "original_max_position_embeddings": original,
    }
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if (value := fields.get(f"{arch}.rope.scaling.{key}")) is not None:
            scaling[name] = _decimal(value)
    log_multiplier = fields.get(f"{arch}.rope.scaling.yarn_log_multiplier")
    if log_multiplier is not None:
        # Divided in float32, as llama.cpp does, so 0.1 * m written in float32 reads back as m.
        mscale_all_dim = _decimal(np.float32(log_multiplier) / np.float32(YARN_LOG_MULTIPLIER_SCALE))
        scaling["mscale_all_dim"] = scaling["mscale"] = mscale_all_dim
    return scaling


def llama3_rope_factors(dim: int, theta: float, scaling: dict[str, Any]) -> np.ndarray:
    """The per-pair frequency divisors llama.cpp applies for Llama-3 rope scaling (its
    `rope_freqs` tensor): 1 for short wavelengths, `factor` for long ones, a blend between."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, blended))
    return factors.astype(np.float32)


def llama3_scaling_from_factors(
    factors: list[float], theta: float, dim: int, original: int | None
) -> dict[str, Any] | None:
    """The llama3 rope parameters that give these divisors, as short decimals, or None if none do.

    In the blended band 1/divisor is linear in the frequency, which fixes factor and two ratios of
    (original context, low, high); the third comes from `original` or, when the file does not say,
    from Llama-3's low_freq_factor of 1 (any choice gives the same rope).
    """
    f = np.asarray(factors, dtype=np.float64)
    if f.size != dim // 2 or not np.all(np.isfinite(f)) or f.min() <= 0:
        return None
    factor = _decimal(f.max())
    blended = (f > 1 + ROPE_FREQS_RTOL) & (f < factor * (1 - ROPE_FREQS_RTOL))
    if factor <= 1 or blended.sum() < 2:
        return None
    inverse_wavelen = theta ** -(np.arange(0, dim, 2, dtype=np.float64) / dim) / (2 * math.pi)
    smooth = (1 / f[blended] - 1 / factor) / (1 - 1 / factor)
    # smooth = (old / wavelen - low) / (high - low) = slope / wavelen - offset
    slope, intercept = np.polyfit(inverse_wavelen[blended], smooth, 1)
    offset = -intercept
    if slope <= 0 or offset <= 0:
        return None
    old = original if original is not None else round(LLAMA3_LOW_FREQ_FACTOR * slope / offset)
    span = old / slope  # high - low
    low, high = offset * span, offset * span + span
    for digits in range(1, MAX_DECIMAL_DIGITS + 1):
        scaling = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": float(f"{low:.{digits}g}"),
            "high_freq_factor": float(f"{high:.{digits}g}"),
            "original_max_position_embeddings": old,
        }
        if np.allclose(llama3_rope_factors(dim, theta, scaling), f, rtol=ROPE_FREQS_RTOL, atol=0):
            return scaling
    return None


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


def _deepseek2(fields: dict[str, Any], config: dict[str, Any], rope_dim: int) -> None:
    """Latent attention and grouped routing, from llama.cpp's deepseek2 keys.

    llama.cpp runs latent attention as one shared key/value head (key_length = kv_lora_rank +
    rope dim); the per-head sizes are the `_mla` keys (older files: key_length itself). A sigmoid
    router is DeepSeek-V3's (correction bias, groups ranked by their two best experts); a softmax
    one is V2's, group-limited when the file has several expert groups.
    """
    arch = "deepseek2"

    def count(key: str, limit: int, default: Any = None, minimum: int = 1) -> int:
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise BadModelError(f"GGUF metadata key {arch}.{key} is missing")
        return _bounded(f"{arch}.{key}", value, limit, minimum)

    key_length = count("attention.key_length_mla", MAX_WIDTH, fields.get(f"{arch}.attention.key_length"))
    if key_length <= rope_dim:
        raise BadModelError(f"GGUF {arch} key length {key_length} leaves no room beside the rope dimension {rope_dim}")
    sigmoid = fields.get(f"{arch}.expert_gating_func") == EXPERT_GATING_SIGMOID
    n_group = count("expert_group_count", MAX_EXPERTS, 1)
    config.pop("partial_rotary_factor", None)  # the rope dimension is qk_rope_head_dim
    config.update(
        architectures=["DeepseekV3ForCausalLM" if sigmoid else "DeepseekV2ForCausalLM"],
        head_dim=key_length,
        num_key_value_heads=config["num_attention_heads"],
        q_lora_rank=count("attention.q_lora_rank", MAX_WIDTH, 0, minimum=0) or None,
        kv_lora_rank=count("attention.kv_lora_rank", MAX_WIDTH),
        qk_nope_head_dim=key_length - rope_dim,
        qk_rope_head_dim=rope_dim,
        v_head_dim=count("attention.value_length_mla", MAX_WIDTH, fields.get(f"{arch}.attention.value_length")),
        rope_interleave=True,  # llama.cpp's deepseek2 rotates adjacent pairs, as DeepSeek's checkpoints do
        n_routed_experts=(experts := count("expert_count", MAX_EXPERTS)),
        num_experts_per_tok=count("expert_used_count", experts),
        moe_intermediate_size=count("expert_feed_forward_length", MAX_WIDTH),
        n_shared_experts=count("expert_shared_count", MAX_EXPERTS, 0, minimum=0),
        first_k_dense_replace=count("leading_dense_block_count", config["num_hidden_layers"], 0, minimum=0),
        moe_layer_freq=1,
        norm_topk_prob=bool(fields.get(f"{arch}.expert_weights_norm", False)),
        routed_scaling_factor=_decimal(fields.get(f"{arch}.expert_weights_scale", 1.0)),
        n_group=n_group,
        topk_group=count("expert_group_used_count", n_group, 1),
        topk_method="noaux_tc" if sigmoid else "group_limited_greedy" if n_group > 1 else "greedy",
    )


def _moe(arch: str, fields: dict[str, Any], config: dict[str, Any], layers: int, parts: dict[str, list[Any]]) -> None:
    def count(key: str, limit: int, default: Any = None) -> int:
        return _bounded(f"{arch}.{key}", fields.get(f"{arch}.{key}", default), limit, 0)

    config["num_experts"] = count("expert_count", MAX_EXPERTS)
    config["num_experts_per_tok"] = count("expert_used_count", config["num_experts"])
    config["moe_intermediate_size"] = count("expert_feed_forward_length", MAX_WIDTH)
    config["shared_expert_intermediate_size"] = count("expert_shared_feed_forward_length", MAX_WIDTH, 0)
    config["norm_topk_prob"] = bool(fields.get(f"{arch}.expert_weights_norm", arch == "qwen3moe"))
    config["mlp_only_layers"] = [i for i in range(layers) if f"model.layers.{i}.mlp.gate.weight" not in parts]
