"""Mistral: [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...] (v3), or
[TOOL_CALLS]name[ARGS]{...} repeated (v11 tokenizers). The region runs to the end of the output."""

from __future__ import annotations

import json
from typing import Any

from llmc.runtime.structured_output import lark_json
from llmc.runtime.tool_calls.base import ToolCallFormat, arguments_json, call_from_object, json_value, one_of_calls

_ARGS = "[ARGS]"


class MistralFormat(ToolCallFormat):
    name = "mistral"
    start = "[TOOL_CALLS]"
    end = None

    def parse_region(self, body: str) -> list[tuple[str, str]] | None:
        text = body.strip()
        if text.startswith("["):
            items = json_value(text)
            if not isinstance(items, list) or not items:
                return None
            calls = [call_from_object(item) for item in items]
            return None if any(c is None for c in calls) else [c for c in calls if c is not None]
        out = []
        for part in text.split(self.start):
            name, sep, args = part.partition(_ARGS)
            arguments = arguments_json(args.strip()) if sep else None
            if not name.strip() or arguments is None:
                return None
            out.append((name.strip(), arguments))
        return out

    def render_call(self, name: str, arguments: dict[str, Any]) -> str:
        return f"[TOOL_CALLS] {json.dumps([{'name': name, 'arguments': arguments}], ensure_ascii=False)}"

    def grammar(self, tools: list[dict[str, Any]]) -> str:
        schema = {"type": "array", "items": one_of_calls(tools), "minItems": 1, "maxItems": 1}
        return f'start: "[TOOL_CALLS] " calls\ncalls: {lark_json(schema)}\n'
