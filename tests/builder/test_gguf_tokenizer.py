"""GGUF tokenizers converted to tokenizer.json encode exactly as the reference implementations."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from llmc.builder.gguf_tokenizer import read_gguf_fields, tokenizer_from_gguf
from llmc.errors import BadModelError

TEXTS = [
    "The capital of France is",
    "In 1969, Apollo 11 landed; 3.14159 and 12345!",
    "def f(x):\n\treturn x  # ok\n\n\n",
    "naïve café 🙂 日本語",
    "<|im_start|>user\nhi<|im_end|>\n",
    "  leading  spaces   and\ttabs",
    "I'm sure they've GONE.",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> tuple[Tokenizer, Any]:
    import gguf

    converted = tokenizer_from_gguf(read_gguf_fields(gguf.GGUFReader(str(smollm2_gguf))))
    return Tokenizer.from_str(converted.tokenizer_json.decode()), converted


def test_smollm2_matches_transformers(smollm2: tuple[Tokenizer, Any], smollm2_gguf: Path) -> None:
    from transformers import AutoTokenizer

    tok, converted = smollm2
    reference = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == reference(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>", add_special_tokens=False).ids == [1]
    assert converted.eos_token == "<|im_end|>" and converted.eos_token_ids == [2]
    assert converted.chat_template and "<|im_start|>" in converted.chat_template


def test_smollm2_matches_llama_cpp(smollm2: tuple[Tokenizer, Any], smollm2_gguf: Path) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is in the bench extra (make install-bench)")
    from llama_cpp import Llama

    tok, _ = smollm2
    reference = Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False).ids == reference.tokenize(
            text.encode(), add_bos=False, special=True
        )


def _sentencepiece_gguf(tmp_path: Path) -> tuple[Path, Any]:
    import gguf
    import sentencepiece as spm

    rng = random.Random(0)
    words = ["river", "bridge", "stone", "meadow", "heron", "trout", "mill", "salt", "wool", "church", "the", "a"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
        # As Llama-style models are trained: no NFKC, keep whitespace runs.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = []
    for i in range(sp.get_piece_size()):
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_byte(i):
            types.append(6)
        else:
            types.append(1)
    path = tmp_path / "sp.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path, sp


def test_sentencepiece_matches_sentencepiece(tmp_path: Path) -> None:
    import gguf

    path, sp = _sentencepiece_gguf(tmp_path)
    converted = tokenizer_from_gguf(read_gguf_fields(gguf.GGUFReader(str(path))))
    tok = Tokenizer.from_str(converted.tokenizer_json.decode())
    assert converted.add_bos_token and converted.bos_token == "<s>"
    for text in [
        "the river bends",
        "a heron and a trout",
        "  two leading spaces",
        "unknown ñ 字 🙂 chars",
        "millstone churchbridge",
        "x",
    ]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids)


def test_errors_are_bad_model() -> None:
    with pytest.raises(BadModelError, match="no tokenizer"):
        tokenizer_from_gguf({})
    with pytest.raises(BadModelError, match="not supported"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(BadModelError, match="pre-tokenizer 'mystery'"):
        tokenizer_from_gguf(
            {
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.tokens": ["a"],
                "tokenizer.ggml.merges": [],
                "tokenizer.ggml.pre": "mystery",
            }
        )


def test_oversized_metadata_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    from llmc.builder import gguf_tokenizer

    path = tmp_path / "big.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list([f"t{i}" for i in range(50)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    monkeypatch.setattr(gguf_tokenizer, "MAX_ARRAY_ITEMS", 10)
    with pytest.raises(BadModelError, match="more than 10"):
        read_gguf_fields(gguf.GGUFReader(str(path)))
