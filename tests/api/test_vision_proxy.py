"""Issue 23: proxy vision (`llmc run --vision-proxy URL`): a text-only model answers about images.

A stub caption endpoint (tests/api/caption_server.py) stands in for the vision model; the real
openai SDK is the client. That the rewritten prompt reaches the model is checked through the
engine's own numbers: the chat's prompt_tokens and /tokenize's ids equal those of the text the
message should have become.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from llmc.builder.build import BuildOptions, build
from llmc.errors import BadInputError
from llmc.runtime.api import protocol as p
from llmc.runtime.api.errors import HttpError
from llmc.runtime.api.vision import fetch
from llmc.runtime.api.vision.config import FALLBACK_NOTE, chat_url, check_format, vision_config
from llmc.runtime.api.vision.proxy import VisionProxy, decode_data_url
from llmc.runtime.server import ServeConfig, vision_settings
from tests.api.caption_server import CAPTION_USAGE, CaptionStub, caption_of, caption_server, data_url, png
from tests.conftest import make_tiny_llama
from tests.server import free_port, post_openai_error, running_server

MODEL = "tiny"
# The caption endpoint's deadline in these tests: far above the stub's answer time (milliseconds),
# far below the "slow" stub's SLOW_S, so a slow endpoint is reported within a few seconds.
CAPTION_TIMEOUT_S = 4.0
SLOW_S = 8.0
CAPTION_MODEL = "stub-vlm"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama, with room for a few captions (its byte-level tokenizer is wordy)."""
    source = make_tiny_llama(tmp_path_factory.mktemp("vision-src") / "llama", max_position_embeddings=1024)
    out = tmp_path_factory.mktemp("vision") / "tiny"
    build(BuildOptions(model=str(source), gguf_file=None, weights=None, output=out, name=MODEL))
    return out


@pytest.fixture(scope="module")
def stub() -> Iterator[CaptionStub]:
    with caption_server() as stub:
        yield stub


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vision-log") / "server.log"


@pytest.fixture(scope="module")
def base(tiny: Path, stub: CaptionStub, server_log: Path) -> Iterator[str]:
    """A server describing images through the stub, failing requests whose captions fail (the default)."""
    flags = ["--vision-proxy", stub.url, "--vision-proxy-model", CAPTION_MODEL]
    with running_server(tiny, *flags, "--vision-proxy-timeout", str(CAPTION_TIMEOUT_S), log=server_log) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> OpenAI:
    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(autouse=True)
def stub_behaves(stub: CaptionStub) -> Iterator[None]:
    stub.mode = "ok"
    yield
    stub.mode = "ok"


def _image_message(text: str, *labels: bytes) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts += [{"type": "image_url", "image_url": {"url": data_url(png(label))}} for label in labels]
    return {"role": "user", "content": parts}


def _tokens(base: str, messages: list[dict[str, Any]]) -> list[int]:
    response = httpx.post(f"{base}/tokenize", json={"model": MODEL, "messages": messages}, timeout=60)
    assert response.status_code == 200, response.text
    tokens: list[int] = response.json()["tokens"]
    return tokens


def _metric(base: str, name: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"no {name} in /metrics")


def test_the_rewritten_prompt_reaches_the_model(client: OpenAI, base: str, stub: CaptionStub, server_log: Path) -> None:
    expected = [{"role": "user", "content": "What is in the picture?\n\nImage 1: a red square"}]
    before = len(stub.received)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[_image_message("What is in the picture?", b"red")],  # type: ignore[list-item]
        max_tokens=4,
        temperature=0,
    )
    assert reply.choices[0].finish_reason in {"stop", "length"}
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(_tokens(base, expected))
    assert (reply.usage.model_extra or {})["caption_tokens"] == CAPTION_USAGE["total_tokens"]
    # What the caption endpoint was asked: one image, the default prompt, the configured model.
    sent = stub.received[before]
    assert sent["model"] == CAPTION_MODEL
    assert sent["messages"][0]["content"][0]["text"].startswith("Describe this image")
    assert stub.images()[before:] == [png(b"red")]
    assert stub.paths[-1] == "/v1/chat/completions"
    # /tokenize shows the same rewritten prompt, token for token (the caption is cached by now).
    assert _tokens(base, [_image_message("What is in the picture?", b"red")]) == _tokens(base, expected)
    # Neither the caption nor the prompt is in the server's INFO log.
    log = server_log.read_text()
    assert "vision.described" in log
    assert caption_of("red") not in log and "What is in the picture" not in log


