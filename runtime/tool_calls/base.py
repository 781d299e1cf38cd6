"""The shared machinery: a streaming parser that finds call regions in the model's text.

A format says where a call region starts and ends and how to read one. The parser passes text
through as content until a region may begin, holds text that might be the start of a marker,
and turns each complete region into tool calls — or, if the region does not parse, gives it
back as plain text. Markers inside <think> blocks or ``` code fences are text, not calls.

An output that ends inside a call it never finished is markup no client can use. When the call
was forced (tool_choice required or a named function: the whole output is the call) or the
output was cut by max_tokens, that unfinished call — and a partial start marker — is dropped,
never returned as content: the client sees finish_reason "length" and no tool call, as the
call's arguments would not parse. A call whose JSON is complete and only its end marker was
cut is kept. Otherwise (the model stopped on its own) an unfinished region stays text.
Non-streaming parsing is the same parser fed everything at once, so streamed deltas always
reassemble into the non-streamed result.
"""

from __future__ import annotations

import abc
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmc.errors import BadInputError
from llmc.runtime.structured_output import map_schema


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass(frozen=True)
class ContentEvent:
    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    index: int
    call: ToolCall


Event = ContentEvent | ToolCallEvent


def json_value(text: str) -> Any:
    """The JSON value `text` holds, or None where it holds none: not JSON, or nested deeper than
    Python's parser recurses (RecursionError; a model can emit thousands of brackets). Callers
    want an object or a list, so a JSON `null` reads the same as no JSON."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def arguments_json(arguments: Any) -> str | None:
    """Arguments as JSON object text, or None when they are not a JSON object."""
    if isinstance(arguments, str):
        arguments = json_value(arguments)
    if not isinstance(arguments, dict):
        return None
    try:
        return json.dumps(arguments, ensure_ascii=False)
    except RecursionError:  # parsed, yet too deep to write back: as unusable as unparsable
        return None


def call_from_object(obj: Any) -> tuple[str, str] | None:
    """{"name": ..., "arguments"|"parameters": {...}} → (name, arguments JSON), else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    text = arguments_json(args)
    return (obj["name"], text) if text is not None else None


def _inside_think_or_fence(text: str) -> bool:
    return text.count("<think>") > text.count("</think>") or text.count("```") % 2 == 1


def tool_schemas(tools: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, parameters schema) of each OpenAI function tool; a `strict: true` tool's schema closed."""
    out = []
    for tool in tools:
        function = tool["function"]
        params = function.get("parameters") or {"type": "object"}
        out.append((function["name"], strict_schema(params) if function.get("strict") is True else params))
    return out


