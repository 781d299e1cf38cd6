"""Tokenizer, chat template and incremental detokenization for one artifact."""

from __future__ import annotations

import datetime
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

from jinja2 import TemplateError
from jinja2.runtime import Context
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment
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
# The largest string or list a template may build with `*`, and the widest a width argument
# (center, indent, a %-format's field) may ask for: a real chat template repeats a few spaces or
# dashes; a stranger's `'a' * 10**11` would allocate before any output limit could look at it.
TEMPLATE_MAX_BUILT = 1 << 22
# The largest exponent of `**` on numbers other than 0, 1 and -1 (2 ** 2 ** 40 never finishes).
TEMPLATE_MAX_EXPONENT = 1024


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
        self._bytes_view: Any = None  # token_bytes' llguidance tokenizer, made on first use
        self._bytes_lock = threading.Lock()

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

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for. decode() of one token cannot say them where the
        token is part of a UTF-8 character (byte-level BPE splits emoji and CJK over tokens): it
        gives U+FFFD. The byte view is llguidance's (every tokenizer kind tokenizers has), made on
        first use, ~0.2 s for a 49k vocabulary; without the tokenizer's JSON, decode()'s bytes."""
        if self.source_json is None or not 0 <= token_id < self.vocab_size:
            return self.decode([token_id], skip_special_tokens=False).encode()
        with self._bytes_lock:
            if self._bytes_view is None:
                import llguidance

                eos = min(self.eos_ids) if self.eos_ids else None
                self._bytes_view = llguidance.LLTokenizer(self.source_json, n_vocab=self.vocab_size, eos_token=eos)
        view: Any = self._bytes_view
        return bytes(view.decode_bytes([token_id]))

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
        _RENDER.deadline = deadline  # loops check it too: one that prints nothing yields no piece
        try:
            for piece in self._template.generate(
                messages=_guarded(messages),
                tools=_guarded(tools),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.info.bos_token or "",
                eos_token=self.info.eos_token or "",
            ):
                pieces.append(piece)
                size += len(piece)
                if max_chars is not None and size > max_chars:
                    raise _template_limit(f"the chat template renders these messages to over {max_chars} characters")
                _check_deadline()
        except _TemplateTimeoutError as exc:
            raise _template_limit(
                f"the chat template took over {TEMPLATE_RENDER_TIMEOUT_S} s on these messages"
            ) from exc
        except TemplateError as exc:
            raise BadInputError(f"the chat template rejected these messages: {exc}", param="messages") from exc
        except Exception as exc:  # the template's own failure on this data: 1 // 0, deep recursion, MemoryError
            raise BadInputError(
                f"the chat template failed on these messages ({type(exc).__name__}: {exc})", param="messages"
            ) from exc
        finally:
            _RENDER.deadline = None
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


# The render under way on this thread: its deadline, read by the loops over its data.
_RENDER = threading.local()


class _TemplateTimeoutError(TemplateError):
    """The render ran past TEMPLATE_RENDER_TIMEOUT_S."""


def _check_deadline() -> None:
    deadline = getattr(_RENDER, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _TemplateTimeoutError("over time")


class _GuardedList(list[Any]):
    """A list whose iteration checks the render's deadline: nested loops over a request's data
    print nothing, so the per-piece check alone never saw them."""

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            _check_deadline()
            yield item


class _GuardedDict(dict[Any, Any]):
    """A dict whose iteration (keys, values, items) checks the render's deadline."""

    def __iter__(self) -> Iterator[Any]:
        return iter(_GuardedList(super().keys()))

    def keys(self) -> Any:
        return _GuardedList(super().keys())

    def values(self) -> Any:
        return _GuardedList(super().values())

    def items(self) -> Any:
        return _GuardedList(super().items())


class _GuardedStr(str):
    """A string whose iteration, character by character, checks the render's deadline."""

    __slots__ = ()

    def __iter__(self) -> Iterator[str]:
        for char in super().__iter__():
            _check_deadline()
            yield char


def _guarded(value: Any) -> Any:
    """A request's messages or tools with every list, dict and string guarded (their depth is
    bounded by the API, api/requests.py check_depth)."""
    if isinstance(value, dict):
        return _GuardedDict((key, _guarded(item)) for key, item in value.items())
    if isinstance(value, list | tuple):
        return _GuardedList(_guarded(item) for item in value)
    if isinstance(value, str):
        return _GuardedStr(value)
    return value


class _GuardedRange:
    """jinja's sandboxed range (at most MAX_RANGE items), iterated with the deadline checked:
    two nested loops of 10^5 printed nothing for hours."""

    def __init__(self, *args: int) -> None:
        self._range = range(*args)
        if len(self._range) > MAX_RANGE:
            raise TemplateError(f"range() of more than {MAX_RANGE} items")

    def __iter__(self) -> Iterator[int]:
        for item in self._range:
            _check_deadline()
            yield item

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index: int) -> int:
        return self._range[index]


def _built_size(left: Any, right: Any) -> int:
    """How many items `left * right` makes where one side is a sequence and the other an int."""
    for sequence, times in ((left, right), (right, left)):
        if isinstance(sequence, str | list | tuple) and isinstance(times, int):
            return len(sequence) * max(times, 0)
    return 0


def _bounded_width(width: Any) -> Any:
    if isinstance(width, int) and width > TEMPLATE_MAX_BUILT:
        raise TemplateError(f"a width of more than {TEMPLATE_MAX_BUILT}")
    return width


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja's immutable sandbox that also bounds what one expression can allocate (`*`, `**`,
    widths) and how long loops over a request's data or range() may run."""

    intercepted_binops = frozenset({"*", "**"})  # also keeps jinja from folding them when compiling

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*" and _built_size(left, right) > TEMPLATE_MAX_BUILT:
            raise TemplateError(f"`*` would build more than {TEMPLATE_MAX_BUILT} items")
        huge = operator == "**" and isinstance(right, int | float) and abs(right) > TEMPLATE_MAX_EXPONENT
        if huge and not (isinstance(left, int | float) and abs(left) in (0, 1)):
            raise TemplateError(f"`**` with an exponent above {TEMPLATE_MAX_EXPONENT}")
        return super().call_binop(context, operator, left, right)


def _center(value: str, width: int = 80) -> str:
    return str(value).center(_bounded_width(width))


def _indent(value: str, width: Any = 4, first: bool = False, blank: bool = False) -> str:
    from jinja2.filters import do_indent

    return do_indent(value, _bounded_width(width), first, blank)


_FORMAT_FIELD_WIDTH = re.compile(r"%[-#0 +]*(\d+)|\.(\d+)")


def _format(value: str, *args: Any, **kwargs: Any) -> str:
    from jinja2.filters import do_format

    for match in _FORMAT_FIELD_WIDTH.finditer(str(value)):
        _bounded_width(int(match.group(1) or match.group(2)))
    return do_format(value, *args, **kwargs)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _compile_template(source: str) -> Any:
    # Templates come from model authors we do not know: render them sandboxed, with the helpers
    # Hugging Face templates expect (raise_exception, strftime_now, tojson that keeps Unicode).
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _GuardedRange
    env.filters["tojson"] = _tojson
    env.filters["center"] = _center
    env.filters["indent"] = _indent
    env.filters["format"] = _format
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise BadArtifactError(f"the artifact's chat template does not compile: {exc}") from exc
    except RecursionError as exc:  # thousands of nested blocks or parentheses
        raise BadArtifactError("the artifact's chat template nests too deeply to compile") from exc
