"""Constrained decoding with llguidance: the output always parses under a grammar.

llguidance was chosen over xgrammar and outlines-core: it needs neither torch nor transformers at
install time (a ~5 MB wheel with no dependencies, where xgrammar pulls in transformers and
triton), builds its token trie from tokenizer.json directly, and computes a vocabulary mask in
tens of microseconds per token. Its grammars take JSON schemas and Lark with embedded `%json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from llmc.errors import BadInputError

# A request's grammar (a JSON schema or Lark text) is capped so no request can make grammar
# construction take unbounded time or memory.
MAX_GRAMMAR_CHARS = 64 * 1024
# JSON is generated in json.dumps' layout: free whitespace would let a weak model pad forever.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# Numbers a grammar allows when the schema sets no bound of its own. Unbounded, a small model at
# temperature 0 writes `31212222312344444...` until max_tokens, or `6.4e+3000` (which parses as
# inf). llama.cpp's JSON-schema grammar caps integral and fractional parts at 16 digits; here an
# integer gets at most 16 digits (|n| < 10^16), a number the same magnitude with at most 8 fraction
# digits and no exponent: llguidance expresses a fraction bound only as `multipleOf`, which is exact
# to 1e-8 and rejects every number from 1e-12 down (measured with llguidance 1.9).
MAX_INTEGER_MAGNITUDE = 10**16 - 1
MAX_NUMBER_MAGNITUDE = 1e16
NUMBER_RESOLUTION = 1e-8
# Real schemas nest a few levels; the cap keeps a hostile one from exhausting the stack.
MAX_SCHEMA_DEPTH = 64
_LOWER_BOUNDS = ("minimum", "exclusiveMinimum")
_UPPER_BOUNDS = ("maximum", "exclusiveMaximum")
# Keys whose value is one subschema, a list of them, or a name -> subschema map.
_SUBSCHEMA_KEYS = ("items", "additionalProperties", "not", "contains", "additionalItems", "if", "then", "else")
_SUBSCHEMA_LIST_KEYS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAP_KEYS = ("properties", "$defs", "definitions", "patternProperties")
# Any JSON value, with bounded numbers: what `json_object` (no schema) and open subschemas allow.
_ANY_VALUE_REF = "#/$defs/llmc_any_value"


def _any_value_defs() -> dict[str, Any]:
    value = {"$ref": _ANY_VALUE_REF}
    return {
        "llmc_any_value": {
            "anyOf": [
                {"type": "string"},
                _bounded_number({"type": "number"}),
                {"type": "boolean"},
                {"type": "null"},
                {"type": "array", "items": value},
                {"type": "object", "additionalProperties": value},
            ]
        }
    }


def _bounded_number(schema: dict[str, Any]) -> dict[str, Any]:
    types = schema.get("type")
    kinds = set(types) if isinstance(types, list) else {types}
    if not kinds & {"integer", "number"}:
        return schema
    out = dict(schema)
    magnitude: float = MAX_INTEGER_MAGNITUDE if kinds & {"integer"} and "number" not in kinds else MAX_NUMBER_MAGNITUDE
    if not any(key in out for key in _LOWER_BOUNDS):
        out["minimum"] = -magnitude
    if not any(key in out for key in _UPPER_BOUNDS):
        out["maximum"] = magnitude
    if "number" in kinds and "multipleOf" not in out:
        out["multipleOf"] = NUMBER_RESOLUTION
    return out


def map_schema(schema: Any, node: Callable[[dict[str, Any]], dict[str, Any]], param: str | None = None) -> Any:
    """A copy of `schema` with `node` applied to every subschema, top down (the request's own schema
    stays as sent). Deeper than MAX_SCHEMA_DEPTH is a bad input (`param` names the field)."""

    def walk(sub: Any, depth: int) -> Any:
        if not isinstance(sub, dict):
            return sub
        if depth > MAX_SCHEMA_DEPTH:
            raise BadInputError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels", param=param)
        out = dict(node(sub))
        for key in _SUBSCHEMA_KEYS:
            if key in out:
                out[key] = walk(out[key], depth + 1)
        for key in _SUBSCHEMA_LIST_KEYS:
            if isinstance(out.get(key), list):
                out[key] = [walk(item, depth + 1) for item in out[key]]
        for key in _SUBSCHEMA_MAP_KEYS:
            if isinstance(out.get(key), dict):
                out[key] = {name: walk(item, depth + 1) for name, item in out[key].items()}
        return out

    return walk(schema, 0)


def bounded_schema(schema: Any) -> Any:
    """`schema` with every integer and number subschema bounded where it sets no bound itself
    (minimum/maximum/multipleOf it gives are kept), so generated numbers always end and parse finite."""
    return map_schema(schema, _bounded_number)


def any_json_object_schema() -> dict[str, Any]:
    """`json_object`: any JSON object, its numbers bounded like a schema's."""
    return {"type": "object", "additionalProperties": {"$ref": _ANY_VALUE_REF}, "$defs": _any_value_defs()}


def lark_json(schema: dict[str, Any]) -> str:
    """`%json {...}` for a Lark grammar, with the same layout options and number bounds as JSON
    schemas get."""
    return "%json " + json.dumps({**bounded_schema(schema), "x-guidance": JSON_OPTIONS})


class Constraint:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size

    def allowed(self) -> np.ndarray:
        """A bool mask over the model's vocabulary: the tokens the grammar allows next."""
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return bits[: self._vocab_size].astype(np.bool_)

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
        if schema is not None and len(json.dumps(schema)) > MAX_GRAMMAR_CHARS:
            raise BadInputError(f"the schema is larger than {MAX_GRAMMAR_CHARS} characters", param=param)
        if isinstance(schema, dict) and "x-guidance" in schema:
            # llguidance's own options (separators, leniency) are the server's to set: a client's
            # made `[1 ; 2]` (no JSON) and unsupported keywords silently ignored.
            raise BadInputError("the schema's x-guidance key is not accepted; remove it", param=param)
        bounded = bounded_schema(schema) if schema is not None else any_json_object_schema()
        if isinstance(bounded, dict):
            bounded = {**bounded, "x-guidance": JSON_OPTIONS}
        text = json.dumps(bounded)
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
