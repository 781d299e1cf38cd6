"""benchmarks/ready.py's figure for llama-server's KV cache, which the RSS comparison subtracts."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmc.benchmarks.ready import gguf_kv_mb

gguf = pytest.importorskip("gguf", reason="the gguf package comes with the build extra")


def _write(path: Path, key_length: int | None) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(4)  # 16 per head unless the file says otherwise
    writer.add_head_count_kv(2)
    if key_length is not None:
        writer.add_key_length(key_length)
        writer.add_value_length(key_length)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_kv_cache_is_float16_keys_and_values_per_layer_and_kv_head(tmp_path: Path) -> None:
    # 2 layers x 2 KV heads x (16 + 16) x 2 bytes = 256 bytes a token: 4096 tokens are 1 MiB
    assert gguf_kv_mb(_write(tmp_path / "derived.gguf", None), 4096) == 1.0
    # key and value lengths stated in the file win over width / heads: 2 x 2 x (32 + 32) x 2 = 512
    assert gguf_kv_mb(_write(tmp_path / "stated.gguf", 32), 4096) == 2.0
