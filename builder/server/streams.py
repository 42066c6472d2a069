"""Log stream responses: Server-Sent Events for SDKs and browsers, plain text for `curl -N`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence

from aiohttp import web

from builder import plainlog
from builder import protocol as p
from builder.server.records import Event


class LogStreamResponse(web.StreamResponse):
    """A chunked response fed batch by batch from a build's event log."""

    def __init__(self, *, content_type: str) -> None:
        super().__init__(
            status=200,
            headers={
                "Content-Type": content_type,
                "Cache-Control": "no-cache",
                # Ask nginx-style proxies not to buffer the stream.
                "X-Accel-Buffering": "no",
            },
        )
        self._lock = asyncio.Lock()
        self.handler_task: asyncio.Task[object] | None = None

    async def start(self, request: web.BaseRequest) -> None:
        self.handler_task = asyncio.current_task()
        await self.prepare(request)

    async def send_events(self, events: Sequence[Event]) -> None:
        # One write per batch: a chatty build must not cost a syscall per line.
        if data := self.render(events):
            await self._write(data)

    def render(self, events: Sequence[Event]) -> bytes:
        raise NotImplementedError

    async def _write(self, data: bytes) -> None:
        async with self._lock:
            await self.write(data)

    def stop(self) -> None:
        """Daemon shutdown: end the handler that feeds this stream."""
        if self.handler_task is not None:
            self.handler_task.cancel()

    async def close_stream(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.write_eof()


class EventStreamResponse(LogStreamResponse):
    """SSE: `retry:` first, then `id:` + one `data:` line per event, and a ping comment when idle."""

    def __init__(self, *, retry_ms: int, ping_interval: float) -> None:
        super().__init__(content_type="text/event-stream")
        self._retry_ms = retry_ms
        self._ping_interval = ping_interval
        self._ping_task: asyncio.Task[None] | None = None

    async def start(self, request: web.BaseRequest) -> None:
        await super().start(request)
        # Makes EventSource clients reconnect promptly after a cut.
        await self._write(f"retry: {self._retry_ms}\n\n".encode())
        self._ping_task = asyncio.create_task(self._ping())

    def render(self, events: Sequence[Event]) -> bytes:
        return b"".join(e.frame for e in events)

    async def _ping(self) -> None:
        # Keeps idle proxies from cutting the stream, and reveals a client that is gone.
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await asyncio.sleep(self._ping_interval)
                await self._write(b": ping\n\n")

    async def close_stream(self) -> None:
        if self._ping_task is not None:
            self._ping_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ping_task
        await super().close_stream()


class PlainLogResponse(LogStreamResponse):
    """The build's output as `docker build --progress=plain` prints it, then one line with the outcome."""

    def __init__(self) -> None:
        super().__init__(content_type="text/plain")
        self.charset = "utf-8"

    def render(self, events: Sequence[Event]) -> bytes:
        lines: list[str] = []
        for event in events:
            payload = json.loads(event.data)
            kind = payload.get("type")
            if kind == p.EVENT_LOG or kind == p.EVENT_STATUS:
                lines.extend(line + "\n" for line in plainlog.event_lines(payload))
            elif kind == p.EVENT_DONE:
                lines.append(f"--- {payload['status']}: {payload['image_ref']}\n")
            elif kind == p.EVENT_ERROR:
                lines.append(f"--- {payload['status']}: {payload['error']}\n")
        return "".join(lines).encode()
