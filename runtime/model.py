"""The Llama-family decoder: one definition, used by the builder to trace and by the runtime to run.

Tensor names follow Hugging Face's Llama layout (`model.layers.N.self_attn.q_proj.weight`, ...);
the builder maps every source onto these names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmc.artifacts.manifest import ModelSpec
from llmc.errors import BadArtifactError
from llmc.kernels.paged_attention import SeqSlice, paged_attention, write_kv
from llmc.runtime.rope import RotaryEmbedding

SUPPORTED_ARCHITECTURES = ("llama",)
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class StepContext:
    """What attention needs to know about one step's flattened batch."""

    slot_mapping: torch.Tensor  # [N] int64 cache slot for each new token
    seqs: list[SeqSlice]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.scale = spec.head_dim**-0.5
        bias = spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, spec.num_heads * spec.head_dim, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * spec.head_dim, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * spec.head_dim, bias=bias)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, spec.hidden_size, bias=bias)
        self.rope = rope

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        ctx: StepContext,
    ) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        q, k = self.rope(positions, q, k)
        k_cache, v_cache = kv
        write_kv(k_cache, v_cache, k, v, ctx.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, ctx.seqs, self.scale)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        bias = spec.mlp_bias
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=bias)
        self.act = _ACTIVATIONS[spec.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, rope)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], ctx: StepContext
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, kv, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        rope = RotaryEmbedding(spec.head_dim, max_positions, spec.rope_theta, spec.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(spec, rope) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


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
        self.model = Backbone(spec, max_positions)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        ctx: StepContext,
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        for layer, kv in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, positions, kv, ctx)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def build_model(spec: ModelSpec, weights: dict[str, torch.Tensor], max_positions: int) -> CausalLM:
    """Instantiate on the meta device, then adopt `weights` (memory-mapped) without copying them."""
    with torch.device("meta"):
        model = CausalLM(spec, max_positions)
    expected = {name for name, _ in model.named_parameters(remove_duplicate=True)}
    given = set(weights) - ({"lm_head.weight"} if spec.tie_word_embeddings else set())
    if expected != given:
        missing, extra = sorted(expected - given), sorted(given - expected)
        raise BadArtifactError(
            f"artifact tensors do not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    model.load_state_dict({k: weights[k] for k in expected}, strict=False, assign=True)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # The rope tables were made on the meta device with the module: make them for real, shared by all layers.
    rope = RotaryEmbedding(spec.head_dim, max_positions, spec.rope_theta, spec.rope_scaling)
    for layer in model.model.layers:
        assert isinstance(layer, DecoderLayer)
        layer.self_attn.rope = rope
    model.requires_grad_(False)
    return model.eval()