def test_streaming_with_an_image(client: OpenAI, base: str) -> None:
    expected = [{"role": "user", "content": "Describe it.\n\nImage 1: a blue square"}]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[_image_message("Describe it.", b"blue")],  # type: ignore[list-item]
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (
        ["stop"],
        ["length"],
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == len(_tokens(base, expected))
    assert (usage.model_extra or {})["caption_tokens"] == CAPTION_USAGE["total_tokens"]


def test_two_images_keep_their_order(base: str, stub: CaptionStub) -> None:
    messages = [
        _image_message("Compare", b"green", b"yellow"),
        {"role": "assistant", "content": "Two squares."},
        _image_message("", b"violet"),  # numbering goes on across messages
    ]
    expected = [
        {"role": "user", "content": "Compare\n\nImage 1: a green square\nImage 2: a yellow square"},
        {"role": "assistant", "content": "Two squares."},
        {"role": "user", "content": "Image 3: a violet square"},
    ]
    assert _tokens(base, messages) == _tokens(base, expected)
    assert sorted(stub.images()[-3:]) == sorted([png(b"green"), png(b"yellow"), png(b"violet")])


def test_the_cache_avoids_a_second_call(client: OpenAI, base: str, stub: CaptionStub) -> None:
    hits = _metric(base, "llmc_vision_caption_cache_hits_total")
    captions = _metric(base, "llmc_vision_captions_total")
    message = _image_message("Again?", b"cached-orange")
    first = client.chat.completions.create(model=MODEL, messages=[message], max_tokens=2)  # type: ignore[list-item]
    calls = len(stub.received)
    second = client.chat.completions.create(model=MODEL, messages=[message], max_tokens=2)  # type: ignore[list-item]
    assert len(stub.received) == calls  # no second call to the endpoint
    assert first.usage is not None and second.usage is not None
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    assert "caption_tokens" in (first.usage.model_extra or {})
    assert "caption_tokens" not in (second.usage.model_extra or {})  # nothing was captioned for it
    assert _metric(base, "llmc_vision_caption_cache_hits_total") == hits + 1
    assert _metric(base, "llmc_vision_captions_total") == captions + 1
    # The same image twice in one request is described once.
    calls = len(stub.received)
    _tokens(base, [_image_message("Twice", b"twin", b"twin")])
    assert len(stub.received) == calls + 1


@pytest.mark.parametrize("mode", ["500", "garbage", "shape", "hangup", "slow"])
def test_a_failing_endpoint_gives_502(client: OpenAI, base: str, stub: CaptionStub, mode: str) -> None:
    failures = _metric(base, "llmc_vision_caption_failures_total")
    stub.mode, stub.slow_s = mode, SLOW_S
    label = f"fail-{mode}".encode()
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=[_image_message("What?", label)], max_tokens=2)  # type: ignore[list-item]
    assert caught.value.status_code == 502
    error = caught.value.body
    assert isinstance(error, dict) and error["type"] == "upstream_error" and error["code"] == "upstream_error"
    assert "--vision-proxy" in error["message"]
    assert time.monotonic() - started < SLOW_S  # the deadline, not the endpoint, ended it
    assert _metric(base, "llmc_vision_caption_failures_total") == failures + 1
    # A failure is not cached: once the endpoint recovers, the same image is described.
    stub.mode = "ok"
    reply = client.chat.completions.create(model=MODEL, messages=[_image_message("What?", label)], max_tokens=2)  # type: ignore[list-item]
    assert reply.usage is not None and (reply.usage.model_extra or {})["caption_tokens"] > 0


