"""Each tool-call format on recorded-style outputs: good, several, malformed, truncated, in think
blocks and code fences; and streaming in any chunking equals parsing the whole text."""

from __future__ import annotations

import json
import random

import pytest

from llmc.runtime.tool_calls import FORMATS, ContentEvent, ToolCallEvent, ToolCallParser, choose_format
from llmc.runtime.tool_calls.base import parse_all

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
