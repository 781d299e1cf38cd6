"""The generic decoder: one definition, used by the builder to check shapes and by the runtime to run.

Tensor names follow Hugging Face's Llama layout (`model.layers.N.self_attn.q_proj.weight`, ...);
the builder maps every source and family onto these names. What differs between families is a
field of ModelSpec that switches on a small piece here, never a copied model file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmc.artifacts.manifest import ModelSpec
from llmc.errors import BadArtifactError
from llmc.kernels.paged_attention import SeqSlice, decode_attention, paged_attention, write_kv
from llmc.runtime.quant_modules import FusedQuantLinear, QuantEmbedding, QuantLinear
from llmc.runtime.rope import RotaryEmbedding

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
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class StepContext:
    """What attention needs to know about one step's flattened batch.

    Two forms: `seqs` describes any mix of prefill chunks and decodes (eager only); the decode
    form, `block_tables` and `context_lens` with one new token per sequence, is all tensors so
    that the compiled decode step can trace it.
    """

    slot_mapping: torch.Tensor  # [N] int64 cache slot for each new token
    block_size: int
    seqs: list[SeqSlice]
    rope_long: torch.Tensor | None = None  # [N] bool: longrope's long factors apply (Phi-3)
    block_tables: torch.Tensor | None = None  # decode form: [N, max blocks] int64
    context_lens: torch.Tensor | None = None  # decode form: [N] int64, the new token included
    cpu_kernel: bool = False  # decode attention takes llmc's CPU kernel (kernels/paged_attention.py)

    def attend(
        self,
        q: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        k_cache, v_cache = kv
        if self.block_tables is not None:
            assert self.context_lens is not None
            tables, lens = self.block_tables, self.context_lens
            return decode_attention(
                q, k_cache, v_cache, self.block_size, tables, lens, scale, window, softcap, self.cpu_kernel
            )
        return paged_attention(q, k_cache, v_cache, self.block_size, self.seqs, scale, window, softcap, self.cpu_kernel)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        # The mean square accumulates in float64: summed in any order (eager kernels and the
        # compiled step's fused loops differ) it then rounds to the same float32, so compiled and
        # eager steps agree bit for bit even where bf16 rounding would amplify a last-bit change.
        mean_square = x32.double().pow(2).mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(mean_square + self.eps).float()
        if self.offset:  # Gemma scales in float32 by (1 + weight), then casts
            return (x32 * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def make_norm(spec: ModelSpec, dim: int) -> nn.Module:
    if spec.norm == "layer":
        return nn.LayerNorm(dim, eps=spec.rms_norm_eps)
    return RMSNorm(dim, spec.rms_norm_eps, spec.norm_weight_offset)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, rope: RotaryEmbedding, sliding: bool) -> None:
        super().__init__()
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.scale = spec.attn_scale if spec.attn_scale is not None else spec.head_dim**-0.5
        self.window = spec.sliding_window if sliding else None
        self.softcap = spec.attn_softcap
        self.q_proj = nn.Linear(spec.hidden_size, spec.num_heads * spec.head_dim, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * spec.head_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * spec.head_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, spec.hidden_size, bias=spec.o_bias)
        self.q_norm = make_norm(spec, spec.head_dim) if spec.qk_norm else None
        self.k_norm = make_norm(spec, spec.head_dim) if spec.qk_norm else None
        self.rope = rope
        self.qkv: FusedQuantLinear | None = None  # q/k/v as one matmul (fuse_projections)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        ctx: StepContext,
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x) if self.qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(positions, q, k, ctx.rope_long)
        write_kv(kv[0], kv[1], k, v, ctx.slot_mapping)
        out = ctx.attend(q, kv, self.scale, self.window, self.softcap)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values come from a low-rank latent,
    and only qk_rope_head_dim channels carry position. The cache holds the expanded per-head keys
    (nope + rope channels) and values (v_head_dim channels)."""

    def __init__(self, spec: ModelSpec, rope: RotaryEmbedding) -> None:
        super().__init__()
        heads, hidden = spec.num_heads, spec.hidden_size
        self.num_heads = heads
        self.nope, self.rope_dim, self.v_dim = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
        self.kv_lora_rank = spec.kv_lora_rank
        self.scale = spec.attn_scale if spec.attn_scale is not None else spec.head_dim**-0.5
        qk = self.nope + self.rope_dim
        bias = spec.qkv_bias
        self.q_proj = nn.Linear(hidden, heads * qk, bias=False) if not spec.q_lora_rank else None
        self.q_a_proj = nn.Linear(hidden, spec.q_lora_rank, bias=bias) if spec.q_lora_rank else None
        self.q_a_layernorm = RMSNorm(spec.q_lora_rank, spec.rms_norm_eps) if spec.q_lora_rank else None
        self.q_b_proj = nn.Linear(spec.q_lora_rank, heads * qk, bias=False) if spec.q_lora_rank else None
        self.kv_a_proj_with_mqa = nn.Linear(hidden, spec.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(spec.kv_lora_rank, spec.rms_norm_eps)
        self.kv_b_proj = nn.Linear(spec.kv_lora_rank, heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_dim, hidden, bias=spec.o_bias)
        self.rope = rope

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        ctx: StepContext,
    ) -> torch.Tensor:
        n, heads = x.shape[0], self.num_heads
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            assert self.q_a_proj is not None and self.q_a_layernorm is not None and self.q_b_proj is not None
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(n, heads, self.nope + self.rope_dim)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        expanded = self.kv_b_proj(self.kv_a_layernorm(latent)).view(n, heads, self.nope + self.v_dim)
        k_nope, v = expanded.split([self.nope, self.v_dim], dim=-1)
        q_rot, k_rot = self.rope(positions, q[..., self.nope :], k_rot.view(n, 1, self.rope_dim), ctx.rope_long)
        q = torch.cat([q[..., : self.nope], q_rot], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(n, heads, self.rope_dim)], dim=-1)
        write_kv(kv[0], kv[1], k, v.contiguous(), ctx.slot_mapping)
        out = ctx.attend(q, kv, self.scale)
        return self.o_proj(out.reshape(n, heads * self.v_dim))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, intermediate: int | None = None) -> None:
        super().__init__()
        bias = spec.mlp_bias
        size = intermediate or spec.intermediate_size
        self.gate_proj = nn.Linear(spec.hidden_size, size, bias=bias)
        self.up_proj = nn.Linear(spec.hidden_size, size, bias=bias)
        self.down_proj = nn.Linear(size, spec.hidden_size, bias=bias)
        self.act = _ACTIVATIONS[spec.hidden_act]
        self.gate_up: FusedQuantLinear | None = None  # gate/up as one matmul (fuse_projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act(gate) * up)


