"""Grammar number bounds: what a JSON grammar lets a model write, checked token by token."""

from __future__ import annotations

from typing import Any

import pytest

from llmc.errors import BadInputError
from llmc.runtime.structured_output import MAX_SCHEMA_DEPTH, GrammarCompiler, bounded_schema, lark_json
from tests.helpers import grammar_accepts


@pytest.mark.parametrize(
    ("schema", "text", "allowed"),
    [
        ({"type": "integer"}, "1" * 16, True),
        ({"type": "integer"}, "1" * 17, False),
        ({"type": "integer"}, "-42", True),
        ({"type": "number"}, "12.5", True),
        ({"type": "number"}, "0.12345678", True),
        ({"type": "number"}, "1." + "0" * 30, False),
        ({"type": "number"}, "6.4e+300", False),
        ({"type": "number"}, "2" * 17, False),
        # A bound the schema sets itself is kept, beyond the defaults.
        ({"type": "integer", "minimum": 0, "maximum": 10**18}, "1" * 18, True),
        ({"type": "integer", "minimum": 0, "maximum": 10**18}, "-1", False),
        ({"type": "number", "multipleOf": 0.5}, "2.5", True),
        ({"type": "number", "multipleOf": 0.5}, "2.25", False),
        ({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}, '{"n": ' + "9" * 17, False),
        ({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}, '{"n": 12}', True),
        ({"type": "array", "items": {"type": ["number", "null"]}}, "[1.5, null, " + "3" * 17, False),
    ],
)
def test_schema_numbers_are_bounded(
    grammar_compiler: tuple[GrammarCompiler, Any], schema: dict[str, Any], text: str, allowed: bool
) -> None:
    assert (
        grammar_accepts(grammar_compiler, grammar_compiler[0].from_json_schema(schema, param="response_format"), text)
        is allowed
    )


@pytest.mark.parametrize(
    ("text", "allowed"),
    [('{"a": [1, {"b": 2.5}], "c": "x"}', True), ('{"a": ' + "1" * 20, False), ('{"a": 1e+999', False)],
)
def test_json_object_mode_bounds_numbers_at_any_depth(
    grammar_compiler: tuple[GrammarCompiler, Any], text: str, allowed: bool
) -> None:
    assert (
        grammar_accepts(grammar_compiler, grammar_compiler[0].from_json_schema(None, param="response_format"), text)
        is allowed
    )


def test_tool_argument_grammars_are_bounded(grammar_compiler: tuple[GrammarCompiler, Any]) -> None:
    params = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
    grammar = grammar_compiler[0].from_lark(f"start: args\nargs: {lark_json(params)}\n", param="tools")
    assert grammar_accepts(grammar_compiler, grammar, '{"x": 3.25}')
    assert not grammar_accepts(grammar_compiler, grammar, '{"x": 3.' + "1" * 20)


def test_bounding_leaves_the_callers_schema_alone_and_refuses_absurd_depth() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    assert bounded_schema(schema)["properties"]["n"]["maximum"] > 0
    assert schema == {"type": "object", "properties": {"n": {"type": "integer"}}}
    deep: dict[str, Any] = {"type": "integer"}
    for _ in range(MAX_SCHEMA_DEPTH + 2):
        deep = {"type": "array", "items": deep}
    with pytest.raises(BadInputError, match="nests deeper"):
        bounded_schema(deep)
