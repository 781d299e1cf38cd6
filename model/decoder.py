"""The generic decoder: one definition, used by the builder to check shapes and by the runtime to run.

Tensor names follow Hugging Face's Llama layout (`model.layers.N.self_attn.q_proj.weight`, ...);
the builder maps every source and family onto these names. What differs between families is a
field of ModelSpec that switches on a small piece here, never a copied model file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from llmc.artifacts.manifest import ModelSpec
from llmc.errors import BadArtifactError
from llmc.kernels.casts import cast
from llmc.kernels.paged_attention import PagedAttention
from llmc.model.attention import Attention, LatentAttention, StepContext
from llmc.model.half_linear import HalfMatmulFactory, WidenedLinear, narrower_than
from llmc.model.layers import MLP, make_norm
from llmc.model.moe import MoE
from llmc.model.quant_linear import FusedQuantLinear, MatmulFactory, QuantEmbedding, QuantLinear
from llmc.model.rope import RotaryEmbedding

SUPPORTED_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "stablelm",
    "gemma2",
    "gemma3",
    "glm4",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
)
SLIDING = "sliding_attention"
# The artifact's `dtype` field → the compute dtype of activations and the KV cache.
COMPUTE_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class DeviceKernels:
    """How a device computes the model, chosen by its backend (runtime/backends/) or the builder's
    target: its quantized matmul (also where dense copies or kernel layouts are made), whether
    q/k/v and gate/up run as one matmul over stacked rows, its attention, and its matmul over an
    lm_head stored in 16 bits under a float32 compute dtype (model/half_linear.py), and what it
    does to the model's norms (e.g. compute them with one op of its own: kernels/cpu/rms_norm.py)."""

    matmul: MatmulFactory
    fuse_projections: bool = True
    half_matmul: HalfMatmulFactory = WidenedLinear
    attention: PagedAttention = field(default_factory=PagedAttention)
    prepare_norms: Callable[[nn.Module], object] | None = None


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, rope: RotaryEmbedding, sliding: bool, moe: bool) -> None:
        super().__init__()
        self.input_layernorm = make_norm(spec, spec.hidden_size)
        self.self_attn: nn.Module = LatentAttention(spec, rope) if spec.mla else Attention(spec, rope, sliding)
        self.post_attention_layernorm = make_norm(spec, spec.hidden_size)  # the norm before the MLP
        self.mlp: nn.Module = MoE(spec) if moe else MLP(spec)
        self.post_self_attn_layernorm = make_norm(spec, spec.hidden_size) if spec.sandwich_norm else None
        self.post_mlp_layernorm = make_norm(spec, spec.hidden_size) if spec.sandwich_norm else None

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], ctx: StepContext
    ) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), positions, kv, ctx)
        if self.post_self_attn_layernorm is not None:
            h = self.post_self_attn_layernorm(h)
        x = x + h
        h = self.mlp(self.post_attention_layernorm(x))
        if self.post_mlp_layernorm is not None:
            h = self.post_mlp_layernorm(h)
        return x + h


def _ropes(spec: ModelSpec, max_positions: int) -> tuple[RotaryEmbedding, RotaryEmbedding]:
    """(rope of full-attention layers, rope of sliding layers): one table each, shared by layers."""
    rotated = spec.qk_rope_head_dim if spec.mla else spec.head_dim  # MLA rotates its rope channels only
    full = RotaryEmbedding(
        rotated,
        max_positions,
        spec.rope_theta,
        spec.rope_scaling,
        spec.partial_rotary_factor,
        spec.rope_interleaved,
    )
    if spec.rope_local_theta is None:
        return full, full
    local = RotaryEmbedding(
        spec.head_dim, max_positions, spec.rope_local_theta, None, spec.partial_rotary_factor, spec.rope_interleaved
    )
    return full, local


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec, max_positions: int) -> None:
        super().__init__()
        # An initial weight skips Embedding's normal_() init: the weights come from the artifact,
        # and normal_ on the meta device imports torch's decompositions (~1 s of every cold start).
        table = torch.empty(spec.vocab_size, spec.hidden_size)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, _weight=table)
        # The rope tables are computed, not loaded: made for real on the CPU even while the module
        # is built on the meta device (a meta computation would also import the decompositions).
        with torch.device("cpu"):
            full, local = _ropes(spec, max_positions)
        types = spec.layer_types or ["full_attention"] * spec.num_layers
        moe = set(spec.moe_layers or [])
        self.layers = nn.ModuleList(
            DecoderLayer(spec, local if kind == SLIDING else full, kind == SLIDING, i in moe)
            for i, kind in enumerate(types)
        )
        self.norm = make_norm(spec, spec.hidden_size)


