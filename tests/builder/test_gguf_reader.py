"""builder/gguf_reader.py: the faster reader gives exactly what gguf's own GGUFReader gives."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from llmc.builder.gguf_reader import MAX_ARRAY_ITEMS, FastGGUFReader
from llmc.builder.sources import open_source
from llmc.errors import BadModelError


def _assert_same(path: Path) -> None:
    expected, got = gguf.GGUFReader(str(path), "r"), FastGGUFReader(str(path), "r")
    assert list(got.fields) == list(expected.fields)
    for name, field in expected.fields.items():
        mine = got.fields[name]
        assert (mine.offset, mine.data, mine.types) == (field.offset, field.data, field.types), name
        assert len(mine.parts) == len(field.parts), name
        for a, b in zip(mine.parts, field.parts, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b), name
        assert mine.contents() == field.contents(), name
    layout = (expected.alignment, expected.data_offset, expected.byte_order)
    assert (got.alignment, got.data_offset, got.byte_order) == layout
    assert len(got.tensors) == len(expected.tensors)
    for mine, tensor in zip(got.tensors, expected.tensors, strict=True):
        assert (mine.name, mine.tensor_type, mine.data_offset, mine.n_elements) == (
            tensor.name,
            tensor.tensor_type,
            tensor.data_offset,
            tensor.n_elements,
        )
        assert np.array_equal(mine.shape, tensor.shape)
        assert mine.data.dtype == tensor.data.dtype and np.array_equal(mine.data, tensor.data), tensor.name


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_every_field_and_tensor_matches_ggufs_reader(tmp_path: Path, endianess: gguf.GGUFEndian) -> None:
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    writer.add_token_list(["a", "bb", "", "ünïcode", "\u0120the"])
    writer.add_token_scores([0.5, -1.0, 0.0, 2.5, 3.0])
    writer.add_token_types([1, 2, 3, 6, 1])
    writer.add_uint32("llama.block_count", 2)
    writer.add_uint64("test.u64", 1 << 40)
    writer.add_int8("test.i8", -3)
    writer.add_float64("test.f64", 1.25)
    writer.add_bool("test.flag", True)
    writer.add_string("general.name", "tiny")
    writer.add_array("test.ints", [1, -2, 3])
    rows = np.arange(64, dtype=np.float32).reshape(4, 16)
    writer.add_tensor("token_embd.weight", rows if endianess == gguf.GGUFEndian.LITTLE else rows.byteswap())
    writer.add_tensor("output_norm.weight", np.ones(16, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_same(path)


def test_smollm2s_file_reads_the_same(smollm2_gguf: Path) -> None:
    _assert_same(smollm2_gguf)


def test_a_truncated_file_fails_as_with_ggufs_reader(tmp_path: Path, smollm2_gguf: Path) -> None:
    path = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as source:
        path.write_bytes(source.read(100_000))  # inside the vocabulary's strings
    with pytest.raises(Exception) as expected:
        gguf.GGUFReader(str(path), "r")
    with pytest.raises(type(expected.value)):
        FastGGUFReader(str(path), "r")


def _header(tensors: int, fields: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, fields)


def _string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


@pytest.mark.parametrize(
    "content",
    [
        # An array of 2^62 uint8 in a 68-byte file: gguf's reader loops over short reads without
        # moving forward (GBs within a minute); here it is refused before the loop.
        _header(0, 1) + _string("general.architecture") + struct.pack("<IIQ", 9, 0, 1 << 62),
        _header(0, 1) + _string("a") + struct.pack("<IIQ", 9, 8, 1 << 40),  # 2^40 strings
        _header(0, 1) + _string("a") + struct.pack("<IIQ", 9, 0, MAX_ARRAY_ITEMS + 1) + bytes(MAX_ARRAY_ITEMS + 1),
        _header(0, 5),  # fields the file does not hold
        _header(0, 1) + struct.pack("<Q", 1 << 63) + b"abc",  # a key of 2^63 bytes
        _header(1, 0) + _string("t") + struct.pack("<I", 0xFFFFFFFF) + bytes(64),  # 2^32 dimensions
    ],
    ids=["array-2^62", "strings-2^40", "array-over-the-cap", "fields-missing", "key-2^63", "dims-2^32"],
)
def test_sizes_a_header_claims_are_bounded_by_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "crafted.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        FastGGUFReader(str(path), "r")
    with pytest.raises(BadModelError, match="not a readable GGUF"):
        open_source(str(path))
