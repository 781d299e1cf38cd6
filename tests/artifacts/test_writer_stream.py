"""The streaming safetensors writer: the same bytes as safetensors' own writer, one tensor held at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmc.artifacts.files import sha256_file
from llmc.artifacts.writer import write_safetensors
from llmc.errors import InternalError


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    # Every dtype the builder writes, names out of order, odd sizes (header padding, alignment).
    for i, dtype in enumerate([torch.uint8, torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int64]):
        for name in (f"z.{i}.weight", f"a.{i}.bias", f"m.{i}"):
            shape = [3 + i, 5] if name.startswith("z") else [7 + 2 * i]
            out[name] = (torch.randn(shape, generator=gen) * 50).to(dtype)
    out["scalar"] = torch.tensor(1.5)
    out["empty"] = torch.zeros(0, 4)
    return out


def test_streamed_file_is_byte_identical_to_save_file(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    loaded: list[str] = []

    def load(name: str) -> torch.Tensor:
        loaded.append(name)
        return tensors[name]

    layout = [(name, t.dtype, list(t.shape)) for name, t in reversed(tensors.items())]
    digest, size = write_safetensors(tmp_path / "streamed.safetensors", layout, load)
    reference = (tmp_path / "reference.safetensors").read_bytes()
    assert (tmp_path / "streamed.safetensors").read_bytes() == reference
    assert (digest, size) == (sha256_file(tmp_path / "reference.safetensors"), len(reference))
    assert sorted(loaded) == sorted(tensors)  # each tensor loaded exactly once
    with safe_open(str(tmp_path / "streamed.safetensors"), framework="pt") as handle:
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor)


def test_a_tensor_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InternalError, match="came back"):
        write_safetensors(tmp_path / "x.safetensors", [("w", torch.float32, [2, 2])], lambda _: torch.zeros(3))
