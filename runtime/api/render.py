"""OpenAI rendering of engine output: logprobs, streamed deltas, tool calls, usage, stream chunks.

Pure functions of the engine's outputs (and the tokenizer, to spell tokens); the routes and the
MCP loop render through here so both answer in exactly the same shapes.
"""

from __future__ import annotations

import codecs

import msgspec

from llmc.runtime.api import protocol as p
from llmc.runtime.sampling_params import TokenLogprob
from llmc.runtime.tokenizer import Tokenizer
from llmc.runtime.tool_calls import ContentEvent, ToolCall, ToolCallParser


def usage(prompt: int, completion: int, cached: int) -> p.Usage:
    """OpenAI's usage object; `cached`: prompt tokens the prefix cache served."""
    return p.Usage(prompt, completion, prompt + completion, p.PromptTokensDetails(cached_tokens=cached))


def tool_call_out(call: ToolCall) -> p.ToolCallOut:
    """A parsed tool call as a non-streamed message's `tool_calls` entry."""
    return p.ToolCallOut(id=call.id, function=p.FunctionCall(name=call.name, arguments=call.arguments))


def deltas(parser: ToolCallParser, text: str, finished: bool, cut: bool = False) -> list[p.Delta]:
    """Stream deltas for new text: content as it is known to be content; each tool call as one
    delta with its id and name, then one with its arguments (`cut`: the output hit max_tokens)."""
    events = parser.feed(text) + (parser.finish(cut) if finished else [])
    out = []
    for event in events:
        if isinstance(event, ContentEvent):
            out.append(p.Delta(content=event.text))
            continue
        call = event.call
        head = p.FunctionCallDelta(name=call.name, arguments="")
        out.append(p.Delta(tool_calls=[p.ToolCallDelta(index=event.index, id=call.id, type="function", function=head)]))
        body = p.FunctionCallDelta(arguments=call.arguments)
        out.append(p.Delta(tool_calls=[p.ToolCallDelta(index=event.index, function=body)]))
    return out


def joined_logprobs(head: p.CompletionLogprobs, tail: p.CompletionLogprobs) -> p.CompletionLogprobs:
    """An echoed prompt's logprobs followed by the completion's."""
    return p.CompletionLogprobs(
        tokens=head.tokens + tail.tokens,
        token_logprobs=head.token_logprobs + tail.token_logprobs,
        top_logprobs=head.top_logprobs + tail.top_logprobs,
        text_offset=head.text_offset + tail.text_offset,
    )


class Renderer:
    """Renders for one served model: spells tokens with its tokenizer, names it in every chunk."""

    def __init__(self, tokenizer: Tokenizer, model_name: str) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_chunk(
        self, request_id: str, created: int, choices: list[p.ChatChunkChoice], usage: p.Usage | None = None
    ) -> bytes:
        """One streamed chat event."""
        body = p.ChatCompletionChunk(
            id=request_id, created=created, model=self.model_name, choices=choices, usage=usage
        )
        return msgspec.json.encode(body)

    def chat_logprobs(self, logprobs: list[TokenLogprob]) -> p.ChatLogprobs:
        """`bytes` are each token's own (a piece of a character where the token is one), so that
        they join into the content's UTF-8 as OpenAI's do; `token` is its text as decoded alone."""
        spell = self.tokenizer.token_bytes
        content = []
        for lp in logprobs:
            top = [p.TopLogprob(self.token(t), v, list(spell(t))) for t, v in lp.top]
            content.append(p.ChatTokenLogprob(self.token(lp.token_id), lp.logprob, list(spell(lp.token_id)), top))
        return p.ChatLogprobs(content=content)

    def text_offsets(self, ids: list[int], offset: int) -> list[int]:
        """Where each token starts in the text, in characters from `offset`: a token that ends
        inside a character adds none, the one that completes it adds it (decoding each token
        alone counted a U+FFFD for each part)."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        offsets = []
        for token_id in ids:
            offsets.append(offset)
            offset += len(decoder.decode(self.tokenizer.token_bytes(token_id)))
        return offsets

    def completion_logprobs(self, logprobs: list[TokenLogprob], offset: int) -> p.CompletionLogprobs:
        return p.CompletionLogprobs(
            tokens=[self.token(lp.token_id) for lp in logprobs],
            token_logprobs=[lp.logprob for lp in logprobs],
            top_logprobs=[{self.token(t): v for t, v in lp.top} for lp in logprobs],
            text_offset=self.text_offsets([lp.token_id for lp in logprobs], offset),
        )

    def echo_logprobs(self, ids: list[int], prompt_logprobs: list[TokenLogprob | None] | None) -> p.CompletionLogprobs:
        """The prompt's own tokens, as OpenAI echoes them: the first has no logprob."""
        entries = prompt_logprobs or [None] * len(ids)
        tokens = [self.token(t) for t in ids]
        offsets = self.text_offsets(ids, 0)
        return p.CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[None if lp is None else lp.logprob for lp in entries],
            top_logprobs=[None if lp is None else {self.token(t): v for t, v in lp.top} for lp in entries],
            text_offset=offsets,
        )
