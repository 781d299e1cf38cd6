"""Llama's function tags: <function=name>{"arg": ...}</function>."""

from __future__ import annotations

import json
from typing import Any

from llmc.runtime.structured_output import lark_json
from llmc.runtime.tool_calls.base import ToolCallFormat, arguments_json, tool_schemas


class LlamaFunctionFormat(ToolCallFormat):
    name = "llama"
    start = "<function="
    end = "</function>"

    def parse_region(self, body: str) -> list[tuple[str, str]] | None:
        name, sep, args = body.partition(">")
        arguments = arguments_json(args.strip()) if sep else None
        if not name.strip() or arguments is None:
            return None
        return [(name.strip(), arguments)]

    def render_call(self, name: str, arguments: dict[str, Any]) -> str:
        return f"<function={name}>{json.dumps(arguments, ensure_ascii=False)}</function>"

    def grammar(self, tools: list[dict[str, Any]]) -> str:
        rules = []
        alternatives = []
        for index, (name, params) in enumerate(tool_schemas(tools)):
            alternatives.append(f"call{index}")
            rules.append(f"call{index}: {json.dumps(name + '>')} args{index}\nargs{index}: {lark_json(params)}")
        return f'start: "<function=" ({" | ".join(alternatives)}) "</function>"\n' + "\n".join(rules) + "\n"
