"""manifest.json schema. Changing the meaning of a field bumps FORMAT_VERSION."""

from __future__ import annotations

from typing import Any

import msgspec

# Version of the on-disk layout. Readers refuse any other value: an old runtime cannot guess
# what a newer builder meant, and silently misreading weights is worse than refusing.
# 2: quantized tensors (TensorInfo.quant) and the build report; 3: ahead-of-time compiled steps;
# 5: llmc's own CPU kernel library (Manifest.cpu_kernels), which compiled steps may call
FORMAT_VERSION = 5
MANIFEST_NAME = "manifest.json"


class ModelSpec(msgspec.Struct, forbid_unknown_fields=True):
    """Architecture hyperparameters, normalised from whatever the source called them.

    One generic decoder covers every family; each field below switches on one small difference
    (the defaults are plain Llama).
    """

    architecture: str  # the source family, e.g. "llama", "qwen3", "gemma2" (for reports and checks)
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
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head's q and k before rope (Qwen3, Gemma-3)
    norm: str = "rms"  # "rms", or "layer" (LayerNorm with bias: StableLM)
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    sandwich_norm: bool = False  # extra norms on the attention and MLP outputs (Gemma-2/3, GLM-4)
    partial_rotary_factor: float = 1.0  # share of head_dim that is rotated (StableLM, GLM-4)
    rope_interleaved: bool = False  # rotate (even, odd) pairs instead of halves (GLM-4)
    embed_scale: float = 1.0  # multiply embeddings (Gemma: sqrt(hidden_size))
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # tanh soft-capping of attention scores (Gemma-2)
    final_softcap: float | None = None  # tanh soft-capping of the logits (Gemma-2)
    sliding_window: int | None = None  # keys a query may see on sliding layers, itself included
    layer_types: list[str] | None = None  # per layer "full_attention" | "sliding_attention"
    rope_local_theta: float | None = None  # rope base on sliding layers, if different (Gemma-3)
    # Mixture of experts (Qwen2-MoE, Qwen3-MoE): 0 experts means a dense MLP everywhere.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0  # a gated always-on expert beside the routed ones
    moe_layers: list[int] | None = None  # which layers route to experts (the others are dense)
    shared_expert_gated: bool = True  # Qwen2-MoE gates its shared expert; DeepSeek adds it as is
    router: str = "softmax"  # "softmax" | "group_softmax" (DeepSeek-V2) | "group_sigmoid" (DeepSeek-V3)
    n_group: int = 1  # expert groups for group-limited routing
    topk_group: int = 1  # groups a token may route into
    routed_scaling_factor: float = 1.0
    # Multi-head latent attention (DeepSeek-V2/V3); head_dim is then qk_nope + qk_rope.
    mla: bool = False
    q_lora_rank: int = 0  # 0: a plain q_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0


class TensorInfo(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    dtype: str  # as stored: U8 for quantized tensors
    shape: list[int]  # as stored: [rows, row_bytes] for quantized tensors
    file: str
    # GGML block format ("q4k", ...; see kernels/quant_formats.py) of a quantized tensor, else None.
    quant: str | None = None


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
    report_file: str | None = None  # per-tensor quantization report (build_report.json)


class CompiledStep(msgspec.Struct, forbid_unknown_fields=True):
    """A model step compiled ahead of time (torch.export + AOTInductor), see docs/artifact-format.md.

    The package holds code only; its weights are the artifact's tensors, prepared by the runtime
    as for eager execution and handed to the package at load, plus the few constants the compiler
    made itself (`constants`). It runs only where it was built for: the same torch version and
    CPU capability; elsewhere the runtime runs the model eagerly.
    """

    kind: str  # "decode": one new token per sequence over the paged KV cache
    target: str  # "cpu"
    package: str  # the .pt2 package, relative to the artifact root
    constants: str  # safetensors: the compiler-made constants, by the name the package asks for
    buckets: list[int]  # batch sizes a batch is padded up to; the largest is the most it takes
    max_seq_len: int  # longest context (block table width * block_size) the step was traced for
    block_size: int  # KV cache block size the step was traced for
    torch_version: str  # torch that compiled it (e.g. "2.13.0")
    cpu_capability: str  # torch.backends.cpu.get_cpu_capability() where it was compiled
    # Which prepared form of the quantized weights the package computes with: "packed" (the int4
    # kernels where a format has them) or "dense" (bf16 copies; for the buckets of many rows).
    weights: str = "packed"
    # Whether the package calls the artifact's CPU kernel library (its VNNI matmul): it then runs
    # only where that library loads.
    cpu_kernels: bool = False


class CpuKernels(msgspec.Struct, forbid_unknown_fields=True):
    """llmc's own C++ CPU kernels (kernels/cpu_kernels.py), compiled where the artifact was built.

    A shared library of torch ops: the runtime loads it where the torch version matches and the
    CPU has the instruction set; elsewhere it runs without it (torch's own kernels).
    """

    file: str  # the shared library, relative to the artifact root
    torch_version: str  # torch whose headers and libraries it was compiled against
    isa: str  # the instruction set it needs ("avx512_vnni")


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
    compiled: list[CompiledStep] = []
    cpu_kernels: CpuKernels | None = None


def encode(manifest: Manifest) -> bytes:
    """Canonical bytes: sorted keys and a trailing newline, so equal manifests are equal files."""
    raw = msgspec.json.encode(manifest, order="sorted")
    return msgspec.json.format(raw, indent=2) + b"\n"
