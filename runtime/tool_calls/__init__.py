"""Tool calling: each model family's output format, parsed into OpenAI tool_calls (streaming too)."""

from __future__ import annotations

from llmc.errors import BadInputError
from llmc.runtime.tool_calls.base import ContentEvent, ToolCall, ToolCallEvent, ToolCallFormat, ToolCallParser
from llmc.runtime.tool_calls.hermes import HermesFormat
from llmc.runtime.tool_calls.json_format import JsonFormat
from llmc.runtime.tool_calls.llama import LlamaFunctionFormat
from llmc.runtime.tool_calls.mistral import MistralFormat

__all__ = ["ContentEvent", "ToolCall", "ToolCallEvent", "ToolCallFormat", "ToolCallParser", "choose_format"]

FORMATS: dict[str, type[ToolCallFormat]] = {
    "hermes": HermesFormat,
    "mistral": MistralFormat,
    "llama": LlamaFunctionFormat,
    "json": JsonFormat,
}


def choose_format(name: str, chat_template: str | None) -> ToolCallFormat:
    """`name` from --tool-parser; "auto" reads the chat template for the family's markers."""
    if name != "auto":
        if name not in FORMATS:
            raise BadInputError(f"tool parser {name!r} is unknown; choose one of auto, {', '.join(FORMATS)}")
        return FORMATS[name]()
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return MistralFormat()
    if "<function=" in template:
        return LlamaFunctionFormat()
    if "<tool_call>" in template:
        return HermesFormat()
    if "tools" in template and '"parameters"' in template:
        return JsonFormat()  # Llama 3.1-style: the whole reply is {"name": ..., "parameters": ...}
    # Templates that know no tools get our injected system prompt, which asks for Hermes markers.
    return HermesFormat()
