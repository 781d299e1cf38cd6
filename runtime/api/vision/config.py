"""The settings of `llmc run --vision-proxy URL`: checked before the model loads.

A text-only model answers questions about images through a second, vision-capable model behind
an OpenAI-compatible chat endpoint: each image is captioned there and the user's message is
rewritten into text before the chat template is applied (docs/user-guide.md, "Images").
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from urllib.parse import urlsplit

from llmc.errors import BadInputError

DEFAULT_PROMPT = "Describe this image in detail. Transcribe any text it contains."
# How a caption is written into the user's message: {n} is the image's number in the request
# (1, 2, ... across all messages, in order), {caption} what the vision model said.
DEFAULT_FORMAT = "Image {n}: {caption}"
FORMAT_FIELDS = frozenset({"n", "caption"})
# What an image that could not be described becomes with --vision-proxy-fallback text.
FALLBACK_NOTE = "[image could not be described]"
FALLBACKS = ("error", "text")  # error: the request fails with 502; text: FALLBACK_NOTE instead
# A vision model on a CPU takes tens of seconds for a long caption; past this the endpoint is
# treated as down (the operator raises it with --vision-proxy-timeout for slow hardware).
DEFAULT_TIMEOUT_S = 60.0
# Images per request: each costs a call to the caption endpoint; a chat that refers to more than
# a handful of images at once is not what a small text model can use anyway.
MAX_IMAGES = 8
# Bytes of one decoded image: a phone photo is 2-5 MB; the request body (runtime/api/http.py,
# 8 MiB) holds one such image as base64 in any case.
MAX_IMAGE_BYTES = 5 * 1024 * 1024
# Captions kept by image hash: each at most MAX_CAPTION_CHARS (4 kB), so the cache stays a few MB.
CACHE_ENTRIES = 1024


@dataclass(frozen=True)
class VisionConfig:
    url: str  # the caption endpoint's chat-completions URL (…/v1/chat/completions)
    model: str | None = None  # the `model` sent to it; None: "default" (llama.cpp ignores it)
    prompt: str = DEFAULT_PROMPT
    format: str = DEFAULT_FORMAT
    fallback: str = "error"
    allow_remote: bool = False  # fetch http(s) image URLs (public addresses only)
    timeout_s: float = DEFAULT_TIMEOUT_S
    api_key: str | None = None  # sent as `Authorization: Bearer` to the caption endpoint
    max_images: int = MAX_IMAGES
    max_image_bytes: int = MAX_IMAGE_BYTES
    cache_entries: int = CACHE_ENTRIES


def chat_url(url: str) -> str:
    """The chat-completions URL of `url`: a base like http://host:8080/v1 gets /chat/completions."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadInputError(f"--vision-proxy {url!r} must be an http:// or https:// URL")
    if parts.username or parts.password:
        raise BadInputError("--vision-proxy must not hold a user or password; use --vision-proxy-api-key")
    if parts.path.rstrip("/").endswith("/chat/completions"):
        return url
    return url.rstrip("/") + "/chat/completions"


def check_format(template: str) -> str:
    """Only {n} and {caption} may appear: no attribute or index lookups on them."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        template.format(n=1, caption="x")
    except (ValueError, IndexError, KeyError) as exc:
        raise BadInputError(f"--vision-proxy-format {template!r} is not a valid format: {exc}") from exc
    if "caption" not in fields or not set(fields) <= FORMAT_FIELDS:
        raise BadInputError(
            f"--vision-proxy-format {template!r} must hold {{caption}} and may hold {{n}}, nothing else in braces"
        )
    return template


def vision_config(
    url: str,
    *,
    model: str | None = None,
    prompt: str | None = None,
    format: str | None = None,
    fallback: str = "error",
    allow_remote: bool = False,
    timeout_s: float | None = None,
    api_key: str | None = None,
) -> VisionConfig:
    """A checked VisionConfig; a mistake is a BadInputError naming the flag (exit 2)."""
    if fallback not in FALLBACKS:
        raise BadInputError(f"--vision-proxy-fallback must be one of {', '.join(FALLBACKS)}")
    if prompt is not None and not prompt.strip():
        raise BadInputError("--vision-proxy-prompt must not be empty")
    if timeout_s is not None and not timeout_s > 0:
        raise BadInputError("--vision-proxy-timeout must be a positive number of seconds")
    return VisionConfig(
        url=chat_url(url),
        model=model,
        prompt=prompt if prompt is not None else DEFAULT_PROMPT,
        format=check_format(format if format is not None else DEFAULT_FORMAT),
        fallback=fallback,
        allow_remote=allow_remote,
        timeout_s=timeout_s if timeout_s is not None else DEFAULT_TIMEOUT_S,
        api_key=api_key,
    )
