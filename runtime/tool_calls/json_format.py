"""Plain JSON (Llama 3.1 style): the whole reply is {"name": ..., "parameters"|"arguments": {...}}
or a list of them. Only a reply that starts with { or [ can be a call."""

from __future__ import annotations

import json
from typing import Any

from llmc.runtime.structured_output import lark_json
from llmc.runtime.tool_calls.base import ToolCallFormat, call_from_object, json_value, one_of_calls


class JsonFormat(ToolCallFormat):
    name = "json"
    start = ""
    end = None

    def find_start(self, buffer: str, before: str) -> tuple[int, int] | None:
        stripped = buffer.lstrip()
        if before or not stripped or stripped[0] not in "{[":
            return None
        return 0, len(buffer) - len(stripped)  # leading whitespace belongs to the call, not to content

    def hold(self, buffer: str, before: str) -> int:
        # Leading whitespace might still be followed by a JSON call: hold it until we know.
        return len(buffer) if not before and not buffer.strip() else 0

    def may_be_call(self, body: str) -> bool:
        # With no marker, any JSON reply opens a region: only one that begins like a call is one.
        compact = "".join(body.split())
        return any(head.startswith(compact) or compact.startswith(head) for head in ('{"name"', '[{"name"'))

    def parse_region(self, body: str) -> list[tuple[str, str]] | None:
        obj = json_value(body)
        items = obj if isinstance(obj, list) else [obj]
        calls = [call_from_object(item) for item in items]
        if not calls or any(c is None for c in calls):
            return None
        return [c for c in calls if c is not None]

    def render_call(self, name: str, arguments: dict[str, Any]) -> str:
        return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)

    def grammar(self, tools: list[dict[str, Any]]) -> str:
        return f"start: call\ncall: {lark_json(one_of_calls(tools, key='parameters'))}\n"
