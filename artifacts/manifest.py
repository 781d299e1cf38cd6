"""manifest.json schema. Changing the meaning of a field bumps FORMAT_VERSION."""

from __future__ import annotations

import math
import re
from pathlib import PurePosixPath
from typing import Any

import msgspec

from llmc.errors import BadArtifactError

# Version of the on-disk layout. Readers refuse any other value: an old runtime cannot guess
# what a newer builder meant, and silently misreading weights is worse than refusing.
# 2: quantized tensors (TensorInfo.quant) and the build report; 3: ahead-of-time compiled steps;
# 5: llmc's own CPU kernel library, which compiled steps may call; 6: compiled steps and kernel
# libraries per device target (Manifest.targets), and the optional generation defaults; 7: one
# kernel library per instruction set (TargetCode.kernels is a list), a pre-quantized source
# (SourceInfo.quantization) and layers' `input_perm` tensors (act-order); 8: the ONNX target's
# graph (TargetCode.graph); 9: a float32 artifact may store its embedding and lm_head in float16 or
# bfloat16 (`dtype` is no longer the dtype of every unquantized tensor: each tensor's own says);
# 10: a compiled step is programs of consecutive decoder layers (CompiledStep.programs, .order),
# chained by the runtime between the embedding and the logits; 11: a compiled step may leave the
# logits to the runtime (neither `logits` nor a program computes them); 12: a shared first
# program may embed the token ids by a select (LayerProgram.embed_select); 13: a shared last
# program may compute the logits where a flag says (LayerProgram.logits_select)
FORMAT_VERSION = 13
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
    # GGML block format ("q4k", ...; see quant/formats.py) of a quantized tensor, else None.
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
    """Sampling defaults for requests that set none (artifacts/generation.py says where from).

    Every field has a default, so that a source or a hand-written manifest may leave one out.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = None  # None: the rest of the context
    origin: str | None = None  # e.g. "generation_config.json"; None: built before llmc recorded it


class SourceQuantization(msgspec.Struct, forbid_unknown_fields=True):
    """A pre-quantized source (GPTQ, AWQ, compressed-tensors) and how the artifact stores it."""

    # "gptq-v1" | "gptq-v2" | "awq-gemm" | "compressed-tensors-pack-quantized"
    source_format: str
    bits: int
    group_size: int  # -1: one group per output row (per-channel)
    act_order: bool  # input columns not in group order: layers carry an `input_perm` tensor
    # "ggml-legacy-blocks": repacked exactly into q4_0 / q4_1 / q8_0 (tensors[].quant says which);
    # "dequantized": `--isq none` stored the reference dequantization in the build's dtype.
    layout: str


class SourceInfo(msgspec.Struct, forbid_unknown_fields=True):
    kind: str  # "safetensors" | "gguf" | "hub"
    name: str  # what the user passed, as given
    files: list[FileInfo]  # the input files that determined the weights, with their hashes
    quantization: SourceQuantization | None = None  # set for a pre-quantized source


class BuildInfo(msgspec.Struct, forbid_unknown_fields=True):
    llmc_version: str
    source: SourceInfo
    flags: dict[str, Any]
    torch_version: str
    report_file: str | None = None  # per-tensor quantization report (build_report.json)


class Program(msgspec.Struct, forbid_unknown_fields=True):
    """One compiled program, an AOTInductor package of part of a step. The package holds code
    only: the runtime hands it the tensors of the part it computes, prepared as for eager
    execution, by the names of model/decode_step.py's modules, plus the few constants the compiler
    made itself (`constants`)."""

    package: str  # the .pt2 package, relative to the artifact root
    constants: str  # safetensors: the compiler-made constants, by the name the package asks for


class LayerProgram(Program, forbid_unknown_fields=True):
    """A program of `layers` consecutive decoder layers (DecodeLayers). Each run of layers it
    computes gets that run's own tensors, under the names of the run's first layer (`layers.0...`)."""

    layers: int  # how many consecutive decoder layers one call computes
    logits: bool = False  # it ends with the final norm and the logits (the last run's program only)
    embed: bool = False  # it starts from the token ids (the first run's program only)
    # It takes the token ids and a flag beside its input and starts from their embedding where the
    # flag is set: the first run's program where other runs share it (they pass the flag unset).
    embed_select: bool = False
    # It takes a flag after its input (and after the ids and flag of embed_select, where it has
    # those) and returns the float32 logits beside its output, computed where the flag is set: the
    # last run's program where other runs share it (they pass the flag unset and ignore that tensor).
    logits_select: bool = False


class CompiledStep(msgspec.Struct, forbid_unknown_fields=True):
    """A model step compiled ahead of time (torch.export + AOTInductor), see docs/artifact-format.md.

    The decoder layers run as compiled programs, each program serving every run of layers of its
    form (a model of 30 identical layers: one program of 5 layers called 6 times), and the final
    norm and the logits at the end of the last run's program where it serves no other run, else
    by its flag in the last run's call (`logits_select`), as one more program (`logits`) or
    eagerly (none of these); the embedding at the start of the first
    run's program (from the ids alone, or by a select where other runs share it), else eagerly.
    It runs only with the same
    torch version, on a CPU of its capability or a later one (capability_rank); elsewhere the
    runtime runs the model eagerly.
    """

    kind: str  # "decode": one new token per sequence over the paged KV cache
    programs: list[LayerProgram]
    # The program (an index into `programs`) computing each run of layers, from the first layer
    # on; their layers add up to the model's.
    order: list[int]
    buckets: list[int]  # batch sizes a batch is padded up to; the largest is the most it takes
    max_seq_len: int  # longest context (block table width * block_size) the step was traced for
    block_size: int  # KV cache block size the step was traced for
    torch_version: str  # torch that compiled it (e.g. "2.13.0")
    # The CPUs it runs on, by torch's capability name (torch.backends.cpu.get_cpu_capability()):
    # the build host's, or a baseline below it ("AVX2"); it runs wherever capability_rank allows.
    cpu_capability: str
    # Which prepared form of the quantized weights the package computes with: "packed" (the int4
    # kernels where a format has them) or "dense" (bf16 copies; for the buckets of many rows).
    weights: str = "packed"
    # Whether the package calls the target's kernel library (the CPU's VNNI matmul): it then runs
    # only where that library loads.
    cpu_kernels: bool = False
    # The final norm and the float32 logits (DecodeLogits), or None where the last run's program
    # ends with them (when no other run shares it) or the runtime computes them eagerly.
    logits: Program | None = None

    @property
    def eager_logits(self) -> bool:
        """Whether the runtime computes the final norm and the logits itself: neither `logits` nor
        the last run's program does."""
        last = self.programs[self.order[-1]]
        return self.logits is None and not last.logits and not last.logits_select

    def files(self) -> list[str]:
        """The artifact files of its programs: each package and its constants."""
        programs: list[Program] = [*self.programs, *([self.logits] if self.logits else [])]
        return [name for program in programs for name in (program.package, program.constants)]

    def runs(self) -> list[tuple[int, int, LayerProgram]]:
        """(first layer, layers, program) of each run of layers, in order."""
        runs, first = [], 0
        for index in self.order:
            program = self.programs[index]
            runs.append((first, program.layers, program))
            first += program.layers
        return runs