class Experts(nn.Module):
    """All routed experts' weights stacked: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        experts, size, hidden = spec.num_experts, spec.moe_intermediate_size, spec.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * size, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, size))
        self.act = _ACTIVATIONS[spec.hidden_act]

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H]; expert_ids, weights [N, k]. Tokens are grouped per expert: one matmul pair per
        expert that has tokens this step, never a loop over tokens."""
        out = torch.zeros_like(x)
        k = expert_ids.shape[1]
        flat = expert_ids.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        token_of, slot_of = order // k, order % k
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            tokens, slots = token_of[start : start + count], slot_of[start : start + count]
            start += count
            gate, up = F.linear(x[tokens], self.gate_up_proj[expert]).chunk(2, dim=-1)
            h = F.linear(self.act(gate) * up, self.down_proj[expert]) * weights[tokens, slots, None]
            out.index_add_(0, tokens, h.to(out.dtype))
        return out


class Router(nn.Module):
    """Picks each token's experts and their weights, in float32.

    softmax: top-k of the softmax (Qwen-MoE). group_softmax: the same, limited to the topk_group
    groups with the best single expert (DeepSeek-V2). group_sigmoid: sigmoid scores plus a learned
    correction bias choose, groups ranked by their two best experts; weights come from the
    uncorrected scores (DeepSeek-V3).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.kind = spec.router
        self.top_k = spec.num_experts_per_tok
        self.norm_topk_prob = spec.norm_topk_prob
        self.n_group, self.topk_group = spec.n_group, spec.topk_group
        self.scaling = spec.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(spec.num_experts, spec.hidden_size))
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(spec.num_experts)) if spec.router == "group_sigmoid" else None
        )

    def _group_mask(self, scores: torch.Tensor, group_scores: torch.Tensor) -> torch.Tensor:
        chosen = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False).indices
        mask = torch.zeros_like(group_scores).scatter_(1, chosen, 1.0).bool()
        return mask.repeat_interleave(scores.shape[-1] // self.n_group, dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        if self.kind == "group_sigmoid":
            assert self.e_score_correction_bias is not None
            scores = logits.sigmoid()
            biased = scores + self.e_score_correction_bias.float()
            grouped = biased.view(-1, self.n_group, biased.shape[-1] // self.n_group)
            mask = self._group_mask(biased, grouped.topk(2, dim=-1).values.sum(dim=-1))
            ids = torch.topk(biased.masked_fill(~mask, float("-inf")), k=self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, ids)
        else:
            scores = logits.softmax(dim=-1)
            if self.kind == "group_softmax":
                grouped = scores.view(-1, self.n_group, scores.shape[-1] // self.n_group)
                scores = scores.masked_fill(~self._group_mask(scores, grouped.max(dim=-1).values), 0.0)
            weights, ids = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


class MoE(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate = Router(spec)
        self.experts = Experts(spec)
        shared = spec.shared_expert_intermediate_size
        self.shared_expert = MLP(spec, shared) if shared else None
        gated = shared and spec.shared_expert_gated
        self.shared_expert_gate = nn.Linear(spec.hidden_size, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expert_ids, weights = self.gate(x)
        out = self.experts(x, expert_ids, weights.to(x.dtype))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out


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
        self.dtype = torch.float32  # the compute dtype: activations and KV cache (build_model sets it)
        self.cpu_kernels = False  # llmc's CPU kernel library is loaded for it (build_model sets it)
        self.model = Backbone(spec, max_positions)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
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
        x = self.model.embed_tokens(input_ids)
        if self.spec.embed_scale != 1.0:
            x = x * torch.tensor(self.spec.embed_scale, dtype=x.dtype)
        for layer, kv in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, positions, kv, ctx)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.spec.final_softcap is not None:
            cap = self.spec.final_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits


def build_model(
    spec: ModelSpec,
    weights: dict[str, torch.Tensor],
    max_positions: int,
    quant: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
    dense_copies: bool = False,
    cpu_kernels: bool = False,
) -> CausalLM:
    """Instantiate on the meta device, then adopt `weights` (memory-mapped) without copying them.

    `quant` names the tensors stored as GGML blocks and their format: their layers become
    QuantLinear / QuantEmbedding. `dtype` is the artifact's compute dtype (the KV cache's too).
    `dense_copies`: quantized layers also keep bf16 copies for prefill and large batches
    (kernels/qmatmul_cpu.py), at 2 bytes per weight. `cpu_kernels`: llmc's CPU kernel library is
    loaded (kernels/cpu_kernels.py): quantized layers take its VNNI matmul where it applies, decode
    attention its paged kernel.
    """
    quant = quant or {}
    with torch.device("meta"):
        model = CausalLM(spec, max_positions)
        for name, fmt in quant.items():
            _quantize_module(model, name, fmt, dtype)
        _tie(model, dtype)
    model.dtype = dtype
    model.cpu_kernels = cpu_kernels
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
    fused = fuse_projections(model, dense_copies, cpu_kernels)
    for module in model.modules():
        if isinstance(module, QuantLinear) and module not in fused:
            module.prepare(dense_copies, cpu_kernels)
    return model.eval()


def fuse_projections(model: CausalLM, dense_copies: bool, vnni: bool = False) -> set[nn.Module]:
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
            setattr(owner, fused_name, FusedQuantLinear(parts, dense_copies, vnni))
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