def _is_object_schema(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    if kind is None:
        return "properties" in schema
    return kind == "object" or (isinstance(kind, list) and "object" in kind)


def strict_schema(schema: Any) -> Any:
    """OpenAI's strict mode: every object in `schema` closed with `additionalProperties: false`, so
    generated arguments hold no key the tool did not declare. A copy: the request's schema (which the
    chat template shows the model) stays as sent. An object that allows extra keys is a contradiction
    in a strict tool and is refused, as OpenAI refuses it."""
    return map_schema(schema, _closed, param="tools")


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    if not _is_object_schema(schema):
        return schema
    if schema.get("additionalProperties", False) is not False:
        raise BadInputError(
            "a strict tool's objects cannot allow additional properties: "
            "set additionalProperties to false (or leave it out), or drop strict",
            param="tools",
        )
    return {**schema, "additionalProperties": False}


class ToolCallFormat(abc.ABC):
    name: str
    start: str  # marker opening a call region
    end: str | None  # marker closing it; None: the region runs to the end of the output

    def find_start(self, buffer: str, before: str) -> tuple[int, int] | None:
        """(index, marker length) of a region start in `buffer` (`before` is the content so far)."""
        index = buffer.find(self.start)
        while index != -1:
            if not _inside_think_or_fence(before + buffer[:index]):
                return index, len(self.start)
            index = buffer.find(self.start, index + 1)
        return None

    def hold(self, buffer: str, before: str) -> int:
        """How many trailing characters of `buffer` to hold back: they may begin a marker."""
        for size in range(min(len(buffer), len(self.start) - 1), 0, -1):
            if buffer.endswith(self.start[:size]):
                return size
        return 0

    def may_be_call(self, body: str) -> bool:
        """Whether an unfinished region's body may be the start of a call (its start marker says so)."""
        return True

    @abc.abstractmethod
    def parse_region(self, body: str) -> list[tuple[str, str]] | None:
        """The calls (name, arguments JSON) in one region's body, or None if it is malformed."""

    @abc.abstractmethod
    def grammar(self, tools: list[dict[str, Any]]) -> str:
        """A Lark grammar (llguidance dialect) for exactly one call of one of `tools`."""

    def render_call(self, name: str, arguments: dict[str, Any]) -> str:
        """A call as the model would have written it (for templates that cannot render tool calls)."""
        body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        return f"{self.start}{body}{self.end or ''}"

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        """Instructions for templates that do not render tools themselves."""
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return (
            "You can call functions to help answer the user. The functions are listed in JSON, one per line, "
            f"between <tools> and </tools>:\n<tools>\n{listing}\n</tools>\n"
            "To call a function, reply with a JSON object holding its name and arguments between "
            '<tool_call> and </tool_call>, like:\n<tool_call>\n{"name": "function_name", "arguments": {}}\n'
            "</tool_call>"
        )


def one_of_calls(tools: list[dict[str, Any]], key: str = "arguments") -> dict[str, Any]:
    """A JSON schema for {"name": N, key: <N's parameters>} over every tool N."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, key: params},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for name, params in tool_schemas(tools)
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


class ToolCallParser:
    """Streaming parser for one response choice."""

    def __init__(self, fmt: ToolCallFormat, new_id: Callable[[], str] | None = None, forced: bool = False) -> None:
        self.fmt = fmt
        self.forced = forced  # the output is one call (a grammar made it so): never content
        self._new_id = new_id or (lambda: f"call_{uuid.uuid4().hex[:24]}")
        self._buffer = ""
        self._content = ""  # content emitted so far
        self._region_start: str | None = None  # the marker text that opened the current region
        self.calls: list[ToolCall] = []
        self.dropped = False  # an unfinished call (or marker) was withheld from the content

    def feed(self, delta: str) -> list[Event]:
        self._buffer += delta
        events: list[Event] = []
        while True:
            if self._region_start is None:
                found = self.fmt.find_start(self._buffer, self._content)
                if found is None:
                    keep = self.fmt.hold(self._buffer, self._content)
                    self._emit_content(self._buffer[: len(self._buffer) - keep], events)
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return events
                index, size = found
                self._emit_content(self._buffer[:index], events)
                self._region_start = self._buffer[index : index + size]
                self._buffer = self._buffer[index + size :]
            else:
                if self.fmt.end is None:
                    return events
                end = self._buffer.find(self.fmt.end)
                if end == -1:
                    return events
                body = self._buffer[:end]
                raw = self._region_start + body + self.fmt.end
                self._buffer = self._buffer[end + len(self.fmt.end) :]
                self._region_start = None
                self._close_region(body, raw, events)

    def finish(self, cut: bool = False) -> list[Event]:
        """End of output (`cut`: by max_tokens). An open region is parsed (end-less formats); one
        the output never closed is returned as text, unless forced or cut (then it is dropped, see
        the module docstring)."""
        events: list[Event] = []
        strict = self.forced or cut
        if self._region_start is not None:
            raw = self._region_start + self._buffer
            if self.fmt.end is None:
                drop = self.forced or (cut and self.fmt.may_be_call(self._buffer))
                self._close_region(self._buffer, raw, events, drop_unparsed=drop)
            elif strict:
                # Only the end marker may be missing: a call whose body parses is still a call.
                self._close_region(self._buffer, raw, events, drop_unparsed=True)
            else:
                self._emit_content(raw, events)
        elif strict and self._buffer:
            self.dropped = True  # held back as a possible start marker: a fragment of markup
        else:
            self._emit_content(self._buffer, events)
        self._buffer = ""
        self._region_start = None
        return events

    def _close_region(self, body: str, raw: str, events: list[Event], drop_unparsed: bool = False) -> None:
        parsed = self.fmt.parse_region(body)
        if not parsed:
            if drop_unparsed:
                self.dropped = True
            else:
                self._emit_content(raw, events)
            return
        for name, arguments in parsed:
            call = ToolCall(id=self._new_id(), name=name, arguments=arguments)
            events.append(ToolCallEvent(len(self.calls), call))
            self.calls.append(call)

    def _emit_content(self, text: str, events: list[Event]) -> None:
        if text and self.forced:
            self.dropped = True  # the grammar allows only the call: any other text is markup
            return
        if text:
            self._content += text
            events.append(ContentEvent(text))


def parse_all(fmt: ToolCallFormat, text: str, forced: bool = False, cut: bool = False) -> tuple[str, list[ToolCall]]:
    """Non-streaming: (content, calls) of a whole output (`forced`, `cut`: see ToolCallParser.finish)."""
    parser = ToolCallParser(fmt, forced=forced)
    events = parser.feed(text) + parser.finish(cut)
    content = "".join(e.text for e in events if isinstance(e, ContentEvent))
    return content, parser.calls