# torch's x86 CPU capabilities, least first: code for one runs on a CPU of any later one.
X86_CAPABILITY_ORDER = ("DEFAULT", "AVX2", "AVX512")


def capability_rank(needed: str, host: str) -> int | None:
    """How good a package for `needed` CPUs is on this `host` (higher: better), or None when the
    host cannot run it. Outside x86's ordered capabilities only an exact match runs."""
    if needed == host:
        return len(X86_CAPABILITY_ORDER)
    if needed in X86_CAPABILITY_ORDER and host in X86_CAPABILITY_ORDER:
        rank = X86_CAPABILITY_ORDER.index(needed)
        return rank if rank < X86_CAPABILITY_ORDER.index(host) else None
    return None


class KernelLibrary(msgspec.Struct, forbid_unknown_fields=True):
    """llmc's own kernels for one target, compiled where the artifact was built (for the CPU:
    kernels/cpu/cpu_kernels.py's C++ library of torch ops).

    A target carries one per instruction set; the runtime loads the best one the device runs
    where the torch version matches, and elsewhere runs without (torch's own kernels).
    """

    file: str  # the shared library, relative to the artifact root
    torch_version: str  # torch whose headers and libraries it was compiled against
    isa: str  # the instruction set it needs (cpu_kernels.ISA_NAMES, e.g. "avx2"; unknown ones are skipped)


