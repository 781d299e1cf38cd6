"""Validate decoded OpenAI requests and turn them into prompt ids and SamplingParams."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llmc.errors import BadInputError
from llmc.runtime.api.errors import HttpError
from llmc.runtime.api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.tokenizer import Tokenizer

# Bounds on request fields, so no request can make the server do unbounded work.
MAX_STOP_SEQUENCES = 16  # OpenAI allows 4; more is harmless, unbounded is not
MAX_STOP_CHARS = 256
MAX_N = 16  # choices per request: each is a full sequence in the batch
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_STOP_TOKEN_IDS = 1024  # far above any model's special tokens; bounds the per-step membership set
# Free-form JSON in a request (tools, tool_choice, response_format, tool calls) may nest this deep:
# real tool schemas nest a handful of levels; deeper values would only exercise recursion in the
# template renderer and the grammar compiler.
MAX_JSON_DEPTH = 64
# Temperatures below this sample greedily, as in vLLM (its _SAMPLING_EPS): dividing float32 logits
# by 1e-39 overflows them to inf, and anything this cold is argmax in all but name.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 2.0  # OpenAI's documented range is [0, 2]
# repetition_penalty divides (or multiplies) the logits of seen tokens: near 0 it overflows them and
# beyond a factor of 100 it forces or forbids repeats outright, which is no longer a penalty.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 2.0
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty: OpenAI's documented range is [-2, 2]
MAX_LOGIT_BIAS = 100.0  # OpenAI's documented range is [-100, 100]
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")  # ASCII digits only: str.isdigit() also takes "²"
# Seeds are 64-bit integers, signed or not; runtime/sequence.py maps them into numpy's 0..2**64-1.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1

_PATH_RE = re.compile(r"at `\$\.?([^`\[.]*)")
_MISSING_RE = re.compile(r"missing required field `([^`]*)`")


def validation_param(message: str) -> str | None:
    """msgspec says '... - at `$.messages[0].content`'; OpenAI's `param` is the top-level field."""
    match = _PATH_RE.search(message)
    if match:
        return match.group(1) or None
    missing = _MISSING_RE.search(message)
    return missing.group(1) if missing else None


def _unsupported(field: str, issue: str) -> BadInputError:
    return BadInputError(f"`{field}` is not supported by llmc yet ({issue})", param=field)