def test_a_slow_caption_does_not_hold_up_other_requests(client: OpenAI, base: str, stub: CaptionStub) -> None:
    stub.mode, stub.slow_s = "slow", CAPTION_TIMEOUT_S - 1.0  # slow, but within the deadline
    results: dict[str, Any] = {}

    def slow_request() -> None:
        message = _image_message("Slow?", b"slow-teal")
        results["slow"] = client.chat.completions.create(model=MODEL, messages=[message], max_tokens=2)  # type: ignore[list-item]

    calls = len(stub.received)
    thread = threading.Thread(target=slow_request)
    thread.start()
    deadline = time.monotonic() + 30
    while len(stub.received) == calls:  # until the slow request is waiting for its caption
        assert time.monotonic() < deadline
        time.sleep(0.02)
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    slow_still_waiting = thread.is_alive()
    thread.join(timeout=60)
    assert plain.choices[0].finish_reason in {"stop", "length"}
    assert slow_still_waiting  # the plain request did not wait for the caption
    assert results["slow"].usage.model_extra["caption_tokens"] > 0


def test_oversized_and_too_many_images_are_refused(base: str, stub: CaptionStub) -> None:
    calls = len(stub.received)
    with httpx.Client(base_url=base, timeout=60) as http:
        big = png(b"x" * (5 * 1024 * 1024))
        body = {"model": MODEL, "messages": [{"role": "user", "content": [_part(big)]}]}
        error = post_openai_error(http, "/v1/chat/completions", body, 413)
        assert "image 1 is larger" in error["message"] and error["param"] == "messages"
        many = [_part(png(f"n{i}".encode())) for i in range(9)]
        error = post_openai_error(http, "/v1/chat/completions", {"model": MODEL, "messages": [_msg(many)]}, 400)
        assert "at most 8" in error["message"]
        not_image = data_url(b"GIF? no, plain text")
        error = post_openai_error(
            http, "/v1/chat/completions", {"model": MODEL, "messages": [_msg([_url(not_image)])]}, 400
        )
        assert "not a PNG, JPEG, GIF or WebP" in error["message"]
        bad = "data:image/png;base64,@@@"
        post_openai_error(http, "/v1/chat/completions", {"model": MODEL, "messages": [_msg([_url(bad)])]}, 400)
        post_openai_error(
            http, "/v1/chat/completions", {"model": MODEL, "messages": [_msg([{"type": "image_url"}])]}, 400
        )
        system = {"role": "system", "content": [_part(png(b"sys"))]}
        error = post_openai_error(http, "/v1/chat/completions", {"model": MODEL, "messages": [system]}, 400)
        assert "user messages" in error["message"]
    assert len(stub.received) == calls  # none of them reached the caption endpoint
    assert httpx.get(f"{base}/health").status_code == 200


def test_remote_images_are_refused_without_the_flag(base: str, stub: CaptionStub) -> None:
    remote = f"{stub.url.removesuffix('/v1')}/cat.png"
    with httpx.Client(base_url=base, timeout=60) as http:
        body = {"model": MODEL, "messages": [_msg([_url(remote)])]}
        error = post_openai_error(http, "/v1/chat/completions", body, 400)
    assert "--vision-allow-remote" in error["message"]
    assert "/cat.png" not in stub.paths  # the server never fetched it


def test_models_say_images_are_accepted(client: OpenAI) -> None:
    assert (client.models.list().data[0].model_extra or {})["input_modalities"] == ["text", "image"]
    assert (client.models.retrieve(MODEL).model_extra or {})["input_modalities"] == ["text", "image"]