class OnnxGraph(msgspec.Struct, forbid_unknown_fields=True):
    """The ONNX target's model (builder/onnx/graph.py, docs/artifact-format.md): a graph for
    onnxruntime and its weights as ONNX external data, which the graph names by `weights`' file
    name in the same folder; `mapping` says how each of the artifact's tensors was written."""

    model: str  # the .onnx graph, relative to the artifact root
    weights: str  # its external data
    mapping: str  # JSON: tensor name -> "q4_1: MatMulNBits 4-bit block 32 + group offsets", ...
    opset: int  # of the default ONNX domain (com.microsoft ops at version 1)
    accuracy_level: int  # MatMulNBits': 4 = int8 activations, 0 = float32


class TargetCode(msgspec.Struct, forbid_unknown_fields=True):
    """The device code an artifact carries for one target (`Manifest.targets`): what it was built
    for, its kernel library and its compiled steps. A target the runtime cannot use here is skipped
    (the model runs eagerly on torch's kernels), never half-used."""

    # The device capability the code was built on: for "cpu" torch's name of the build machine's
    # vector ISA (torch.backends.cpu.get_cpu_capability(), e.g. "AVX512"); a GPU architecture later.
    capability: str
    kernels: list[KernelLibrary] = []  # at most one per ISA
    compiled: list[CompiledStep] = []
    graph: OnnxGraph | None = None  # the "onnx" target's model


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
    # Device code by target name ("cpu"); an artifact without any runs eagerly everywhere.
    targets: dict[str, TargetCode] = {}

    def compiled_for(self, target: str) -> list[CompiledStep]:
        """The steps compiled for `target` ("cpu"); none where the artifact carries no code for it."""
        code = self.targets.get(target)
        return [] if code is None else code.compiled

    def kernels_for(self, target: str) -> list[KernelLibrary]:
        """llmc's kernel libraries for `target`, one per ISA; none where the artifact carries none."""
        code = self.targets.get(target)
        return [] if code is None else code.kernels


def encode(manifest: Manifest) -> bytes:
    """Canonical bytes: sorted keys and a trailing newline, so equal manifests are equal files."""
    raw = msgspec.json.encode(manifest, order="sorted")
    return msgspec.json.format(raw, indent=2) + b"\n"


# ---- validation: a manifest comes from strangers --------------------------------------------