def _logprobs(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    """None for no logprobs, else how many alternatives to report per token."""
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs is not None and not isinstance(req.logprobs, bool):  # the field is shared with completions
            raise BadInputError(
                "logprobs is true or false for chat completions; ask for alternatives with top_logprobs",
                param="logprobs",
            )
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise BadInputError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
        if not req.logprobs:
            if req.top_logprobs:
                raise BadInputError("top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        return req.top_logprobs or 0
    if req.logprobs is None or req.logprobs is False:
        return None
    if req.logprobs is True or not 0 <= int(req.logprobs) <= MAX_TOP_LOGPROBS:
        raise BadInputError(f"logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}", param="logprobs")
    return int(req.logprobs)


def _range(value: float, low: float, high: float, name: str) -> None:
    """Also refuses NaN, which compares false with everything."""
    if not low <= value <= high:
        raise BadInputError(f"{name} must be between {low:g} and {high:g}", param=name)


def check_depth(value: Any, param: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse free-form JSON nested deeper than `limit` (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            raise BadInputError(f"{param} is nested more than {limit} levels deep", param=param)
        stack.extend((child, depth + 1) for child in children)


def sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    defaults: dict[str, Any],
    max_tokens_default: int,
    max_tokens: int | None,
    vocab_size: int,
) -> list[SamplingParams]:
    """One SamplingParams per requested choice (`n`); choice i of a seeded request uses seed + i."""
    temperature = req.temperature if req.temperature is not None else defaults["temperature"]
    top_p = req.top_p if req.top_p is not None else defaults["top_p"]
    top_k = req.top_k if req.top_k is not None else defaults["top_k"]
    min_p = req.min_p if req.min_p is not None else defaults.get("min_p", 0.0)
    repetition_penalty = (
        req.repetition_penalty if req.repetition_penalty is not None else defaults.get("repetition_penalty", 1.0)
    )
    _range(temperature, 0.0, MAX_TEMPERATURE, "temperature")
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0
    if not 0.0 < top_p <= 1.0:
        raise BadInputError("top_p must be in (0, 1]", param="top_p")
    if top_k == -1:
        top_k = 0  # vLLM's spelling of "no top-k"
    if top_k < 0:
        raise BadInputError("top_k must be >= 0 (or -1 for no cut)", param="top_k")
    _range(min_p, 0.0, 1.0, "min_p")
    _range(req.presence_penalty, -MAX_PENALTY, MAX_PENALTY, "presence_penalty")
    _range(req.frequency_penalty, -MAX_PENALTY, MAX_PENALTY, "frequency_penalty")
    _range(repetition_penalty, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY, "repetition_penalty")
    if not 1 <= req.n <= MAX_N:
        raise BadInputError(f"n must be between 1 and {MAX_N}", param="n")
    if max_tokens is not None and max_tokens < 1:
        raise BadInputError("max_tokens must be at least 1", param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise BadInputError(
            f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings of at most {MAX_STOP_CHARS} characters",
            param="stop",
        )
    if req.seed is not None and not _SEED_MIN <= req.seed <= _SEED_MAX - MAX_N:
        raise BadInputError("seed is out of the 64-bit range", param="seed")
    stop_ids = req.stop_token_ids or []
    if len(stop_ids) > MAX_STOP_TOKEN_IDS:
        raise BadInputError(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids", param="stop_token_ids")
    if any(not 0 <= t < vocab_size for t in stop_ids):
        raise BadInputError("stop_token_ids holds an id outside the vocabulary", param="stop_token_ids")
    bias = _logit_bias(req.logit_bias, vocab_size)
    logprobs = _logprobs(req)
    return [
        SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else max_tokens_default,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            min_p=float(min_p),
            presence_penalty=float(req.presence_penalty),
            frequency_penalty=float(req.frequency_penalty),
            repetition_penalty=float(repetition_penalty),
            logit_bias=bias,
            seed=None if req.seed is None else req.seed + choice,
            stop=tuple(stop),
            stop_token_ids=frozenset(stop_ids),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
        )
        for choice in range(req.n)
    ]


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise BadInputError(f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} entries", param="logit_bias")
    out = []
    for key, value in bias.items():
        if not _TOKEN_ID_KEY.fullmatch(key) or not int(key) < vocab_size:
            raise BadInputError(f"logit_bias key {key[:20]!r} is not a token id of this model", param="logit_bias")
        _range(value, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS, "logit_bias")
        out.append((int(key), float(value)))
    return tuple(sorted(out))


def completion_prompt(req: CompletionRequest, tokenizer: Tokenizer) -> list[int]:
    if req.suffix:
        raise _unsupported("suffix", "no llmc model does fill-in-the-middle yet")
    prompt = req.prompt
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = [int(t) for t in prompt]
        if any(not 0 <= t < tokenizer.vocab_size for t in ids):
            raise BadInputError("prompt holds a token id outside the vocabulary", param="prompt")
        return ids
    if not prompt:
        raise BadInputError("prompt must not be empty", param="prompt")
    if all(isinstance(t, str) for t in prompt) or all(isinstance(t, list) for t in prompt):
        raise _unsupported("prompt", "a batch of several prompts in one request")
    raise BadInputError("prompt must be a string or a list of token ids", param="prompt")


# ---- request caps: sizes bounded before any work is done on them ---------------------------
# A token of any tokenizer we know spans a handful of characters on average and rarely more than
# a few dozen (long runs of spaces or symbols), so a request with more than this many characters
# per token of context cannot fit the model anyway. The factor is generous on purpose: the context
# length decides what is served; this cap only stops the server tokenizing megabytes to say so.
CHARS_PER_CONTEXT_TOKEN = 32
# Every chat template renders at least one token (a role marker) per message, so a chat with
# more messages than the context holds tokens can never be served.
MESSAGES_PER_CONTEXT_TOKEN = 1
# The rendered chat may add role markers, tool descriptions and a system prompt around the
# messages' own text: allow it this many times the request's character cap before giving up.
RENDER_OUTPUT_FACTOR = 4


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold; derived from the context length, max_chars overridable."""

    max_chars: int  # characters of text: a prompt, or a chat's message contents and tool calls
    max_messages: int
    max_token_ids: int  # token ids in a /detokenize request

    @classmethod
    def for_context(cls, max_model_len: int, max_chars: int | None = None) -> RequestLimits:
        return cls(
            max_chars=max_chars if max_chars is not None else CHARS_PER_CONTEXT_TOKEN * max_model_len,
            max_messages=MESSAGES_PER_CONTEXT_TOKEN * max_model_len,
            max_token_ids=max_model_len,
        )

    @property
    def max_rendered_chars(self) -> int:
        return RENDER_OUTPUT_FACTOR * self.max_chars


def _too_large(what: str, limit: int, param: str, hint: str) -> HttpError:
    return HttpError(413, f"{what} is over this server's limit of {limit}; {hint}", param=param)


def check_text_cap(text: str, limits: RequestLimits, param: str = "prompt") -> None:
    if len(text) > limits.max_chars:
        raise _too_large(
            f"the {param} has {len(text)} characters, which",
            limits.max_chars,
            param,
            "this model's context could not hold it (the operator sets --max-request-chars)",
        )


def check_messages_cap(messages: list[ChatMessage], limits: RequestLimits) -> None:
    """Bound a chat's message count and characters before it is planned, rendered or tokenized."""
    if len(messages) > limits.max_messages:
        raise _too_large(
            f"the chat has {len(messages)} messages, which",
            limits.max_messages,
            "messages",
            "this model's context could not hold them; send fewer messages",
        )
    chars = 0
    for message in messages:
        content = message.content
        if isinstance(content, str):
            chars += len(content)
        elif content is not None:
            chars += sum(len(part.text or "") for part in content)
        for call in message.tool_calls or ():
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            chars += len(arguments) if isinstance(arguments, str) else 0
    if chars > limits.max_chars:
        raise _too_large(
            f"the messages hold {chars} characters, which",
            limits.max_chars,
            "messages",
            "this model's context could not hold them (the operator sets --max-request-chars)",
        )


def check_token_ids_cap(ids: list[int], limits: RequestLimits, param: str) -> None:
    if len(ids) > limits.max_token_ids:
        raise _too_large(
            f"{param} holds {len(ids)} token ids, which",
            limits.max_token_ids,
            param,
            "more than this model's context length; send fewer",
        )


# The longest a cache_salt may be: salts are secrets like API keys, a few dozen characters.
MAX_CACHE_SALT_CHARS = 256


def cache_salt(req: ChatCompletionRequest | CompletionRequest, key_salt: str | None) -> str | None:
    """The prefix-cache salt of a request: its own `cache_salt`, joined with the API key's salt
    when the server isolates the cache per key (--prefix-cache-isolation key)."""
    salt = req.cache_salt
    if salt is not None and not 0 < len(salt) <= MAX_CACHE_SALT_CHARS:
        raise BadInputError(f"cache_salt must be 1 to {MAX_CACHE_SALT_CHARS} characters", param="cache_salt")
    if key_salt is None:
        return salt
    return key_salt if salt is None else f"{key_salt}\0{salt}"
