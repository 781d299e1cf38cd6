"""Tokenizer, chat template and incremental detokenization for one artifact."""

from __future__ import annotations

import datetime
import json
import time
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HfTokenizer

from llmc.artifacts.manifest import TokenizerInfo
from llmc.artifacts.reader import Artifact
from llmc.artifacts.tokenizer_file import parse_tokenizer_json
from llmc.errors import BadArtifactError, BadInputError

REPLACEMENT_CHAR = "\ufffd"
# Tokens decoded again around the point of emission so that merges (e.g. a space folded into the
# next token, multi-byte characters split over tokens) come out right: vLLM's proven window.
_DETOKENIZE_CONTEXT = 5
# The longest a chat template may take to render one request. Real templates render a full
# context in milliseconds; one that loops for seconds over a request's data is refused rather
# than allowed to hold a worker thread (and the GIL) for longer.
TEMPLATE_RENDER_TIMEOUT_S = 10.0


def _utf8(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadArtifactError(f"artifact file {name} is not UTF-8 text ({exc}); rebuild the artifact") from exc


class Tokenizer:
    def __init__(self, tokenizer: HfTokenizer, info: TokenizerInfo, chat_template: str | None) -> None:
        self._tok = tokenizer
        self.info = info
        self.bos_id = tokenizer.token_to_id(info.bos_token) if info.bos_token else None
        self.eos_ids = frozenset(info.eos_token_ids)
        self.chat_template_source = chat_template
        self._template = _compile_template(chat_template) if chat_template else None
        self.source_json: str | None = None  # tokenizer.json's text, when made from an artifact

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> Tokenizer:
        """The artifact's tokenizer and chat template, made from their checksummed bytes."""
        info = artifact.manifest.tokenizer
        source = _utf8(artifact.read_verified(info.file), info.file)
        try:
            tok = parse_tokenizer_json(source)
        except ValueError as exc:
            raise BadArtifactError(f"tokenizer file {info.file} cannot be loaded: {exc}") from exc
        template = None
        if info.chat_template_file:
            template = _utf8(artifact.read_verified(info.chat_template_file), info.chat_template_file)
        made = cls(tok, info, template)
        made.source_json = source
        return made

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`, with BOS prepended when the model wants one and it is not there yet.

        encode_batch, because it releases the GIL while it tokenizes and `encode` does not: a few
        MB of text would otherwise stop every other thread (the event loop) for seconds.
        """
        ids: list[int] = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        if self.info.add_bos_token and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[Any] | None = None,
        max_chars: int | None = None,
    ) -> str:
        """The rendered chat; at most `max_chars` characters and
        TEMPLATE_RENDER_TIMEOUT_S seconds of rendering (checked at every piece of output)."""
        if self._template is None:
            raise BadInputError("this model has no chat template; use /v1/completions with a raw prompt")
        deadline = time.monotonic() + TEMPLATE_RENDER_TIMEOUT_S
        pieces: list[str] = []
        size = 0
        try:
            for piece in self._template.generate(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.info.bos_token or "",
                eos_token=self.info.eos_token or "",
            ):
                pieces.append(piece)
                size += len(piece)
                if max_chars is not None and size > max_chars:
                    raise _template_limit(f"the chat template renders these messages to over {max_chars} characters")
                if time.monotonic() > deadline:
                    raise _template_limit(
                        f"the chat template took over {TEMPLATE_RENDER_TIMEOUT_S} s on these messages"
                    )
        except TemplateError as exc:
            raise BadInputError(f"the chat template rejected these messages: {exc}", param="messages") from exc
        return "".join(pieces)


def _template_limit(message: str) -> BadInputError:
    return BadInputError(f"{message}; send fewer or shorter messages", param="messages")


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self._tok = tokenizer
        self.ids = list(prompt_ids[-_DETOKENIZE_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._tok.decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._tok.decode(self.ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return ""  # wait: an incomplete character or nothing new yet
        delta = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        return delta


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _compile_template(source: str) -> Any:
    # Templates come from model authors we do not know: render them sandboxed, with the helpers
    # Hugging Face templates expect (raise_exception, strftime_now, tojson that keeps Unicode).
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise BadArtifactError(f"the artifact's chat template does not compile: {exc}") from exc
