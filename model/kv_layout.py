"""The KV cache's layout: per layer a flat (keys, values) pair [num_slots, kv_heads, head_dim]
(kernels/paged_attention.py reads it as blocks). Where its memory comes from is the device
backend's choice (runtime/backends/); the builder traces the decode step over plain zeros."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from llmc.artifacts.manifest import ModelSpec

# (number of elements, dtype) -> that many zeros, flat: the memory all layers' caches are views of.
Zeroed = Callable[[int, torch.dtype], torch.Tensor]
# Per layer, (keys, values).
KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def _zeros(numel: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(numel, dtype=dtype)


def kv_bytes_per_token(spec: ModelSpec, dtype: torch.dtype) -> int:
    """KV cache bytes one token takes over all layers (keys and values, in the compute dtype);
    known before the model is built, so the engine can size the context first."""
    return spec.num_layers * spec.num_kv_heads * (spec.head_dim + (spec.v_head_dim or spec.head_dim)) * dtype.itemsize


def allocate_kv_caches(spec: ModelSpec, dtype: torch.dtype, num_slots: int, zeroed: Zeroed = _zeros) -> KVCaches:
    """Zeroed (keys, values) per layer, flat [num_slots, kv_heads, head_dim], all views of one
    allocation from `zeroed`. Zeros matter: attention multiplies masked-out slots by 0, and
    garbage there could be NaN."""
    k_shape = (num_slots, spec.num_kv_heads, spec.head_dim)
    v_shape = (num_slots, spec.num_kv_heads, spec.v_head_dim or spec.head_dim)
    k_numel, v_numel = math.prod(k_shape), math.prod(v_shape)
    memory = zeroed(spec.num_layers * (k_numel + v_numel), dtype)
    caches = []
    for layer in range(spec.num_layers):
        start = layer * (k_numel + v_numel)
        keys = memory[start : start + k_numel].view(k_shape)
        values = memory[start + k_numel : start + k_numel + v_numel].view(v_shape)
        caches.append((keys, values))
    return caches
