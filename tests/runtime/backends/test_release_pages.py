"""Weights mapped from the artifact: the quantized blocks' pages are dropped from RSS after the
prepared forms are built, without changing what the tensors hold."""

from __future__ import annotations

import mmap
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmc.runtime.backends.cpu import release_pages
from llmc.runtime.resident import file_mappings

_PAGES = 2048  # 8 MiB of 4 KiB pages: far above RSS noise


def _resident_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_mapped_blocks_leave_rss_and_keep_their_values(tmp_path: Path) -> None:
    blocks = torch.randint(0, 256, (_PAGES, mmap.PAGESIZE), dtype=torch.uint8)
    path = tmp_path / "w.safetensors"
    save_file({"blocks": blocks}, str(path))
    with safe_open(str(path), framework="pt") as handle:
        mapped = handle.get_tensor("blocks")
    mapped_ranges = file_mappings({str(path.resolve())})
    assert mapped_ranges, "safetensors maps the file (no copy); this check needs that"
    assert int(mapped.sum()) == int(blocks.sum())  # every page read: resident
    before = _resident_file_kb()
    release_pages(mapped, mapped_ranges)
    dropped = before - _resident_file_kb()
    assert dropped > 0.9 * _PAGES * mmap.PAGESIZE / 1024
    assert torch.equal(mapped, blocks)  # faulted back in from the file, unchanged


def test_anonymous_tensors_are_left_alone(tmp_path: Path) -> None:
    """A copied tensor lives in anonymous memory, where MADV_DONTNEED would zero it."""
    copied = torch.randint(1, 256, (_PAGES, mmap.PAGESIZE), dtype=torch.uint8)
    expected = copied.clone()
    path = tmp_path / "w.safetensors"
    save_file({"blocks": copied}, str(path))
    with safe_open(str(path), framework="pt") as handle:
        mapped = handle.get_tensor("blocks")  # the file stays mapped, but `copied` is not in it
    ranges = file_mappings({str(path.resolve())})
    assert ranges
    release_pages(copied, ranges)
    assert torch.equal(copied, expected)
    assert torch.equal(mapped, expected)
