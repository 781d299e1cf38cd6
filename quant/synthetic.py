"""Random but valid GGML blocks, for testing and benchmarking kernels independently of any quantizer
(speed does not depend on the values; correctness is checked against the reference dequantizer)."""

from __future__ import annotations

import torch

from llmc.quant.formats import FORMATS

# Byte offsets of each format's f16 scale fields (d, and dmin/m where it has one) inside its block.
_F16_FIELDS: dict[str, tuple[int, ...]] = {
    "q4_0": (0,),
    "q4_1": (0, 2),
    "q5_0": (0,),
    "q5_1": (0, 2),
    "q8_0": (0,),
    "q2k": (80, 82),
    "q3k": (108,),
    "q4k": (0, 2),
    "q5k": (0, 2),
    "q6k": (208,),
}


def random_blocks(
    fmt: str,
    n: int,
    k: int,
    gen: torch.Generator | None = None,
    extreme: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random quant bytes with finite, small f16 scales (random bytes there could be inf/NaN), made
    on `device` (the generator's, by default); `extreme`: scales of either sign spread
    log-uniformly over f16's normal range (2**-14 .. 2**14)."""
    spec = FORMATS[fmt]
    n_blocks = k // spec.block_size
    dev = device if device is not None else (gen.device if gen is not None else "cpu")
    raw = torch.randint(0, 256, (n, n_blocks, spec.type_size), dtype=torch.uint8, generator=gen, device=dev)
    for off in _F16_FIELDS[fmt]:
        if extreme:
            sign = torch.randint(0, 2, (n, n_blocks), generator=gen, device=dev) * 2 - 1
            scale = (sign * torch.exp2(torch.rand(n, n_blocks, generator=gen, device=dev) * 28 - 14)).to(torch.float16)
        else:
            scale = (torch.rand(n, n_blocks, generator=gen, device=dev) * 0.049 + 0.001).to(torch.float16)
        raw[:, :, off : off + 2] = scale.view(torch.uint8).reshape(n, n_blocks, 2)
    return raw.reshape(n, n_blocks * spec.type_size)