def test_fallback_text_and_remote_fetch_policy(tiny: Path, stub: CaptionStub) -> None:
    """--vision-proxy-fallback text with an endpoint that is down; --vision-allow-remote on loopback."""
    down = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    flags = ["--vision-proxy", down, "--vision-proxy-fallback", "text", "--vision-allow-remote"]
    with running_server(tiny, *flags) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=MODEL, messages=[_image_message("What?", b"lost")], max_tokens=2)  # type: ignore[list-item]
        expected = [{"role": "user", "content": f"What?\n\nImage 1: {FALLBACK_NOTE}"}]
        assert reply.usage is not None and reply.usage.prompt_tokens == len(_tokens(url, expected))
        assert "caption_tokens" not in (reply.usage.model_extra or {})
        assert _metric(url, "llmc_vision_caption_failures_total") == 1
        # Remote URLs are fetched with the flag, but never from a loopback (or private) address.
        remote = f"{stub.url.removesuffix('/v1')}/dog.png"
        with httpx.Client(base_url=url, timeout=60) as http:
            error = post_openai_error(
                http, "/v1/chat/completions", {"model": MODEL, "messages": [_msg([_url(remote)])]}, 400
            )
        assert "private, loopback or link-local" in error["message"]
        assert "/dog.png" not in stub.paths


def test_a_text_only_server_refuses_images_with_a_clear_400(tiny: Path) -> None:
    with running_server(tiny) as url, httpx.Client(base_url=url, timeout=60) as http:
        body = {"model": MODEL, "messages": [_image_message("What?", b"red")]}
        error = post_openai_error(http, "/v1/chat/completions", body, 400)
        assert error["type"] == "invalid_request_error"
        assert "text-only" in error["message"] and "--vision-proxy" in error["message"]
        post_openai_error(http, "/tokenize", {"model": MODEL, "messages": body["messages"]}, 400)
        assert http.get("/v1/models").json()["data"][0]["input_modalities"] == ["text"]
        assert http.get("/health").status_code == 200


# ---- in-process: settings, decoding, address policy, the endpoint down ----------------------


