"""What a chat request asks of the output: tools for the template, a tool-call parser, a grammar."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmc.errors import BadInputError
from llmc.runtime.api.protocol import ChatCompletionRequest, ChatMessage
from llmc.runtime.api.requests import check_depth
from llmc.runtime.structured_output import GrammarCompiler
from llmc.runtime.tool_calls import ToolCallFormat
from llmc.runtime.tool_calls.base import strict_schema

MAX_TOOLS = 128  # far above any real tool list; bounds template size and grammar construction
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True)
class ChatPlan:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None  # handed to the chat template
    tool_format: ToolCallFormat | None  # parse the output for calls with this, if set
    grammar: str | None  # constrain decoding to this, if set
    forced: bool = False  # tool_choice required or a named function: the whole output is one call


def plan_chat(
    req: ChatCompletionRequest,
    tool_format: ToolCallFormat,
    template_renders_tools: bool,
    grammars: Callable[[], GrammarCompiler],
) -> ChatPlan:
    if not req.messages:
        raise BadInputError("messages must not be empty", param="messages")
    check_depth(req.tools, "tools")
    check_depth(req.tool_choice, "tool_choice")
    check_depth(req.response_format, "response_format")
    for message in req.messages:
        check_depth(message.tool_calls, "messages")
    tools = _validated_tools(req.tools)
    choice = _tool_choice(req.tool_choice, tools)
    use_tools = bool(tools) and choice != "none"
    messages = [_message_dict(m, tool_format, template_renders_tools) for m in req.messages]
    if use_tools and not template_renders_tools:
        prompt = tool_format.system_prompt(tools)
        if messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    grammar = _response_format_grammar(req.response_format, grammars)
    if use_tools and choice != "auto":
        if grammar is not None:
            raise BadInputError("response_format cannot be combined with a forced tool_choice", param="tool_choice")
        forced = tools if choice == "required" else [t for t in tools if t["function"]["name"] == choice]
        grammar = grammars().from_lark(tool_format.grammar(forced), param="tool_choice")
    return ChatPlan(
        messages=messages,
        tools=tools if use_tools else None,
        tool_format=tool_format if use_tools else None,
        grammar=grammar,
        forced=use_tools and choice != "auto",
    )


def _validated_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    if not tools:
        return []
    if len(tools) > MAX_TOOLS:
        raise BadInputError(f"at most {MAX_TOOLS} tools", param="tools")
    for tool in tools:
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict):
            raise BadInputError('each tool must be {"type": "function", "function": {...}}', param="tools")
        if not isinstance(function.get("name"), str) or not _TOOL_NAME.match(function["name"]):
            raise BadInputError("a tool's function name must be 1-64 letters, digits, _ . or -", param="tools")
        if not isinstance(function.get("parameters", {}), dict):
            raise BadInputError("a tool's parameters must be a JSON schema object", param="tools")
        if function.get("strict") not in (None, True, False):
            raise BadInputError("a tool's strict must be true or false", param="tools")
        if function.get("strict") is True:
            strict_schema(function.get("parameters") or {})  # refuses a strict schema that allows extra keys
    return tools


def _tool_choice(choice: str | dict[str, Any] | None, tools: list[dict[str, Any]]) -> str:
    """'none', 'auto', 'required', or the name of the function the model must call."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise BadInputError("tool_choice must be none, auto, required or a named function", param="tool_choice")
        if choice == "required" and not tools:
            raise BadInputError("tool_choice required needs tools", param="tool_choice")
        return choice
    function = choice.get("function")
    name = function.get("name") if choice.get("type") == "function" and isinstance(function, dict) else None
    if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools}:
        raise BadInputError("tool_choice names a function that is not in tools", param="tool_choice")
    return name


def _response_format_grammar(fmt: dict[str, Any] | None, grammars: Callable[[], GrammarCompiler]) -> str | None:
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return grammars().from_json_schema(None, param="response_format")
    if kind == "json_schema":
        spec = (fmt or {}).get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadInputError("response_format.json_schema.schema must be a JSON schema", param="response_format")
        return grammars().from_json_schema(schema, param="response_format")
    raise BadInputError("response_format type must be text, json_object or json_schema", param="response_format")


def _message_dict(message: ChatMessage, tool_format: ToolCallFormat, template_renders_tools: bool) -> dict[str, Any]:
    if message.role not in CHAT_ROLES:
        raise BadInputError(
            f"message role {message.role!r} is not one of {', '.join(sorted(CHAT_ROLES))}", param="messages"
        )
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise BadInputError(f"content parts of type {part.type!r} are not supported", param="messages")
            texts.append(part.text)
        content = "".join(texts)
    out: dict[str, Any] = {"role": message.role, "content": content or ""}
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id
        if not template_renders_tools:
            # A template without tools knows no "tool" role either: hand the result back as the
            # user turn Hermes-style models expect.
            out = {"role": "user", "content": f"<tool_response>\n{out['content']}\n</tool_response>"}
    if message.tool_calls:
        calls = [_template_call(c) for c in message.tool_calls]
        out["tool_calls"] = calls
        if not template_renders_tools:
            # The template would drop the calls: show the model what it called, in its own format.
            rendered = "".join(
                tool_format.render_call(c["function"]["name"], c["function"]["arguments"]) for c in calls
            )
            out["content"] = (out["content"] + rendered) if out["content"] else rendered
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sends arguments as JSON text; templates expect an object."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadInputError("an assistant tool call needs function.name", param="messages")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments else {}
        except RecursionError as exc:  # thousands of brackets: deeper than the parser recurses
            raise BadInputError("a tool call's arguments nest JSON too deeply; flatten them", param="messages") from exc
        except ValueError as exc:
            raise BadInputError("a tool call's arguments are not valid JSON", param="messages") from exc
        check_depth(arguments, "messages")  # the template walks them recursively
    return {"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}}
