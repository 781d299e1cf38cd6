"""Mixture-of-experts layers: the router (Qwen-MoE's softmax, DeepSeek's grouped routings), the
stacked routed experts and the optional shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmc.artifacts.manifest import ModelSpec
from llmc.model.layers import ACTIVATIONS, MLP


class Experts(nn.Module):
    """All routed experts' weights stacked: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        experts, size, hidden = spec.num_experts, spec.moe_intermediate_size, spec.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * size, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, size))
        self.act = ACTIVATIONS[spec.hidden_act]

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
