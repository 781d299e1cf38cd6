"""Hermes / Qwen: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, possibly several."""

from __future__ import annotations

from typing import Any

from llmc.runtime.structured_output import lark_json
from llmc.runtime.tool_calls.base import ToolCallFormat, call_from_object, json_value, one_of_calls


class HermesFormat(ToolCallFormat):
    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"

    def parse_region(self, body: str) -> list[tuple[str, str]] | None:
        obj = json_value(body)
        call = call_from_object(obj)
        return [call] if call else None

    def grammar(self, tools: list[dict[str, Any]]) -> str:
        return f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: {lark_json(one_of_calls(tools))}\n'
