"""Issue 8: the built-in chat page (`llmc run --ui-server`), served and driven in headless Chromium.

The browser tests need the `playwright` package and a system Chromium (Debian: `apt-get install
chromium`); playwright's own browser download is never used. Without them they skip.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmc.builder.build import BuildOptions, build
from llmc.runtime.api.ui import CSP
from tests.conftest import make_tiny_llama
from tests.server import running_server

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEY = "sk-ui-test"
# Browser waits: SmolLM2 f32 on 2 busy cores takes a few seconds for its first tokens.
WAIT_MS = 120_000
# After Stop, the text must not change for this long (the model makes several tokens a second).
QUIET_S = 2.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = make_tiny_llama(tmp_path_factory.mktemp("ui-src") / "llama", max_position_embeddings=4096)
    out = tmp_path_factory.mktemp("ui") / "tiny"
    build(BuildOptions(model=str(source), gguf_file=None, weights=None, output=out, name="tiny"))
    return out


@pytest.fixture(scope="module")
def chat_artifact(request: pytest.FixtureRequest, tiny: Path) -> Path:
    """SmolLM2 (a model that writes sentences and can be told to go on) when it can be built, else the tiny one."""
    if importlib.util.find_spec("llmc.builder.gguf_tokenizer") is not None:
        try:
            return Path(request.getfixturevalue("smollm2_artifact"))
        except pytest.skip.Exception:
            pass
    return tiny


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _screenshot(page: Any, tmp_path_factory: pytest.TempPathFactory, name: str) -> None:
    path = tmp_path_factory.mktemp("ui-screenshots") / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    target = os.environ.get("LLMC_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)


def _running(base: str) -> float:
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llmc_num_requests_running":
                return sample.value
    raise AssertionError("no llmc_num_requests_running in /metrics")


def _csp_errors(page: Any) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    return errors


def test_ui_is_off_without_the_flag(tiny: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with running_server(tiny, log=log) as base:
        assert httpx.get(f"{base}/ui").status_code == 404
        assert httpx.get(f"{base}/ui/app.js").status_code == 404
        assert httpx.get(f"{base}/").status_code == 404  # no page to send a browser to
        assert httpx.get(f"{base}/favicon.ico").status_code == 404
        # Start-up says where the API is, and mentions no chat page.
        assert f"API:  {base}/v1" in log.read_text()
        assert "Chat:" not in log.read_text()


@pytest.fixture(scope="module")
def locked_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ui-log") / "server.log"


@pytest.fixture(scope="module")
def locked_server(tiny: Path, locked_log: Path) -> Iterator[str]:
    """The page on a server that needs an API key."""
    with running_server(tiny, "--ui-server", "--api-key", KEY, log=locked_log) as base:
        yield base


def test_startup_prints_the_api_and_chat_urls(locked_server: str, locked_log: Path) -> None:
    output = locked_log.read_text()
    assert f"API:  {locked_server}/v1" in output
    assert f"Chat: {locked_server}/ui" in output


def test_root_redirects_to_the_page_and_the_favicon_is_served(locked_server: str) -> None:
    for root in ("", "/"):
        response = httpx.get(f"{locked_server}{root}")  # no key: it leads to the page, which asks for one
        assert response.status_code in (302, 307)
        assert response.headers["location"] == "/ui"
    assert httpx.get(f"{locked_server}/", follow_redirects=True).headers["content-type"].startswith("text/html")
    for name in ("/favicon.svg", "/favicon.ico"):
        icon = httpx.get(f"{locked_server}{name}")
        assert icon.status_code == 200
        assert icon.headers["content-type"].startswith("image/")
        assert icon.headers["content-security-policy"] == CSP
        assert icon.text.startswith("<svg")
    page = httpx.get(f"{locked_server}/ui").text
    assert '<link rel="icon" href="/favicon.svg"' in page
    # The HTTP guard holds for them as for every route: a Host that is not this server's is refused.
    assert httpx.get(f"{locked_server}/", headers={"Host": "evil.example"}).status_code == 421
    assert httpx.get(f"{locked_server}/favicon.ico", headers={"Host": "evil.example"}).status_code == 421


def test_ui_is_served_with_the_flag(locked_server: str) -> None:
    page = httpx.get(f"{locked_server}/ui")  # no key: the page must load to ask for one
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert '<script src="/ui/app.js">' in page.text
    assert "<script>" not in page.text  # no inline script: the CSP would refuse it
    script = httpx.get(f"{locked_server}/ui/app.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.headers["content-security-policy"] == CSP
    assert "renderMarkdown" in script.text
    assert httpx.get(f"{locked_server}/ui/").status_code == 200
    assert httpx.get(f"{locked_server}/v1/models").status_code == 401  # the API itself stays locked


def test_ui_page_asks_for_the_api_key(
    browser: Any, locked_server: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    page = browser.new_page()
    csp_errors = _csp_errors(page)
    page.goto(f"{locked_server}/ui")
    page.wait_for_selector("#key-box:not([hidden])")
    page.fill("#api-key", KEY)
    page.click("#save-key")
    page.wait_for_function("() => document.getElementById('model').textContent === 'tiny'")
    page.click("#toggle-settings")
    page.fill("#max-tokens", "8")
    page.fill("#input", "hello")
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=WAIT_MS)
    assert page.inner_text(".msg.user") == "hello"
    # The page reports the server's usage; the random model may sample its end token early, so the
    # count is checked against the limit rather than assumed to reach it.
    meta = page.inner_text(".msg.assistant .meta")
    counted = re.search(r"(\d+) tokens", meta)
    assert counted is not None, meta
    assert 0 <= int(counted.group(1)) <= 8
    if "cut off at max tokens" in meta:
        assert int(counted.group(1)) == 8
    if int(counted.group(1)) > 0:  # the speed is shown with the count
        assert re.search(r"\d+\.\d tokens/s", meta), meta
    _screenshot(page, tmp_path_factory, "ui-api-key.png")
    assert csp_errors == []
    page.close()


MARKDOWN = """# Title
Some **bold**, *italic*, `a <b> code` and [a link](https://example.com) and [bad](javascript:alert(1)).

- one
- two <script>alert(1)</script>

1. first

```python
if a < b:
    print("<tag>")
```
"""


def test_chat_streams_renders_and_stops(
    browser: Any, chat_artifact: Path, tiny: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with running_server(chat_artifact, "--ui-server") as base:
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        csp_errors = _csp_errors(page)
        page.goto(f"{base}/ui")
        # (Predicates are functions: a bare expression would be eval'd, which the page's CSP refuses.)
        page.wait_for_function(f"() => document.getElementById('model').textContent === {model!r}")

        # The markdown renderer: structure from markdown, every bit of text escaped.
        html = page.evaluate("md => window.llmcRenderMarkdown(md)", MARKDOWN)
        assert "<h1>Title</h1>" in html
        assert "<strong>bold</strong>" in html and "<em>italic</em>" in html
        assert "<code>a &lt;b&gt; code</code>" in html
        assert '<a href="https://example.com" target="_blank" rel="noopener noreferrer">a link</a>' in html
        assert "javascript:" not in html.replace("[bad](javascript:alert(1))", "")
        assert "<li>two &lt;script&gt;alert(1)&lt;/script&gt;</li>" in html
        assert "<ol><li>first</li></ol>" in html
        assert "<pre><code>if a &lt; b:\n    print(&quot;&lt;tag&gt;&quot;)</code></pre>" in html
        assert "<script" not in html

        # A short exchange, with a system prompt and sampling settings from the page.
        page.click("#toggle-settings")
        page.fill("#system", "You are a helpful assistant.")
        page.fill("#temperature", "0")
        page.fill("#top-p", "1")
        page.fill("#max-tokens", "24")
        page.fill("#input", "Say hello in one short sentence.")
        page.press("#input", "Enter")
        first = page.locator(".msg.assistant").nth(0)
        page.wait_for_function(
            "() => document.querySelector('.msg.assistant .content').textContent.trim().length > 0", timeout=WAIT_MS
        )
        page.wait_for_selector(".msg.assistant[data-state=done]", timeout=WAIT_MS)
        assert first.locator(".content").inner_text().strip()
        speed = re.search(r"(\d+\.\d) tokens/s", first.locator(".meta").inner_text())
        assert speed is not None and float(speed.group(1)) > 0, first.locator(".meta").inner_text()
        # 10 tokens after the first, in the second between the first chunk and the last: 10 tokens/s.
        assert page.evaluate("() => window.llmcTokensPerSecond(11, 0, 1000, 2000)") == 10

        if chat_artifact == tiny:
            _screenshot(page, tmp_path_factory, "ui-chat.png")
            pytest.skip("stopping a long generation needs SmolLM2: the tiny random model ends its text too soon")
        # A long generation, stopped midway: the page aborts the fetch, the server aborts the request.
        page.fill("#max-tokens", "3000")
        page.fill("#input", "Count from 1 to 1000, one number per line.")
        page.click("#send")
        second = page.locator(".msg.assistant").nth(1)
        page.wait_for_function(
            "() => (document.querySelectorAll('.msg.assistant')[1]?.querySelector('.content')"
            "?.textContent.length ?? 0) > 20",
            timeout=WAIT_MS,
        )
        assert _running(base) == 1
        assert page.is_enabled("#stop") and page.is_disabled("#send")
        page.click("#stop")
        page.wait_for_selector(".msg.assistant[data-state=stopped]", timeout=10_000)
        stopped_text = second.locator(".content").inner_text()
        time.sleep(QUIET_S)
        assert second.locator(".content").inner_text() == stopped_text
        assert "stopped" in second.locator(".meta").inner_text()
        deadline = time.monotonic() + 10
        while _running(base) != 0:
            assert time.monotonic() < deadline, "the server kept generating after Stop"
            time.sleep(0.2)
        assert page.is_enabled("#send") and page.is_disabled("#stop")
        _screenshot(page, tmp_path_factory, "ui-chat.png")
        assert csp_errors == []
        page.close()
