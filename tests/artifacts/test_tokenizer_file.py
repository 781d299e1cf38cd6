"""tokenizer.json from strangers (artifacts/tokenizer_file.py): settings that would make a request
allocate without bound are off, and the library's panics are refusals, not crashes."""

from __future__ import annotations

import json

import pytest

from llmc.artifacts.tokenizer_file import parse_tokenizer_json


def _tokenizer_json() -> dict[str, object]:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    loaded: dict[str, object] = json.loads(tok.to_str())
    return loaded


def test_a_files_padding_and_truncation_are_off() -> None:
    source = _tokenizer_json()
    # A fixed padding length of 10^12 made the first encode ask for 4 TB and abort the process.
    source["padding"] = {"strategy": {"Fixed": 10**12}, "direction": "Right", "pad_to_multiple_of": None,
                         "pad_id": 0, "pad_type_id": 0, "pad_token": "[UNK]"}  # fmt: skip
    source["truncation"] = {"direction": "Right", "max_length": 1, "strategy": "LongestFirst", "stride": 0}
    tok = parse_tokenizer_json(json.dumps(source))
    assert tok.padding is None and tok.truncation is None
    assert tok.encode("hello world").ids == [1, 2]


def test_a_panic_in_the_library_is_a_value_error() -> None:
    source = _tokenizer_json()
    source["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": "AAAA"}  # panics in Rust
    with pytest.raises(ValueError, match="panicked"):
        parse_tokenizer_json(json.dumps(source))
    with pytest.raises(ValueError):
        parse_tokenizer_json("{not json")
