"""Each tool-call format on recorded-style outputs: good, several, malformed, truncated, in think
blocks and code fences; and streaming in any chunking equals parsing the whole text."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from llmc.errors import BadInputError
from llmc.runtime.structured_output import GrammarCompiler
from llmc.runtime.tool_calls import FORMATS, ContentEvent, ToolCallEvent, ToolCallParser, choose_format
from llmc.runtime.tool_calls.base import parse_all, strict_schema, tool_schemas
from tests.helpers import grammar_accepts

WEATHER = {"city": "Paris", "unit": "celsius"}

CASES = {
    "hermes": [
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
            "",
            [("get_weather", WEATHER)],
        ),
        (
            'Let me check.<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": '
            '"{\\"x\\": 1}"}</tool_call>',
            "Let me check.",
            [("a", {}), ("b", {"x": 1})],
        ),
        (
            '<tool_call>{"name": "a", "arguments": {"x": </tool_call>',
            '<tool_call>{"name": "a", "arguments": {"x": </tool_call>',
            [],
        ),
        ('<tool_call>{"name": "a", "argu', '<tool_call>{"name": "a", "argu', []),
        (
            '<think>maybe <tool_call>{"name": "a", "arguments": {}}</tool_call></think>Hi',
            '<think>maybe <tool_call>{"name": "a", "arguments": {}}</tool_call></think>Hi',
            [],
        ),
        (
            '```\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n```',
            '```\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n```',
            [],
        ),
        ("Plain answer with a < sign and <tool", "Plain answer with a < sign and <tool", []),
    ],
    "mistral": [
        (
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
            "",
            [("get_weather", WEATHER)],
        ),
        (
            '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}[TOOL_CALLS]b[ARGS]{}',
            "",
            [("get_weather", WEATHER), ("b", {})],
        ),
        ('[TOOL_CALLS] [{"name": "a", "arguments": {', '[TOOL_CALLS] [{"name": "a", "arguments": {', []),
        ("No tools needed.", "No tools needed.", []),
    ],
    "llama": [
        ('<function=get_weather>{"city": "Paris", "unit": "celsius"}</function>', "", [("get_weather", WEATHER)]),
        (
            'Sure. <function=a>{}</function> and <function=b>{"x": 1}</function>',
            "Sure.  and ",
            [("a", {}), ("b", {"x": 1})],
        ),
        ("<function=a>not json</function>", "<function=a>not json</function>", []),
        ("<function=a>{}", "<function=a>{}", []),
    ],
    "json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "", [("get_weather", WEATHER)]),
        ('  [{"name": "a", "arguments": {}}, {"name": "b", "parameters": {"x": 1}}]', "", [("a", {}), ("b", {"x": 1})]),
        ('{"answer": 42}', '{"answer": 42}', []),
        ('{"name": "a", "parameters": {', '{"name": "a", "parameters": {', []),
        ('The JSON is {"name": "a", "parameters": {}}', 'The JSON is {"name": "a", "parameters": {}}', []),
    ],
}


@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
def test_json_nested_past_the_parsers_recursion_is_text_not_a_crash(fmt_name: str) -> None:
    # A model can emit thousands of brackets (a logit bias makes it); json.loads then raises
    # RecursionError, which is no ValueError: the server answered 500.
    deep = "[" * 5000 + "]" * 5000
    fmt = FORMATS[fmt_name]()
    bodies = [deep, f'{{"name": "a", "arguments": {deep}}}', f"a>{deep}", f"a[ARGS]{deep}"]
    assert all(fmt.parse_region(body) is None for body in bodies)
    wrapped = {"hermes": f"<tool_call>{deep}</tool_call>", "mistral": f"[TOOL_CALLS] {deep}"}
    text = wrapped.get(fmt_name, f"<function=a>{deep}</function>" if fmt_name == "llama" else deep)
    assert parse_all(fmt, text)[1] == []
    assert parse_all(fmt, text, forced=True)[1] == []


def _flat(fmt_name: str) -> list[tuple[str, str, str, list[tuple[str, dict[str, object]]]]]:
    return [(fmt_name, text, content, calls) for text, content, calls in CASES[fmt_name]]


ALL = [case for name in CASES for case in _flat(name)]


@pytest.mark.parametrize(("fmt_name", "text", "content", "calls"), ALL)
def test_parse_whole_output(fmt_name: str, text: str, content: str, calls: list[tuple[str, dict[str, object]]]) -> None:
    got_content, got_calls = parse_all(FORMATS[fmt_name](), text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls


@pytest.mark.parametrize(("fmt_name", "text", "content", "calls"), ALL)
def test_streaming_in_any_chunking_equals_whole(
    fmt_name: str, text: str, content: str, calls: list[tuple[str, dict[str, object]]]
) -> None:
    rng = random.Random(len(text))
    for _ in range(20):
        parser = ToolCallParser(FORMATS[fmt_name]())
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 8))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
        assert "".join(e.text for e in events if isinstance(e, ContentEvent)) == content
        streamed = [(e.call.name, json.loads(e.call.arguments)) for e in events if isinstance(e, ToolCallEvent)]
        assert streamed == calls
        assert [e.index for e in events if isinstance(e, ToolCallEvent)] == list(range(len(calls)))


def test_content_streams_before_the_call_completes() -> None:
    parser = ToolCallParser(FORMATS["hermes"]())
    assert parser.feed("Checking the weather ") == [ContentEvent("Checking the weather ")]
    assert parser.feed("<tool") == []  # might be a marker: held
    assert parser.feed('_call>{"name": "a", "arguments": {}}') == []
    events = parser.feed("</tool_call>")
    assert len(events) == 1 and isinstance(events[0], ToolCallEvent) and events[0].call.name == "a"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ '[TOOL_CALLS]' }}", "mistral"),
        ("<function=...>", "llama"),
        ("{% if tools %}<tool_call>{% endif %}", "hermes"),
        ('{% if tools %}{"name": ..., "parameters": ...}{% endif %}', "json"),
        ("plain chatml", "hermes"),
    ],
)
def test_auto_choice_from_template(template: str, expected: str) -> None:
    assert choose_format("auto", template).name == expected


def test_grammars_compile_for_every_format() -> None:
    from llmc.runtime.structured_output import GrammarCompiler
    from tests.conftest import make_tokenizer_json

    compiler = GrammarCompiler(make_tokenizer_json(), 323, [0])
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"],
                },
            },
        },
        {"type": "function", "function": {"name": "now"}},
    ]
    for fmt in FORMATS.values():
        compiler.constraint(compiler.from_lark(fmt().grammar(tools), param="tool_choice"))


# One complete call per format, as the forced-tool grammar has each format write it.
FORCED = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
    "llama": '<function=get_weather>{"city": "Paris", "unit": "celsius"}</function>',
    "json": '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
}


@pytest.mark.parametrize("fmt_name", sorted(FORCED))
@pytest.mark.parametrize("forced", [True, False])
def test_a_call_cut_anywhere_never_leaks_markup(fmt_name: str, forced: bool) -> None:
    """Every prefix of a call, as max_tokens would cut it (streamed in random pieces, and whole):
    no content at all, and either no call or the complete one."""
    text = FORCED[fmt_name]
    rng = random.Random(7)
    for length in range(len(text) + 1):
        prefix = text[:length]
        content, calls = parse_all(FORMATS[fmt_name](), prefix, forced=forced, cut=True)
        assert content == "", (prefix, content)
        assert [(c.name, json.loads(c.arguments)) for c in calls] in ([], [("get_weather", WEATHER)])
        parser = ToolCallParser(FORMATS[fmt_name](), forced=forced)
        cuts = sorted(rng.sample(range(1, length), k=min(length - 1, 3))) if length > 1 else []
        pieces = [prefix[a:b] for a, b in zip([0, *cuts], [*cuts, length], strict=True)]
        events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish(cut=True)
        assert "".join(e.text for e in events if isinstance(e, ContentEvent)) == content
        assert [e.call.name for e in events if isinstance(e, ToolCallEvent)] == [c.name for c in calls]
    # A complete call is always a call; with only the end marker cut, it still is.
    assert len(parse_all(FORMATS[fmt_name](), text, forced=forced, cut=True)[1]) == 1
    if fmt_name in ("hermes", "llama"):
        end = FORMATS[fmt_name]().end or ""
        assert len(parse_all(FORMATS[fmt_name](), text[: -len(end)], forced=forced, cut=True)[1]) == 1


def test_a_cut_call_after_text_keeps_the_text_only() -> None:
    hermes = FORMATS["hermes"]()
    text = 'Let me check. <tool_call>{"name": "a", "argu'
    assert parse_all(hermes, text, cut=True) == ("Let me check. ", [])
    parser = ToolCallParser(hermes)
    parser.feed(text)
    assert parser.finish(cut=True) == [] and parser.dropped
    # A partial start marker at the cut is markup too.
    assert parse_all(hermes, "Sure <tool_c", cut=True) == ("Sure ", [])
    # The model stopping by itself inside a region is not a cut: the text is given back as before.
    assert parse_all(hermes, text) == (text, [])
    # JSON calls have no marker: a cut JSON reply that does not begin like a call stays content.
    assert parse_all(FORMATS["json"](), '{"answer": 4', cut=True) == ('{"answer": 4', [])
    assert parse_all(FORMATS["json"](), '{"na', cut=True) == ("", [])


def test_forced_mode_never_emits_content() -> None:
    parser = ToolCallParser(FORMATS["hermes"](), forced=True)
    assert parser.feed("<tool") == []
    assert parser.finish() == [] and parser.dropped and parser.calls == []


NESTED = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "where": {"type": "object", "properties": {"lat": {"type": "integer"}}, "required": ["lat"]},
        "tags": {"type": "array", "items": {"type": "object", "properties": {"t": {"type": "string", "maxLength": 4}}}},
    },
    "required": ["city", "where"],
    "$defs": {"tag": {"type": "object", "properties": {"t": {"type": "string"}}}},
}


def _tool(strict: bool | None, params: dict[str, object] = NESTED) -> dict[str, object]:
    function: dict[str, object] = {"name": "locate", "parameters": params}
    if strict is not None:
        function["strict"] = strict
    return {"type": "function", "function": function}


def test_strict_closes_every_object_and_leaves_the_request_alone() -> None:
    closed = strict_schema(NESTED)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["where"]["additionalProperties"] is False
    assert closed["properties"]["tags"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["tag"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["city"]  # a string is not an object
    assert "additionalProperties" not in NESTED and "additionalProperties" not in NESTED["properties"]["where"]
    union = strict_schema({"anyOf": [{"type": ["object", "null"], "properties": {}}, {"type": "string"}]})
    assert union["anyOf"][0]["additionalProperties"] is False and "additionalProperties" not in union["anyOf"][1]
    # Only strict tools are closed.
    (_, strict_params), (_, loose_params) = tool_schemas([_tool(True), _tool(None)])
    assert strict_params["properties"]["where"]["additionalProperties"] is False
    assert loose_params is NESTED
    with pytest.raises(BadInputError, match="additional properties"):
        strict_schema({"type": "object", "additionalProperties": {"type": "string"}})


@pytest.mark.parametrize("fmt_name", sorted(FORCED))
def test_strict_tool_grammars_refuse_extra_keys(grammar_compiler: tuple[GrammarCompiler, Any], fmt_name: str) -> None:
    fmt = FORMATS[fmt_name]()
    strict = grammar_compiler[0].from_lark(fmt.grammar([_tool(True)]), param="tool_choice")
    loose = grammar_compiler[0].from_lark(fmt.grammar([_tool(False)]), param="tool_choice")
    good = {"city": "Oslo", "where": {"lat": 59}, "tags": [{"t": "n"}]}
    extras = [
        {"city": "Oslo", "where": {"lat": 59}, "zz": 1},  # at the top
        {"city": "Oslo", "where": {"lat": 59, "zz": 1}},  # in a nested object
        {"city": "Oslo", "where": {"lat": 59}, "tags": [{"t": "n", "zz": 1}]},  # in an array's items
    ]

    def call(args: dict[str, object]) -> str:  # in the grammar's layout (Hermes: the call on its own line)
        text = fmt.render_call("locate", args)
        return text.replace("<tool_call>", "<tool_call>\n").replace("</tool_call>", "\n</tool_call>")

    assert grammar_accepts(grammar_compiler, strict, call(good))
    assert grammar_accepts(grammar_compiler, loose, call(good))
    for args in extras:
        text = call(args)
        # Non-strict tools are unchanged: extra keys allowed.
        assert grammar_accepts(grammar_compiler, loose, text), text
        assert not grammar_accepts(grammar_compiler, strict, text), text
