"""Server-Sent Events response: one type owns the protocol's headers, framing and pings."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from aiohttp import web

from builder.server.records import Event


class EventStreamResponse(web.StreamResponse):
    def __init__(self, *, retry_ms: int, ping_interval: float) -> None:
        super().__init__(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "Connection": "keep-alive",
                # Ask nginx-style proxies not to buffer the stream.
                "X-Accel-Buffering": "no",
            },
        )
        self._retry_ms = retry_ms
        self._ping_interval = ping_interval
        self._lock = asyncio.Lock()
        self._ping_task: asyncio.Task[None] | None = None
        self._handler_task: asyncio.Task[object] | None = None

    async def start(self, request: web.BaseRequest) -> None:
        """Send the headers and the `retry:` field that makes EventSource reconnect promptly."""
        self._handler_task = asyncio.current_task()
        await self.prepare(request)
        await self._write(f"retry: {self._retry_ms}\n\n".encode())
        self._ping_task = asyncio.create_task(self._ping())

    async def send_events(self, events: Sequence[Event]) -> None:
        # One write per batch: a chatty build must not cost a syscall per line.
        await self._write(b"".join(f"id: {e.id}\ndata: {e.data}\n\n".encode() for e in events))

    async def _write(self, data: bytes) -> None:
        async with self._lock:
            await self.write(data)

    async def _ping(self) -> None:
        # A comment line keeps idle proxies from cutting the stream and reveals a gone client.
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await asyncio.sleep(self._ping_interval)
                await self._write(b": ping\n\n")

    def stop(self) -> None:
        """Daemon shutdown: end the handler that feeds this stream."""
        if self._handler_task is not None:
            self._handler_task.cancel()

    async def close_stream(self) -> None:
        if self._ping_task is not None:
            self._ping_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ping_task
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.write_eof()
