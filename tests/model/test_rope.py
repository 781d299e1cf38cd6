"""model/rope.py's rotation against the textbook formulas (rotate_half for the half-split layout,
pairs for the interleaved one): bit for bit, since the compiled step and eager prefill must write
the same keys."""

from __future__ import annotations

import pytest
import torch

from llmc.model.rope import RotaryEmbedding, _table


def _reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool
) -> torch.Tensor:
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        rotated = torch.stack([-rot[..., 1::2], rot[..., 0::2]], dim=-1).flatten(-2)
    else:
        half = rotary_dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = (rot.float() * cos + rotated.float() * sin).to(x.dtype)
    return torch.cat([out, rest], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotation_is_the_textbook_one_bit_for_bit(dtype: torch.dtype, partial: float, interleaved: bool) -> None:
    head_dim, max_positions, theta = 64, 256, 10000.0
    rope = RotaryEmbedding(head_dim, max_positions, theta, None, partial, interleaved)
    cos, sin = _table(max_positions, rope.rotary_dim, theta, None, interleaved, long=False)  # plain tables
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(7, 4, head_dim, generator=generator).to(dtype)
    k = torch.randn(7, 2, head_dim, generator=generator).to(dtype)
    positions = torch.tensor([0, 1, 5, 63, 64, 200, 255])
    got_q, got_k = rope(positions, q, k)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    assert torch.equal(got_q, _reference(q, c, s, rope.rotary_dim, interleaved))
    assert torch.equal(got_k, _reference(k, c, s, rope.rotary_dim, interleaved))
