"""Rotary position embeddings: rotate-half (Llama) or interleaved pairs (GLM), full or partial,
with the default, linear, llama3 and longrope (Phi-3) frequency schemes."""

from __future__ import annotations

import math
from typing import Any

import torch

from llmc.errors import BadArtifactError
from llmc.kernels.casts import cast

SUPPORTED_ROPE_SCALING = ("default", "linear", "llama3", "longrope", "yarn")


def rope_kind(scaling: dict[str, Any] | None) -> str:
    return str((scaling or {}).get("rope_type", (scaling or {}).get("type", "default")))


def inverse_frequencies(
    dim: int, theta: float, scaling: dict[str, Any] | None, long: bool = False
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `dim` rotated channels, and the factor cos/sin are scaled by."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = rope_kind(scaling)
    if kind == "default":
        return inv_freq, 1.0
    assert scaling is not None
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        low_wavelen = old_context / low_freq_factor
        high_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, blended, scaled), 1.0
    if kind == "longrope":
        # Phi-3: per-channel stretch factors, one set for short contexts and one for long ones,
        # and an attention factor that keeps the softmax temperature steady.
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        original = float(scaling["original_max_position_embeddings"])
        scale = float(scaling.get("max_position_embeddings", original)) / original
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (factors * theta**exponents), float(attention)
    if kind == "yarn":
        return _yarn(dim, theta, scaling)
    supported = ", ".join(SUPPORTED_ROPE_SCALING)
    raise BadArtifactError(f"rope scaling type {kind!r} is not supported; supported: {supported}")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction for a context stretched `scale` times."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN: high frequencies extrapolate, low ones interpolate by `factor`, a linear ramp between."""
    factor = float(scaling["factor"])
    original = float(scaling["original_max_position_embeddings"])
    attention = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention is None:
        if mscale and mscale_all_dim:
            attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention = yarn_mscale(factor)
    beta_fast = float(scaling.get("beta_fast") or 32)  # the YaRN paper's defaults
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention)


def _table(
    max_positions: int, dim: int, theta: float, scaling: dict[str, Any] | None, interleaved: bool, long: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq, attention = inverse_frequencies(dim, theta, scaling, long)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * attention, emb.sin() * attention


def _sign_first_half(sin: torch.Tensor) -> torch.Tensor:
    """The sine table with its first half negated: rotate_half's sign, moved into the table."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


class RotaryEmbedding(torch.nn.Module):
    cos: torch.Tensor
    sin: torch.Tensor
    cos_long: torch.Tensor
    sin_long: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        partial_factor: float = 1.0,
        interleaved: bool = False,
    ) -> None:
        super().__init__()
        self.rotary_dim = int(head_dim * partial_factor)
        self.interleaved = interleaved
        # The tables are buffers (never saved: computed from the config), so that a compiled step
        # takes the runtime's tables at load like its weights, sized to the context served,
        # instead of keeping its own copy of the build's (Llama 3's 131072 positions: 128 MB per
        # program, issue 24). The sine tables of the half-split layout carry rotate_half's sign
        # (see _rotate).
        cos, sin = _table(max_positions, self.rotary_dim, theta, scaling, interleaved, long=False)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin if interleaved else _sign_first_half(sin), persistent=False)
        # longrope switches to its long factors once a sequence outgrows the original context.
        self.long_after: int | None = None
        if rope_kind(scaling) == "longrope":
            assert scaling is not None
            self.long_after = int(scaling["original_max_position_embeddings"])
            cos_long, sin_long = _table(max_positions, self.rotary_dim, theta, scaling, interleaved, True)
            self.register_buffer("cos_long", cos_long, persistent=False)
            self.register_buffer("sin_long", sin_long if interleaved else _sign_first_half(sin_long), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, use_long: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [N, H, D], k: [N, Hkv, D]; positions: [N]; use_long: [N] bool (longrope only)."""
        cos, sin = self.cos[positions], self.sin[positions]
        if use_long is not None and self.long_after is not None:
            pick = use_long.unsqueeze(-1)
            cos = torch.where(pick, self.cos_long[positions], cos)
            sin = torch.where(pick, self.sin_long[positions], sin)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Slices only where part of the head is rotated: a traced graph then holds no empty ones.
        partial = x.shape[-1] != self.rotary_dim
        rot = x[..., : self.rotary_dim] if partial else x
        if self.interleaved:
            rotated = torch.stack([-rot[..., 1::2], rot[..., 0::2]], dim=-1).flatten(-2)
        else:
            # rotate_half(rot) * sin, as [rot's second half, its first] * [-sin | sin]: one roll
            # instead of two slices, a negation and a cat (fewer nodes for the compile), and the
            # same products, since IEEE multiplication is exact under a change of sign.
            rotated = torch.roll(rot, self.rotary_dim // 2, dims=-1)
        out = cast(cast(rot, torch.float32) * cos + cast(rotated, torch.float32) * sin, x.dtype)
        return torch.cat([out, x[..., self.rotary_dim :]], dim=-1) if partial else out
