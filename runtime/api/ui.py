"""The built-in chat page (`llmc run --ui-server`): static files shipped in the package, served at /ui
(and `/` redirects there), with its icon at /favicon.svg and /favicon.ico (browsers ask for the latter).

The page is plain HTML, CSS and JavaScript with no build step and nothing fetched from elsewhere;
it talks to this server's own /v1 routes. A strict Content-Security-Policy keeps it that way: no
inline or foreign scripts, no connections to other origins.
"""

from __future__ import annotations

from importlib import resources

CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self'"
# path -> (file in static/, content type)
_FILES = {
    "/ui": ("ui.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    # One SVG icon for both names: every browser that shows favicons renders SVG ones.
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
    "/favicon.ico": ("favicon.svg", "image/svg+xml"),
}
ROUTES = tuple(_FILES)
PAGE = "/ui"  # where `/` redirects when the page is served
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]


class UiAssets:
    """The page's files, read from the package once."""

    def __init__(self) -> None:
        static = resources.files("llmc.runtime.api") / "static"
        self._responses: dict[str, tuple[list[tuple[bytes, bytes]], bytes]] = {}
        for path, (name, content_type) in _FILES.items():
            body = (static / name).read_bytes()
            self._responses[path] = ([(b"content-type", content_type.encode()), *_HEADERS], body)

    def response(self, path: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """(headers, body) for one of ROUTES."""
        return self._responses[path]