# Longest context a manifest may claim: the runtime computes rope tables of this many positions at
# load, so an absurd value must fail here rather than exhaust memory. 16M tokens is above every
# released model's window (the largest, Llama 4 Scout, claims 10M).
MAX_POSITION_EMBEDDINGS = 1 << 24
# Bound on the model's dimensions (vocab, hidden, heads, layers, ...): their products size
# allocations before any tensor is read. 2^24 is 60x the largest vocabularies (256k) and hidden
# sizes (~16k) of released models.
MAX_DIMENSION = 1 << 24
# Bound on a head's width (head_dim, and MLA's per-head and latent widths): 16x the widest of
# released models (Gemma's 256 per head, DeepSeek's 1536-wide q latent is a rank, below). Rope
# tables and attention buffers are sized by it before any tensor could contradict it.
MAX_HEAD_DIM = 4096
_SHA256_HEX_CHARS = 64
_LAYER_TYPES = ("full_attention", "sliding_attention")
# The activations, norms and routers the model code has (model/layers.py ACTIVATIONS, model/moe.py).
HIDDEN_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh")
_NORMS = ("rms", "layer")
_ROUTERS = ("softmax", "group_softmax", "group_sigmoid")
# What each rope scaling type reads (model/rope.py): required numbers, and optional ones.
_ROPE_SCALING_NUMBERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "longrope": (("original_max_position_embeddings",), ("max_position_embeddings", "attention_factor")),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow"),
    ),
}
_STORED_DTYPES = ("F32", "F16", "BF16", "I8", "U8", "I32", "I64")
# A target is named like "cpu" or "cuda": a key the error messages and field names quote, so it is
# bounded (16 characters name every device torch knows).
_MAX_TARGET_NAME = 16
_TARGET_NAME = re.compile(rf"[a-z][a-z0-9_]{{0,{_MAX_TARGET_NAME - 1}}}")


def _bad(field: str, problem: str) -> BadArtifactError:
    return BadArtifactError(
        f"the artifact's manifest is inconsistent: {field} {problem}; rebuild the artifact with `llmc build`",
        param=field,
    )


def check_path(field: str, value: object) -> str:
    """A path the manifest names must stay inside the artifact: relative, '/'-separated, and free
    of '..', '.' and empty parts (so that its text alone decides where it points)."""
    if not isinstance(value, str) or not value:
        raise _bad(field, "is not a path")
    if value.startswith("/") or "\\" in value or "\0" in value or ":" in value.split("/")[0]:
        raise _bad(field, f"is {value!r}: artifact paths are relative to the artifact, '/'-separated")
    if any(part in ("", ".", "..") for part in value.split("/")):
        raise _bad(field, f"is {value!r}: artifact paths may not contain '..', '.' or empty parts")
    return value


def _check_files(manifest: Manifest) -> set[str]:
    listed: set[str] = set()
    for i, info in enumerate(manifest.files):
        path = check_path(f"files[{i}].path", info.path)
        if path in listed or path == MANIFEST_NAME:
            raise _bad(f"files[{i}].path", f"lists {path!r} twice (or the manifest itself)")
        listed.add(path)
        if info.size < 0:
            raise _bad(f"files[{i}].size", f"is {info.size}")
        if len(info.sha256) != _SHA256_HEX_CHARS or any(c not in "0123456789abcdef" for c in info.sha256):
            raise _bad(f"files[{i}].sha256", "is not a lowercase hex sha256")
    return listed


def opened_paths(manifest: Manifest) -> list[tuple[str, str]]:
    """Every path the runtime opens, with the manifest field that names it."""
    named = [("tokenizer.file", manifest.tokenizer.file)]
    if manifest.tokenizer.chat_template_file is not None:
        named.append(("tokenizer.chat_template_file", manifest.tokenizer.chat_template_file))
    named += [(f"tensors[{i}].file", t.file) for i, t in enumerate(manifest.tensors)]
    for target, code in manifest.targets.items():
        field = f"targets.{target}"
        for i, step in enumerate(code.compiled):
            for j, program in enumerate(step.programs):
                named += [(f"{field}.compiled[{i}].programs[{j}].package", program.package)]
                named += [(f"{field}.compiled[{i}].programs[{j}].constants", program.constants)]
            if step.logits is not None:
                named += [(f"{field}.compiled[{i}].logits.package", step.logits.package)]
                named += [(f"{field}.compiled[{i}].logits.constants", step.logits.constants)]
        named += [(f"{field}.kernels[{i}].file", library.file) for i, library in enumerate(code.kernels)]
        if code.graph is not None:
            named += [(f"{field}.graph.{part}", getattr(code.graph, part)) for part in ("model", "weights", "mapping")]
    if manifest.build.report_file is not None:
        named.append(("build.report_file", manifest.build.report_file))
    return named


