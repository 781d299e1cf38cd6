"""Constrained decoding with llguidance: the output always parses under a grammar.

llguidance was chosen over xgrammar and outlines-core: it needs neither torch nor transformers at
install time (a ~5 MB wheel with no dependencies, where xgrammar pulls in transformers and
triton), builds its token trie from tokenizer.json directly, and computes a vocabulary mask in
tens of microseconds per token. Its grammars take JSON schemas and Lark with embedded `%json`.
"""

from __future__ import annotations

import json
from typing import Any, cast

import numpy as np
import torch

from llmc.errors import BadInputError

# A request's grammar (a JSON schema or Lark text) is capped so no request can make grammar
# construction take unbounded time or memory.
MAX_GRAMMAR_CHARS = 64 * 1024
# JSON is generated in json.dumps' layout: free whitespace would let a weak model pad forever.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def lark_json(schema: dict[str, Any]) -> str:
    """`%json {...}` for a Lark grammar, with the same layout options as JSON schemas get."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


class Constraint:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """A bool mask over the model's vocabulary: the tokens the grammar allows next."""
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[: self._vocab_size].astype(np.bool_))

    def accept(self, token: int) -> None:
        self._matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        return bool(self._matcher.is_stopped())


class GrammarCompiler:
    """Turns request formats into grammar text, and grammar text into per-sequence constraints."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]) -> None:
        import llguidance

        self._llg = llguidance
        self._vocab_size = vocab_size
        eos = eos_token_ids[0] if eos_token_ids else None
        self._tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)

    def from_json_schema(self, schema: dict[str, Any] | None, param: str) -> str:
        """A grammar for JSON matching `schema` (any JSON object when None)."""
        text = json.dumps(schema if schema is not None else {"type": "object"})
        if len(text) > MAX_GRAMMAR_CHARS:
            raise BadInputError(f"the schema is larger than {MAX_GRAMMAR_CHARS} characters", param=param)
        try:
            grammar = self._llg.LLMatcher.grammar_from_json_schema(text, defaults=cast(Any, JSON_OPTIONS))
        except (ValueError, RuntimeError) as exc:
            raise BadInputError(f"the JSON schema is not supported: {exc}", param=param) from exc
        return self._validated(grammar, param)

    def from_lark(self, lark: str, param: str) -> str:
        if len(lark) > MAX_GRAMMAR_CHARS:
            raise BadInputError(f"the grammar is larger than {MAX_GRAMMAR_CHARS} characters", param=param)
        return self._validated(self._llg.LLMatcher.grammar_from_lark(lark), param)

    def _validated(self, grammar: str, param: str) -> str:
        error = self._llg.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error and not error.startswith("WARNING"):
            raise BadInputError(f"the requested output format cannot be enforced: {error}", param=param)
        return grammar

    def constraint(self, grammar: str) -> Constraint:
        matcher = self._llg.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise BadInputError(f"the requested output format cannot be enforced: {matcher.get_error()}")
        return Constraint(matcher, self._vocab_size)
