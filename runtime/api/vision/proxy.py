"""Proxy vision: image parts of a chat become text written by a vision model, before templating.

For each user message with `image_url` parts, every image is decoded (a data: URL) or fetched
(an http(s) URL, only with --vision-allow-remote), checked to really be an image of a bounded
size, and sent to the caption endpoint; the message becomes its text followed by one line per
image ("Image 1: <caption>"). Captions are cached by the image's sha256. A caption endpoint that
fails gives the request a 502 `upstream_error`, or with --vision-proxy-fallback text a note in
the caption's place; it never becomes a 500 or touches other requests.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

import msgspec
from prometheus_client import CollectorRegistry, Counter

from llmc.errors import BadInputError
from llmc.logs import get_logger
from llmc.runtime.api import protocol as p
from llmc.runtime.api.errors import HttpError
from llmc.runtime.api.vision import fetch
from llmc.runtime.api.vision.config import FALLBACK_NOTE, VisionConfig

log = get_logger("llmc.vision")

# The caption endpoint's whole JSON answer: a caption is a few hundred tokens; 1 MiB is far above
# any honest answer and bounds what a broken or hostile endpoint can make the server hold.
MAX_CAPTION_RESPONSE_BYTES = 1024 * 1024
# Characters of one caption written into the prompt; a longer one is cut (a small text model's
# context is a few thousand tokens, and eight images share it).
MAX_CAPTION_CHARS = 4000
# Tokens the caption endpoint may write per image: enough for a detailed description.
CAPTION_MAX_TOKENS = 512
# Captions in flight for one request, and for the whole server: a request with eight images gets
# them described in parallel, without one busy server swamping the caption endpoint.
CAPTIONS_PER_REQUEST = 4
CAPTIONS_PER_SERVER = 16
# Images sniffed by their first bytes; the declared type of a data: URL is not trusted.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
TEXT_ONLY = (
    "this model is text-only and the server has no caption model for images; send text only, or start "
    "the server with --vision-proxy URL (an OpenAI-compatible vision endpoint) to have images described"
)


class CaptionError(Exception):
    """The caption endpoint was down, slow, or answered something other than a caption."""


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message


class _Usage(msgspec.Struct):
    total_tokens: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Reply(msgspec.Struct):
    choices: list[_Choice]
    usage: _Usage | None = None


_REPLY = msgspec.json.Decoder(_Reply)


@dataclass(frozen=True)
class Image:
    data: bytes
    mime: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode()}"


def sniff(data: bytes) -> str | None:
    """The image type of `data` by its signature (PNG, JPEG, GIF, WebP), or None."""
    for signature, mime in _SIGNATURES:
        if data.startswith(signature):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def has_images(messages: list[p.ChatMessage]) -> bool:
    return any(isinstance(m.content, list) and any(part.type == "image_url" for part in m.content) for m in messages)


def refuse_images(messages: list[p.ChatMessage]) -> None:
    """Without --vision-proxy an image part is a clear 400, not a generic unsupported-part error."""
    if has_images(messages):
        raise BadInputError(TEXT_ONLY, param="messages")


def _too_large(number: int, limit: int) -> HttpError:
    return HttpError(413, f"image {number} is larger than this server's limit of {limit} bytes", param="messages")


def decode_data_url(url: str, number: int, max_bytes: int) -> Image:
    """A base64 data: URL holding a PNG, JPEG, GIF or WebP image of at most `max_bytes`."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise BadInputError(f"image {number}: a data: URL must be data:image/...;base64,<data>", param="messages")
    if len(payload) > 4 * (max_bytes // 3 + 1) + 4:  # refused before decoding megabytes for nothing
        raise _too_large(number, max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInputError(f"image {number}: the data: URL is not valid base64", param="messages") from exc
    if len(data) > max_bytes:
        raise _too_large(number, max_bytes)
    mime = sniff(data)
    if mime is None:
        raise BadInputError(f"image {number} is not a PNG, JPEG, GIF or WebP image", param="messages")
    return Image(data, mime)


async def fetch_image(url: str, number: int, config: VisionConfig) -> Image:
    """An http(s) image from a public address (--vision-allow-remote), redirects not followed."""
    if not config.allow_remote:
        raise BadInputError(
            f"image {number}: this server does not fetch image URLs (the operator enables it with "
            "--vision-allow-remote); send the image inline as a data:image/...;base64 URL",
            param="messages",
        )
    try:
        response = await fetch.request(
            "GET",
            url,
            headers={"Accept": "image/*"},
            max_bytes=config.max_image_bytes,
            timeout_s=config.timeout_s,
            address_ok=fetch.is_public,
        )
    except fetch.TooLargeError as exc:
        raise _too_large(number, config.max_image_bytes) from exc
    except fetch.FetchError as exc:
        raise BadInputError(f"image {number}: cannot fetch its URL: {exc}", param="messages") from exc
    if 300 <= response.status < 400:
        raise BadInputError(f"image {number}: its URL redirects, and redirects are not followed", param="messages")
    if response.status != 200:
        raise BadInputError(f"image {number}: its URL answered HTTP {response.status}", param="messages")
    mime = sniff(response.body)
    if mime is None:
        raise BadInputError(f"image {number}: its URL did not return a PNG, JPEG, GIF or WebP image", param="messages")
    return Image(response.body, mime)


class VisionProxy:
    """Captions images through the configured endpoint; one per server, shared by all requests."""

    def __init__(self, config: VisionConfig, registry: CollectorRegistry) -> None:
        self.config = config
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._server_slots = asyncio.Semaphore(CAPTIONS_PER_SERVER)
        self.captions = Counter("llmc_vision_captions", "Images captioned by the vision proxy", registry=registry)
        self.cache_hits = Counter(
            "llmc_vision_caption_cache_hits", "Images whose caption came from the cache", registry=registry
        )
        self.failures = Counter(
            "llmc_vision_caption_failures", "Images the caption endpoint failed to describe", registry=registry
        )
        self.caption_tokens = Counter(
            "llmc_vision_caption_tokens", "Tokens the caption endpoint reported using", registry=registry
        )
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._headers = headers

    async def rewrite(self, req: p.ChatCompletionRequest) -> tuple[p.ChatCompletionRequest, int | None]:
        """`req` with every image part replaced by its caption, and the caption tokens the endpoint
        reported for this request (None when it reports none)."""
        parts = [
            (i, part)
            for i, m in enumerate(req.messages)
            if isinstance(m.content, list)
            for part in m.content
            if part.type == "image_url"
        ]
        if not parts:
            return req, None
        if len(parts) > self.config.max_images:
            raise BadInputError(
                f"the request holds {len(parts)} images; this server describes at most {self.config.max_images}",
                param="messages",
            )
        for i, _ in parts:
            if req.messages[i].role != "user":
                raise BadInputError("images may only be sent in user messages", param="messages")
        started = time.perf_counter()
        images = await self._load([part for _, part in parts])
        captions, tokens = await self._describe(images)
        log.info(
            "vision.described",
            images=len(images),
            seconds=round(time.perf_counter() - started, 3),
            caption_tokens=tokens,
        )
        numbered = iter(enumerate(captions, start=1))
        messages = []
        for message in req.messages:
            if isinstance(message.content, list) and any(part.type == "image_url" for part in message.content):
                texts, lines = [], []
                for part in message.content:
                    if part.type == "image_url":
                        n, caption = next(numbered)
                        lines.append(self.config.format.format(n=n, caption=caption))
                    elif part.type == "text" and part.text is not None:
                        texts.append(part.text)
                    else:
                        raise BadInputError(f"content parts of type {part.type!r} are not supported", param="messages")
                text = "".join(texts)
                content = "\n\n".join([text, "\n".join(lines)]) if text else "\n".join(lines)
                message = msgspec.structs.replace(message, content=content)
            messages.append(message)
        return msgspec.structs.replace(req, messages=messages), tokens

    async def _load(self, parts: list[p.ContentPart]) -> list[Image]:
        """Decode or fetch every image (fetches in parallel); the first bad one fails the request."""

        async def load(number: int, part: p.ContentPart) -> Image:
            url = part.image_url.url if part.image_url is not None else None
            if not url:
                raise BadInputError(f'image {number} needs "image_url": {{"url": ...}}', param="messages")
            if url.startswith("data:"):
                return decode_data_url(url, number, self.config.max_image_bytes)
            if url.startswith(("http://", "https://")):
                return await fetch_image(url, number, self.config)
            raise BadInputError(f"image {number}: the URL must be a data: or http(s) URL", param="messages")

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(load(n, part)) for n, part in enumerate(parts, start=1)]
        except ExceptionGroup as group_error:  # the first failure is the answer; the rest were cancelled
            raise group_error.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _describe(self, images: list[Image]) -> tuple[list[str], int | None]:
        """One caption per image, in order; an image sent twice is described once."""
        request_slots = asyncio.Semaphore(CAPTIONS_PER_REQUEST)
        unique = {image.digest: image for image in images}
        captions: dict[str, str] = {}
        reported: list[int] = []

        async def describe(digest: str, image: Image) -> None:
            cached = self._cache.get(digest)
            if cached is not None:
                self._cache.move_to_end(digest)
                self.cache_hits.inc()
                captions[digest] = cached
                return
            async with request_slots, self._server_slots:
                try:
                    caption, tokens = await self._call(image)
                except CaptionError as exc:
                    self.failures.inc()
                    log.warning("vision.caption_failed", endpoint=self.config.url, reason=str(exc))
                    if self.config.fallback != "text":
                        raise HttpError(
                            502,
                            f"the image caption endpoint (--vision-proxy) failed: {exc}; retry later, or send the "
                            "request without images",
                            param="messages",
                            code="upstream_error",
                        ) from exc
                    captions[digest] = FALLBACK_NOTE  # not cached: the next request tries again
                    return
            self.captions.inc()
            if tokens is not None:
                reported.append(tokens)
                self.caption_tokens.inc(tokens)
            captions[digest] = caption
            self._remember(digest, caption)

        try:
            async with asyncio.TaskGroup() as group:
                for digest, image in unique.items():
                    group.create_task(describe(digest, image))
        except ExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        return [captions[image.digest] for image in images], (sum(reported) if reported else None)

    def _remember(self, digest: str, caption: str) -> None:
        self._cache[digest] = caption
        self._cache.move_to_end(digest)
        while len(self._cache) > self.config.cache_entries:
            self._cache.popitem(last=False)

    async def _call(self, image: Image) -> tuple[str, int | None]:
        """Ask the endpoint for one caption; anything but a well-formed answer is a CaptionError."""
        body = {
            "model": self.config.model or "default",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": self.config.prompt},
                        {"type": "image_url", "image_url": {"url": image.data_url()}},
                    ],
                }
            ],
            "max_tokens": CAPTION_MAX_TOKENS,
            "temperature": 0,
            "stream": False,
        }
        try:
            response = await fetch.request(
                "POST",
                self.config.url,
                body=msgspec.json.encode(body),
                headers=self._headers,
                max_bytes=MAX_CAPTION_RESPONSE_BYTES,
                timeout_s=self.config.timeout_s,
            )
        except fetch.FetchError as exc:
            raise CaptionError(str(exc)) from exc
        if response.status != 200:
            raise CaptionError(f"it answered HTTP {response.status}")
        try:
            reply = _REPLY.decode(response.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise CaptionError("its answer is not an OpenAI chat completion") from exc
        caption = (reply.choices[0].message.content or "").strip() if reply.choices else ""
        if not caption:
            raise CaptionError("its answer holds no caption")
        log.debug("vision.caption", digest=image.digest[:16], chars=len(caption))
        usage = reply.usage
        tokens = None
        if usage is not None:
            if usage.total_tokens is not None:
                tokens = usage.total_tokens
            elif usage.prompt_tokens is not None and usage.completion_tokens is not None:
                tokens = usage.prompt_tokens + usage.completion_tokens
        if tokens is not None and tokens < 0:
            tokens = None
        return caption[:MAX_CAPTION_CHARS], tokens


def with_caption_tokens(usage: p.Usage, caption_tokens: int | None) -> p.Usage:
    """The usage object, with the caption endpoint's tokens as `caption_tokens` when it reported them."""
    if caption_tokens is None:
        return usage
    return p.CaptionedUsage(**msgspec.structs.asdict(usage), caption_tokens=caption_tokens)