def _positive(field: str, value: float, upper: float = MAX_DIMENSION) -> None:
    if not 0 < value <= upper:  # also false for NaN
        raise _bad(field, f"is {value}; it must be in 1..{upper}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def _check_rope_scaling(spec: ModelSpec) -> None:
    scaling = spec.rope_scaling
    if scaling is None:
        return
    kind = str(scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in _ROPE_SCALING_NUMBERS:
        raise _bad("model.rope_scaling", f"has type {kind!r}; llmc knows {', '.join(_ROPE_SCALING_NUMBERS)}")
    required, optional = _ROPE_SCALING_NUMBERS[kind]
    for key in required:
        if not _number(scaling.get(key)):
            raise _bad(f"model.rope_scaling.{key}", f"is {scaling.get(key)!r}; {kind} scaling needs a positive number")
    for key in optional:  # 0 reads as unset where model/rope.py uses `or` (mscale_all_dim: 0 in some configs)
        value = scaling.get(key)
        if value is not None and not ((value == 0 and not isinstance(value, bool)) or _number(value)):
            raise _bad(f"model.rope_scaling.{key}", f"is {value!r}; it must be a number of at least 0")
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            factors = scaling.get(key)
            if not isinstance(factors, list) or not 0 < len(factors) <= MAX_HEAD_DIM or not all(map(_number, factors)):
                raise _bad(f"model.rope_scaling.{key}", "must be a list of positive numbers, one per rotated pair")


def _check_model(spec: ModelSpec) -> None:
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
        _positive(f"model.{name}", getattr(spec, name))
    _positive("model.head_dim", spec.head_dim, MAX_HEAD_DIM)
    for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if not 0 <= getattr(spec, name) <= MAX_HEAD_DIM:
            raise _bad(f"model.{name}", f"is {getattr(spec, name)}; it must be in 0..{MAX_HEAD_DIM}")
    for name in ("q_lora_rank", "kv_lora_rank", "shared_expert_intermediate_size", "n_group", "topk_group"):
        if not 0 <= getattr(spec, name) <= MAX_DIMENSION:
            raise _bad(f"model.{name}", f"is {getattr(spec, name)}; it must be in 0..{MAX_DIMENSION}")
    for name, value, allowed in (
        ("hidden_act", spec.hidden_act, HIDDEN_ACTIVATIONS),
        ("norm", spec.norm, _NORMS),
        ("router", spec.router, _ROUTERS),
    ):
        if value not in allowed:
            raise _bad(f"model.{name}", f"is {value!r}; llmc has {', '.join(allowed)}")
    _check_rope_scaling(spec)
    _positive("model.max_position_embeddings", spec.max_position_embeddings, MAX_POSITION_EMBEDDINGS)
    for name in ("intermediate_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        if not 0 <= getattr(spec, name) <= MAX_DIMENSION:
            raise _bad(f"model.{name}", f"is {getattr(spec, name)}; it must be in 0..{MAX_DIMENSION}")
    if spec.num_heads % spec.num_kv_heads:
        raise _bad("model.num_kv_heads", f"({spec.num_kv_heads}) does not divide num_heads ({spec.num_heads})")
    if spec.num_experts_per_tok > spec.num_experts:
        raise _bad("model.num_experts_per_tok", f"({spec.num_experts_per_tok}) exceeds num_experts")
    if not 0 < spec.rms_norm_eps < 1:
        raise _bad("model.rms_norm_eps", f"is {spec.rms_norm_eps}; it must be in (0, 1)")
    # A rope base of 1 or less gives every rotary pair a frequency of at least 1 radian per token
    # (theta ** (-2i/d) >= 1): positions stop being told apart and the model emits garbage.
    # Released models use 1e4 to 1e7; > 1 is the bound below which rope is meaningless.
    for name in ("rope_theta", "rope_local_theta"):
        theta = getattr(spec, name)
        if theta is not None and not 1 < theta < math.inf:
            raise _bad(f"model.{name}", f"is {theta}; a rope base must be a finite number above 1")
    if not 0 < spec.partial_rotary_factor <= 1:
        raise _bad("model.partial_rotary_factor", f"is {spec.partial_rotary_factor}; it must be in (0, 1]")
    if spec.sliding_window is not None:
        _positive("model.sliding_window", spec.sliding_window, MAX_POSITION_EMBEDDINGS)
    if spec.layer_types is not None:
        if len(spec.layer_types) != spec.num_layers:
            raise _bad("model.layer_types", f"has {len(spec.layer_types)} entries for {spec.num_layers} layers")
        if any(kind not in _LAYER_TYPES for kind in spec.layer_types):
            raise _bad("model.layer_types", f"may only hold {', '.join(_LAYER_TYPES)}")
    if any(not 0 <= layer < spec.num_layers for layer in spec.moe_layers or []):
        raise _bad("model.moe_layers", f"names a layer outside 0..{spec.num_layers - 1}")


def _logical_shape(tensor: TensorInfo) -> list[int]:
    """The weight's shape as the model sees it ([rows, row_bytes] of blocks becomes [rows, cols])."""
    from llmc.quant.formats import stored_format

    if tensor.quant is None or len(tensor.shape) != 2:
        return tensor.shape
    return [tensor.shape[0], stored_format(tensor.quant).cols(tensor.shape[1])]


def _check_tensors(manifest: Manifest) -> None:
    """The model description against the tensors' shapes, for the fields that size everything."""
    spec = manifest.model
    shapes: dict[str, list[int]] = {}
    layers: set[int] = set()
    for i, tensor in enumerate(manifest.tensors):
        if tensor.dtype not in _STORED_DTYPES:
            raise _bad(f"tensors[{i}].dtype", f"is {tensor.dtype!r}, not one of {', '.join(_STORED_DTYPES)}")
        if not tensor.shape or any(not 0 <= dim <= MAX_DIMENSION**2 for dim in tensor.shape):
            raise _bad(f"tensors[{i}].shape", f"is {tensor.shape}")
        shapes[tensor.name] = _logical_shape(tensor)
        parts = tensor.name.split(".")
        if parts[:2] == ["model", "layers"] and len(parts) > 2 and parts[2].isdigit():
            layers.add(int(parts[2]))
    if layers != set(range(spec.num_layers)):
        raise _bad("model.num_layers", f"is {spec.num_layers}; the tensors hold {len(layers)} layers")

    def expect(name: str, shape: list[int], field: str) -> None:
        if name in shapes and shapes[name] != shape:
            raise _bad(field, f"disagrees with tensor {name}: it has shape {shapes[name]}, the model needs {shape}")

    expect("model.embed_tokens.weight", [spec.vocab_size, spec.hidden_size], "model.vocab_size or model.hidden_size")
    expect("lm_head.weight", [spec.vocab_size, spec.hidden_size], "model.vocab_size or model.hidden_size")
    if "model.embed_tokens.weight" not in shapes:
        raise _bad("tensors", "lacks model.embed_tokens.weight")
    if not spec.mla:
        for layer in range(spec.num_layers):
            attn = f"model.layers.{layer}.self_attn"
            expect(f"{attn}.q_proj.weight", [spec.num_heads * spec.head_dim, spec.hidden_size], "model.num_heads")
            expect(f"{attn}.k_proj.weight", [spec.num_kv_heads * spec.head_dim, spec.hidden_size], "model.num_kv_heads")
    for i, eos in enumerate(manifest.tokenizer.eos_token_ids):
        if not 0 <= eos < spec.vocab_size:
            raise _bad(f"tokenizer.eos_token_ids[{i}]", f"is {eos}, outside the vocabulary (0..{spec.vocab_size - 1})")


def _check_targets(manifest: Manifest) -> None:
    for target, code in manifest.targets.items():
        if not _TARGET_NAME.fullmatch(target):
            raise _bad(f"targets.{target[:_MAX_TARGET_NAME]!r}", "is not a target name (lowercase letters and digits)")
        for i, step in enumerate(code.compiled):
            field = f"targets.{target}.compiled[{i}]"
            if not step.buckets or step.buckets != sorted(set(step.buckets)) or step.buckets[0] < 1:
                raise _bad(f"{field}.buckets", f"is {step.buckets}; it must be increasing positive batch sizes")
            _positive(f"{field}.block_size", step.block_size, MAX_POSITION_EMBEDDINGS)
            _positive(f"{field}.max_seq_len", step.max_seq_len, MAX_POSITION_EMBEDDINGS)
            _check_order(field, step, manifest.model.num_layers)
        graph = code.graph
        if graph is not None and PurePosixPath(graph.weights).parent != PurePosixPath(graph.model).parent:
            raise _bad(f"targets.{target}.graph.weights", "must lie in the graph's folder, where the graph names it")
        isas = [library.isa for library in code.kernels]
        if len(set(isas)) != len(isas):
            raise _bad(f"targets.{target}.kernels", "lists an instruction set twice; each ISA has one library")


def _check_order(field: str, step: CompiledStep, num_layers: int) -> None:
    """The runs of a compiled step cover the model's layers exactly, with programs that exist."""
    if not step.programs or len(step.programs) > num_layers:
        raise _bad(
            f"{field}.programs",
            f"lists {len(step.programs)} programs; a model of {num_layers} layers has 1..{num_layers}",
        )
    for j, program in enumerate(step.programs):
        _positive(f"{field}.programs[{j}].layers", program.layers, num_layers)
    if len(step.order) > num_layers or any(not 0 <= index < len(step.programs) for index in step.order):
        raise _bad(f"{field}.order", f"must name at most {num_layers} programs, each by its index in `programs`")
    covered = sum(step.programs[index].layers for index in step.order)
    if covered != num_layers:
        raise _bad(f"{field}.order", f"runs {covered} layers; the model has {num_layers}")
    starting = [j for j, program in enumerate(step.programs) if program.embed]
    if starting and (starting != [step.order[0]] or step.order.count(step.order[0]) != 1):
        raise _bad(f"{field}.programs", "only the first run's program, used once, may start from the token ids")
    selecting = [j for j, program in enumerate(step.programs) if program.embed_select]
    if selecting and (selecting != [step.order[0]] or step.programs[selecting[0]].embed):
        raise _bad(f"{field}.programs", "only the first run's program may embed by a select, and not also from the ids")
    ending = [j for j, program in enumerate(step.programs) if program.logits]
    if ending and (ending != [step.order[-1]] or step.order.count(step.order[-1]) != 1):
        raise _bad(f"{field}.programs", "only the last run's program, used once, may end with the logits")
    if ending and step.logits is not None:
        raise _bad(f"{field}.logits", "the logits come either from `logits` or from the last run's own program")
    computing = [j for j, program in enumerate(step.programs) if program.logits_select]
    if computing and (computing != [step.order[-1]] or step.programs[computing[0]].logits or step.logits is not None):
        raise _bad(
            f"{field}.programs",
            "only the last run's program may compute the logits by a flag, "
            "and not also end with them or beside `logits`",
        )


def validate(manifest: Manifest) -> None:
    """Refuse a manifest that points outside the artifact, names files without checksums, or
    describes a model its tensors contradict; BadArtifactError naming the field (exit code 4)."""
    listed = _check_files(manifest)
    _check_targets(manifest)  # first: the paths' field names below quote the target names
    for field, path in opened_paths(manifest):
        check_path(field, path)
        if path not in listed:
            raise _bad(field, f"names {path!r}, which `files` does not list with a size and sha256")
    _check_model(manifest.model)
    from llmc.artifacts.generation import check as check_generation  # it imports this module

    check_generation(manifest.generation)
    _check_tensors(manifest)
