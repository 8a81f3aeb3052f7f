"""Brute-force protection for the dashboard's login (ASGI middleware).

Gradio checks the password at ``POST /login`` and offers no hook that sees the client: its
``auth`` callable gets only the user name and password. So this middleware wraps that route:
per client address, each attempt after a failed one waits a delay that doubles with the failures
(``base_delay_s`` up to ``max_delay_s``), attempts from one client are taken one at a time (so
parallel guesses wait too), a client with ``max_failures`` failures in a row is locked out for
``lockout_s`` (429, the right password included), and every failure is logged with the client and
its count. A successful login clears the client's record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from starlette.responses import PlainTextResponse

log = logging.getLogger(__name__)


@dataclass
class _Client:
    failures: int = 0
    locked_until: float = 0.0
    lock: asyncio.Lock | None = None


class LoginThrottle:
    """ASGI middleware around Gradio's ``POST .../login`` (see the module docstring)."""

    def __init__(
        self, app, base_delay_s: float = 0.5, max_delay_s: float = 8.0, max_failures: int = 10, lockout_s: float = 300.0
    ):
        self.app = app
        self.base_delay_s, self.max_delay_s = base_delay_s, max_delay_s
        self.max_failures, self.lockout_s = max_failures, lockout_s
        self.clients: dict[str, _Client] = {}

    def delay(self, failures: int) -> float:
        """Seconds an attempt waits after `failures` failed ones in a row: 0, base, 2·base, ... max."""
        return 0.0 if failures == 0 else min(self.base_delay_s * 2 ** (failures - 1), self.max_delay_s)

    async def __call__(self, scope, receive, send):
        if not (scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/login")):
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("?", 0))[0]
        client = self.clients.setdefault(address, _Client())
        client.lock = client.lock or asyncio.Lock()
        async with client.lock:  # one attempt at a time per client
            wait = client.locked_until - time.time()
            if wait > 0:
                message = f"Too many failed logins from {address}; try again in {wait:.0f} s."
                await PlainTextResponse(message, status_code=429)(scope, receive, send)
                return
            await asyncio.sleep(self.delay(client.failures))
            status = await self._forward(scope, receive, send)
            if status == 200:
                self.clients.pop(address, None)
            elif status in (400, 401, 403):
                self._failed(address, client)

    async def _forward(self, scope, receive, send) -> int | None:
        """Run Gradio's login route; returns the response's status code."""
        status = None

        async def watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        return status

    def _failed(self, address: str, client: _Client) -> None:
        client.failures += 1
        if client.failures >= self.max_failures:
            client.locked_until, client.failures = time.time() + self.lockout_s, 0
            log.warning(
                "dashboard login failed from %s (%d in a row): locked out for %.0f s",
                address,
                self.max_failures,
                self.lockout_s,
            )
        else:
            log.warning(
                "dashboard login failed from %s (%d in a row; the next attempt waits %.1f s)",
                address,
                client.failures,
                self.delay(client.failures),
            )