class CausalLM(nn.Module):
    """forward() runs one step over a flattened batch; compute_logits() projects chosen rows."""

    def __init__(self, spec: ModelSpec, max_positions: int) -> None:
        super().__init__()
        if spec.architecture not in SUPPORTED_ARCHITECTURES:
            raise BadArtifactError(
                f"architecture {spec.architecture!r} is not supported by this runtime; supported: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        self.spec = spec
        self.max_positions = max_positions  # the rope tables' rows: the positions it can run
        self.dtype = torch.float32  # the compute dtype: activations and KV cache (build_model sets it)
        self.attention: PagedAttention = PagedAttention()  # the device's (build_model sets it)
        self.model = Backbone(spec, max_positions)
        self.lm_head: nn.Module = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Phi-3's longrope switches factors once a sequence is longer than this.
        scaling = spec.rope_scaling or {}
        self.long_rope_after: int | None = (
            int(scaling["original_max_position_embeddings"]) if scaling.get("rope_type") == "longrope" else None
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        ctx: StepContext,
    ) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer, kv in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, positions, kv, ctx)
        return self.model.norm(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The first layer's input: the tokens' embeddings in the compute dtype."""
        x = cast(self.model.embed_tokens(input_ids), self.dtype)  # a 16-bit table under float32 (half_linear.py)
        if self.spec.embed_scale != 1.0:
            x = x * torch.tensor(self.spec.embed_scale, dtype=x.dtype)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_logits(self.lm_head, hidden, self.spec.final_softcap)


def head_logits(lm_head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Float32 logits of the final hidden states, soft-capped where the family does (Gemma-2)."""
    logits = cast(lm_head(hidden), torch.float32)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def build_model(
    spec: ModelSpec,
    weights: dict[str, torch.Tensor],
    max_positions: int,
    quant: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
    kernels: DeviceKernels | None = None,
) -> CausalLM:
    """Instantiate on the meta device, then adopt `weights` (memory-mapped) without copying them.

    `quant` names the tensors stored as GGML blocks and their format: their layers become
    QuantLinear / QuantEmbedding. `dtype` is the artifact's compute dtype (the KV cache's too).
    `kernels`: the device's; quantized layers are prepared with its matmul (without it they are
    left unprepared: enough for shape checks, not to run).
    """
    quant = quant or {}
    with torch.device("meta"):
        model = CausalLM(spec, max_positions)
        for name, fmt in quant.items():
            _quantize_module(model, name, fmt, dtype)
        for name in weights:
            if name.endswith(".input_perm"):
                _expect_input_perm(model, name)
        _tie(model, dtype)
    model.dtype = dtype
    expected = {name for name, _ in model.named_parameters(remove_duplicate=True)}
    given = set(weights) - ({"lm_head.weight"} if spec.tie_word_embeddings else set())
    if expected != given:
        missing, extra = sorted(expected - given), sorted(given - expected)
        raise BadArtifactError(
            f"artifact tensors do not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    params = dict(model.named_parameters(remove_duplicate=True))
    for name in sorted(expected):  # the manifest's model description against the tensors themselves
        if weights[name].shape != params[name].shape:
            raise BadArtifactError(
                f"artifact tensor {name} has shape {list(weights[name].shape)}, the manifest's model description "
                f"implies {list(params[name].shape)}: the manifest is inconsistent; rebuild the artifact"
            )
    model.load_state_dict({k: weights[k] for k in expected}, strict=False, assign=True)
    _tie(model, dtype)
    model.requires_grad_(False)
    if kernels is not None:
        model.attention = kernels.attention
        fused = fuse_projections(model, kernels.matmul) if kernels.fuse_projections else set()
        for module in model.modules():
            if isinstance(module, QuantLinear) and module not in fused:
                module.prepare(kernels.matmul)
        _prepare_float_head(model, kernels.half_matmul)
        if kernels.prepare_norms is not None:
            kernels.prepare_norms(model)
    return model.eval()


def _prepare_float_head(model: CausalLM, half_matmul: HalfMatmulFactory) -> None:
    """A float lm_head stored in another dtype than the compute dtype: the device's matmul over its
    16-bit values where it is narrower (model/half_linear.py), else converted once at load."""
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.weight.dtype == model.dtype:
        return
    factory = half_matmul if narrower_than(head.weight, model.dtype) else WidenedLinear
    model.lm_head = factory(head.weight, model.dtype)


def fuse_projections(model: CausalLM, matmul: MatmulFactory) -> set[nn.Module]:
    """Run each attention's q/k/v and each MLP's gate/up as one quantized matmul where they share a
    format (FusedQuantLinear). Returns the layers fused, which need no prepared form of their own."""
    fused: set[nn.Module] = set()
    groups: list[tuple[nn.Module, str, list[str]]] = []
    for module in model.modules():
        if isinstance(module, Attention):
            groups.append((module, "qkv", ["q_proj", "k_proj", "v_proj"]))
        elif isinstance(module, MLP):
            groups.append((module, "gate_up", ["gate_proj", "up_proj"]))
    for owner, fused_name, names in groups:
        parts = [getattr(owner, name) for name in names]
        if FusedQuantLinear.fusable(parts):
            setattr(owner, fused_name, FusedQuantLinear(parts, matmul))
            fused.update(parts)
    return fused


def _tie(model: CausalLM, dtype: torch.dtype) -> None:
    """Make lm_head share the embedding's weight (tied models); assign=True loading unties them."""
    if not model.spec.tie_word_embeddings:
        return
    embed = model.model.embed_tokens
    if isinstance(embed, QuantEmbedding) and not isinstance(model.lm_head, QuantLinear):
        # One table of blocks serves both the lookup and the logits.
        model.lm_head = QuantLinear(embed.fmt, model.spec.hidden_size, model.spec.vocab_size, False, dtype)
    model.lm_head.weight = embed.weight


def _expect_input_perm(model: CausalLM, name: str) -> None:
    """A quantized layer stored with permuted input columns (act-order sources) carries its order."""
    try:
        module: nn.Module | None = model.get_submodule(name.removesuffix(".input_perm"))
    except AttributeError:
        module = None
    if not isinstance(module, QuantLinear):
        raise BadArtifactError(f"tensor {name} names no quantized linear layer; rebuild the artifact")
    module.add_input_perm()


def _quantize_module(model: CausalLM, name: str, fmt: str, dtype: torch.dtype) -> None:
    """Swap the layer owning the weight `name` for its quantized twin."""
    path, _, leaf = name.rpartition(".")
    owner_path, _, attr = path.rpartition(".")
    module = model.get_submodule(path)
    owner = model.get_submodule(owner_path)
    if leaf == "weight" and isinstance(module, nn.Linear):
        quantized: nn.Module = QuantLinear(fmt, module.in_features, module.out_features, module.bias is not None, dtype)
    elif leaf == "weight" and isinstance(module, nn.Embedding):
        quantized = QuantEmbedding(fmt, module.num_embeddings, module.embedding_dim, dtype)
    else:
        raise BadArtifactError(f"tensor {name} is stored quantized, but this runtime cannot run it quantized")
    setattr(owner, attr, quantized)
