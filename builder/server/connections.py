"""Connection limits in front of aiohttp: open connections are capped, in all and per client
address, and a connection over a cap gets a fast 503 instead of holding a descriptor.

aiohttp itself bounds the time to a complete request head (its keep-alive timer runs from the
connection's start and from the end of each response, and is not reset by a trickle of bytes),
so a client that sends half a header and then nothing is dropped after `--header-timeout`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import resource
import time
from typing import Any

import structlog

log = structlog.get_logger(__name__)

_BUSY_BODY = json.dumps({"error": "too many open connections; retry later", "code": "too_many_connections"}) + "\n"
# Written before the connection is closed: no request has been read yet, so no middleware runs.
BUSY_RESPONSE = (
    "HTTP/1.1 503 Service Unavailable\r\n"
    "Content-Type: application/json; charset=utf-8\r\n"
    f"Content-Length: {len(_BUSY_BODY)}\r\n"
    "Retry-After: 1\r\n"
    "Connection: close\r\n\r\n" + _BUSY_BODY
).encode()
# Descriptors kept free for everything that is not a client connection (engine, store, spool).
_RESERVED_FDS = 256


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    total: int  # 0: bounded by the descriptor limit only
    per_client: int  # 0: no per-address cap


def raise_descriptor_limit() -> int:
    """Raise the soft limit on open files to the hard one; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


class ConnectionGuard:
    """Counts the open connections of one listening site, by client address."""

    def __init__(self, limits: ConnectionLimits) -> None:
        descriptors = raise_descriptor_limit() - _RESERVED_FDS
        self.total = min(limits.total, descriptors) if limits.total else descriptors
        self.per_client = limits.per_client
        self.open = 0
        self.refused = 0
        self._by_client: collections.Counter[str] = collections.Counter()

    def admit(self, client: str) -> bool:
        if self.open >= self.total or (self.per_client and self._by_client[client] >= self.per_client):
            self.refused += 1
            return False
        self.open += 1
        self._by_client[client] += 1
        return True

    def release(self, client: str) -> None:
        self.open -= 1
        self._by_client[client] -= 1
        if not self._by_client[client]:
            del self._by_client[client]

    def wrap(self, server: Any) -> GuardedServer:
        return GuardedServer(server, self)


class GuardedServer:
    """aiohttp's protocol factory (`web.Server`), with each connection admitted first."""

    def __init__(self, server: Any, guard: ConnectionGuard) -> None:
        self._server = server
        self._guard = guard

    def __call__(self) -> asyncio.Protocol:
        return _GuardedProtocol(self._server(), self._guard)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class _GuardedProtocol(asyncio.Protocol):
    """Forwards to aiohttp's request handler once the connection is admitted."""

    __slots__ = ("_client", "_guard", "_inner")

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self._inner: asyncio.Protocol | None = inner
        self._guard = guard
        self._client = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if not self._guard.admit(self._client):
            self._inner = None
            assert isinstance(transport, asyncio.Transport)
            transport.write(BUSY_RESPONSE)
            transport.close()
            return
        assert self._inner is not None
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._guard.release(self._client)
            self._inner.connection_lost(exc)
            self._inner = None

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class AcceptErrorLimiter:
    """The event loop's exception handler: `accept()` failures (out of descriptors) are logged at
    most once a second, with a count of the ones left out; everything else as asyncio would."""

    _MESSAGE = "socket.accept() out of system resource"

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._last = float("-inf")
        self._suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != self._MESSAGE:
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        log.error("accept_failed", error=str(context.get("exception")), suppressed_since_last=self._suppressed)
        self._last, self._suppressed = now, 0
