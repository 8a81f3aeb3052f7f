"""Same-origin guard for the dashboard's HTTP server (ASGI middleware).

Without a login, anyone who can make the user's browser send a request to the dashboard could
drive its API: a web page posting to ``http://127.0.0.1:7860`` (cross-site request), or a domain
that re-resolves to 127.0.0.1 (DNS rebinding: the request then carries ``Host: evil.example``).
So every request must name an allowed host in ``Host`` (loopback names, the address the server
binds, and any ``--allow-host``), and a request that carries an ``Origin`` must come from the
page's own origin (same host and port). Anything else gets 403 before Gradio sees it.

Plain clients (curl, ``gradio_client``) send no ``Origin`` and are only checked on ``Host``.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_BINDS = ("", "0.0.0.0", "::")


def allowed_hosts(bind_host: str | None, extra: Iterable[str] = ()) -> frozenset[str]:
    """Host names the server answers to: loopback, the bound address (unless a wildcard) and
    ``extra`` (names or addresses users type to reach a server bound to all interfaces)."""
    hosts = {*LOOPBACK_HOSTS, *(h.strip().lower() for h in extra if h.strip())}
    if bind_host and bind_host not in WILDCARD_BINDS:
        hosts.add(bind_host.lower())
    return frozenset(hosts)


def refusal(host: str | None, origin: str | None, allowed: frozenset[str]) -> str | None:
    """Why a request with these ``Host`` and ``Origin`` headers is refused, or None."""
    name = _hostname(host)
    if name not in allowed:
        return f"Host {host!r} is not one this dashboard answers to (start it with --allow-host to add one)."
    if origin is not None and urlsplit(origin).netloc.lower() != (host or "").lower():
        return f"Cross-origin request from {origin!r} refused."
    return None


def _hostname(host: str | None) -> str | None:
    if not host:
        return None
    try:
        return urlsplit(f"//{host}").hostname  # lower-cased, port and IPv6 brackets removed
    except ValueError:
        return None


class SameOriginOnly:
    """ASGI middleware: 403 for requests ``refusal`` refuses (websockets are closed)."""

    def __init__(self, app, allowed: frozenset[str]):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = Headers(scope=scope)
            reason = refusal(headers.get("host"), headers.get("origin"), self.allowed)
            if reason is not None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                else:
                    await PlainTextResponse(reason, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)