def _url(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _part(image: bytes) -> dict[str, Any]:
    return _url(data_url(image))


def _msg(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"role": "user", "content": parts}


def test_settings_are_checked_before_the_model_loads() -> None:
    assert chat_url("http://h:8080/v1") == "http://h:8080/v1/chat/completions"
    assert chat_url("http://h:8080/v1/") == "http://h:8080/v1/chat/completions"
    assert chat_url("https://h/v1/chat/completions") == "https://h/v1/chat/completions"
    for bad in ("ftp://h/v1", "h:8080", "http://user:pw@h/v1"):
        with pytest.raises(BadInputError):
            chat_url(bad)
    assert check_format("[{n}] {caption}") == "[{n}] {caption}"
    for bad in ("Image {n}", "{caption.__class__}", "{caption} {0}", "{caption", "{x} {caption}"):
        with pytest.raises(BadInputError):
            check_format(bad)
    with pytest.raises(BadInputError, match="--vision-proxy-model need --vision-proxy"):
        vision_settings(ServeConfig(artifact="a", vision_proxy_model="m"))
    with pytest.raises(BadInputError, match="--vision-allow-remote need --vision-proxy"):
        vision_settings(ServeConfig(artifact="a", vision_allow_remote=True))
    assert vision_settings(ServeConfig(artifact="a")) is None
    with pytest.raises(BadInputError):
        vision_settings(ServeConfig(artifact="a", vision_proxy="http://h/v1", vision_proxy_prompt=" "))


def test_data_urls_are_decoded_strictly() -> None:
    image = decode_data_url(data_url(png(b"ok"), mime="image/jpeg"), 1, 100)
    assert image.mime == "image/png"  # sniffed, not taken from the URL
    webp = b"RIFF\x00\x00\x00\x00WEBPVP8 "
    assert decode_data_url(data_url(webp), 1, 100).mime == "image/webp"
    with pytest.raises(HttpError) as caught:
        decode_data_url(data_url(png(b"x" * 200)), 2, 100)
    assert caught.value.status == 413
    for bad in ("data:image/png,rawdata", "data:image/png;base64,!!!!", data_url(b"<svg/>", "image/svg+xml")):
        with pytest.raises(BadInputError):
            decode_data_url(bad, 1, 100)


def test_only_public_addresses_are_fetched() -> None:
    for private in (
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "172.16.5.4",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "ff02::1",
    ):
        assert not fetch.is_public(ipaddress.ip_address(private)), private
    for public in ("93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"):
        assert fetch.is_public(ipaddress.ip_address(public)), public


def test_an_endpoint_that_is_down_gives_502() -> None:
    from prometheus_client import CollectorRegistry

    config = vision_config(f"http://127.0.0.1:{free_port()}/v1", timeout_s=CAPTION_TIMEOUT_S)
    proxy = VisionProxy(config, CollectorRegistry())
    req = p.ChatCompletionRequest(
        model=MODEL,
        messages=[p.ChatMessage("user", [p.ContentPart("image_url", image_url=p.ImageUrl(data_url(png(b"a"))))])],
    )
    with pytest.raises(HttpError) as caught:
        asyncio.run(proxy.rewrite(req))
    assert caught.value.status == 502 and caught.value.code == "upstream_error"
    assert "cannot connect" in caught.value.message


def test_fetch_caps_bodies_while_they_stream() -> None:
    """A body with no Content-Length, or chunked, is cut off at the cap rather than read whole."""

    async def serve_and_fetch(answer: bytes, max_bytes: int) -> bytes:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            response = await fetch.request("GET", f"http://127.0.0.1:{port}/", max_bytes=max_bytes, timeout_s=5)
            return response.body
        finally:
            server.close()

    head = b"HTTP/1.1 200 OK\r\n"
    assert asyncio.run(serve_and_fetch(head + b"\r\n" + b"a" * 50, 100)) == b"a" * 50
    with pytest.raises(fetch.TooLargeError):
        asyncio.run(serve_and_fetch(head + b"\r\n" + b"a" * 500, 100))
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    assert asyncio.run(serve_and_fetch(chunked, 100)) == b"hello world"
    with pytest.raises(fetch.TooLargeError):
        asyncio.run(serve_and_fetch(chunked, 8))
    with pytest.raises(fetch.TooLargeError):  # a declared length over the cap is refused before reading
        asyncio.run(serve_and_fetch(head + b"Content-Length: 1000\r\n\r\n", 100))
    with pytest.raises(fetch.FetchError):
        asyncio.run(serve_and_fetch(b"SSH-2.0-OpenSSH\r\n", 100))


# ---- the chat page ---------------------------------------------------------------------------


@pytest.mark.browser
def test_the_chat_page_attaches_an_image(
    tiny: Path, stub: CaptionStub, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright is not installed (pip install playwright)")
    from tests.api.test_ui import CHROMIUM, CHROMIUM_ARGS, WAIT_MS

    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    image = tmp_path / "square.png"
    image.write_bytes(png(b"page-magenta"))
    calls = len(stub.received)
    with running_server(tiny, "--ui-server", "--vision-proxy", stub.url) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{url}/ui")
            page.wait_for_function(f"() => document.getElementById('model').textContent === {MODEL!r}")
            assert page.is_visible("#attach")  # the server describes images
            page.set_input_files("#image", str(image))
            page.wait_for_selector("#attachment:not([hidden])")
            assert page.inner_text("#attachment-name") == "square.png"
            page.click("#toggle-settings")
            page.fill("#max-tokens", "4")
            page.fill("#input", "What is this?")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-state=done]", timeout=WAIT_MS)
            assert "image: square.png" in page.inner_text(".msg.user")
            assert page.is_hidden("#attachment")  # sent with this message only
            assert "tokens" in page.inner_text(".msg.assistant .meta")
        finally:
            browser.close()
    assert stub.images()[calls:] == [png(b"page-magenta")]
    sent = stub.received[calls]["messages"][0]["content"][1]["image_url"]["url"]
    assert sent.startswith("data:image/png;base64,")
