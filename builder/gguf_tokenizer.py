"""GGUF metadata → Python values, and a GGUF's embedded tokenizer → a `tokenizers` tokenizer.json.

GGUF files come from strangers: every string and array read from the header is bounded.

Two GGUF tokenizer models exist:
- `gpt2`: byte-level BPE. Its pre-tokenizer (how text is split before BPE) is not stored, only
  named in `tokenizer.ggml.pre`; we rebuild it from that name, as llama.cpp does.
- `llama`: SentencePiece BPE with byte fallback, stored as pieces with scores. The merge order
  is recovered from the scores (a higher-scored piece merges first), as in Hugging Face's
  LlamaTokenizerFast.

The tokenizer.json never adds BOS itself: the runtime prepends BOS when the manifest's
`add_bos_token` says so and the text does not already start with it (chat templates usually
write it), so BOS is never doubled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmc.errors import BadModelError

# Bounds on header values: far above real tokenizers (the largest vocabularies are ~260k tokens,
# templates a few tens of KB) and far below what would exhaust memory.
MAX_STRING_BYTES = 16 * 1024 * 1024
MAX_ARRAY_ITEMS = 10_000_000

# token_type values in GGUF (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_TAIL = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|" + _LLAMA3_TAIL
_QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" + _LLAMA3_TAIL


def _split(pattern: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}

# tokenizer.ggml.pre → the pre-tokenizer steps before byte-level mapping.
PRE_TOKENIZERS: dict[str, list[dict[str, Any]]] = {
    "default": [_split(_GPT2_REGEX)],
    "gpt-2": [_split(_GPT2_REGEX)],
    "smollm": [{"type": "Digits", "individual_digits": True}, _split(_GPT2_REGEX)],
    "llama-bpe": [_split(_LLAMA3_REGEX)],
    "llama3": [_split(_LLAMA3_REGEX)],
    "qwen2": [_split(_QWEN2_REGEX)],
    "deepseek-r1-qwen": [_split(_QWEN2_REGEX)],
}


def read_gguf_fields(reader: Any) -> dict[str, Any]:
    """Every metadata field of a gguf.GGUFReader as plain Python values, sizes bounded."""
    import gguf

    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        types = list(field.types)
        if types and types[0] == gguf.GGUFValueType.ARRAY:
            if len(field.data) > MAX_ARRAY_ITEMS:
                raise BadModelError(f"GGUF field {key} has {len(field.data)} items, more than {MAX_ARRAY_ITEMS}")
            if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
                out[key] = [_text(key, bytes(field.parts[i])) for i in field.data]
            elif len(types) > 1 and types[1] == gguf.GGUFValueType.ARRAY:
                continue  # nested arrays carry nothing llmc reads
            else:
                out[key] = [field.parts[i].tolist()[0] for i in field.data]
        elif types and types[0] == gguf.GGUFValueType.STRING:
            out[key] = _text(key, bytes(field.parts[field.data[0]]))
        elif field.data:
            out[key] = field.parts[field.data[0]].tolist()[0]
    return out


def _text(key: str, raw: bytes) -> str:
    if len(raw) > MAX_STRING_BYTES:
        raise BadModelError(f"GGUF field {key} holds a string of {len(raw)} bytes, more than {MAX_STRING_BYTES}")
    return raw.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class GgufTokenizer:
    tokenizer_json: bytes
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: list[int]
    add_bos_token: bool
    chat_template: str | None


def tokenizer_from_gguf(fields: dict[str, Any]) -> GgufTokenizer:
    model = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise BadModelError("the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    types = fields.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise BadModelError("GGUF tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
    if model == "gpt2":
        body = _byte_level_bpe(fields, tokens)
    elif model == "llama":
        body = _sentencepiece_bpe(fields, tokens, types)
    else:
        raise BadModelError(
            f"GGUF tokenizer model {model!r} is not supported; supported: gpt2 (BPE), llama (SentencePiece)"
        )
    body["added_tokens"] = _added_tokens(tokens, types)
    body["version"] = "1.0"
    body["truncation"] = None
    body["padding"] = None
    tokenizer_json = json.dumps(body, ensure_ascii=False, sort_keys=True).encode("utf-8")

    def token(key: str) -> str | None:
        index = fields.get(key)
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    eos_ids = [
        i
        for i in [fields.get("tokenizer.ggml.eos_token_id"), fields.get("tokenizer.ggml.eot_token_id")]
        if isinstance(i, int) and 0 <= i < len(tokens)
    ]
    return GgufTokenizer(
        tokenizer_json=tokenizer_json,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        eos_token_ids=sorted(set(eos_ids)),
        add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", model == "llama")),
        chat_template=fields.get("tokenizer.chat_template"),
    )


def _byte_level_bpe(fields: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    merges = fields.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise BadModelError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise BadModelError(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    return {
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [*PRE_TOKENIZERS[pre], _BYTE_LEVEL]},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
    }


def _sentencepiece_bpe(fields: dict[str, Any], tokens: list[str], types: list[int]) -> dict[str, Any]:
    scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise BadModelError("GGUF tokenizer.ggml.scores and tokenizer.ggml.tokens differ in length")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    unk = fields.get("tokenizer.ggml.unknown_token_id", 0)
    # Merges: every split of a normal piece into two pieces, the merged piece's score deciding order.
    mergeable = {tok for tok, kind in zip(tokens, types, strict=True) if kind in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
    merges: list[tuple[float, int, str, str]] = []
    for piece in mergeable:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-scores[vocab[piece]], vocab[piece], left, right))
    merges.sort()
    normalizers: list[dict[str, Any]] = []
    if fields.get("tokenizer.ggml.add_space_prefix", True):
        normalizers.append({"type": "Prepend", "prepend": "\u2581"})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    return {
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[left, right] for _, _, left, right in merges],
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "post_processor": None,
    }


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict[str, Any]]:
    """Control and user-defined tokens are matched whole, before normalisation and BPE."""
    added = []
    for index, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN):
            added.append(
                {
                    "id": index,
                    "content": tok,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": kind == TOKEN_USER_DEFINED,
                    "special": kind != TOKEN_USER_DEFINED,
                }
            )
    return added
