"""Log stream responses: Server-Sent Events for SDKs and browsers (one frame per event, or in
batches for our own clients), plain text for `curl -N`.

A batch of events is rendered once per format and shared by every follower that sends the
same batch (live followers mostly are at the same place). A follower writes a slice at a
time and only once its socket has taken the previous one, so one that does not read holds
at most a slice of the daemon's memory, and catches up later from the window or the store.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import itertools
import json

from aiohttp import web

from builder import plainlog
from builder.server.records import EventRun

# Most bytes a follower has in flight beyond what its socket took.
WRITE_SLICE = 16 * 1024
# About the most event bytes in one frame of the batched stream.
BATCH_FRAME_BYTES = 4 * 1024
# Batches rendered lately, by (format, build, first id, last id): followers share the bytes.
_RENDERED: collections.OrderedDict[tuple[str, str, int, int], bytes] = collections.OrderedDict()
_RENDERED_KEEP = 64


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

    format = "text"

    async def start(self, request: web.BaseRequest) -> None:
        self.handler_task = asyncio.current_task()
        await self.prepare(request)
        if request.transport is not None:
            # Paused (so `drain` waits) as soon as anything is left unsent: a follower that does
            # not read is skipped until its socket takes more.
            request.transport.set_write_buffer_limits(high=0)

    async def send_events(self, build_id: str, run: EventRun) -> None:
        """One batch: rendered once for every follower that sends it, written in slices."""
        if not run:
            return
        key = (self.format, build_id, run.first_id, run.last_id)
        if (data := _RENDERED.get(key)) is None:
            data = _RENDERED[key] = self.render(run)
            if len(_RENDERED) > _RENDERED_KEEP:
                _RENDERED.popitem(last=False)
        view = memoryview(data)
        for start in range(0, len(view), WRITE_SLICE):
            await self._write(view[start : start + WRITE_SLICE])

    def render(self, run: EventRun) -> bytes:
        raise NotImplementedError

    async def _write(self, data: bytes | memoryview) -> None:
        async with self._lock:
            if self._payload_writer is not None:
                # Until the socket has taken what was written before (StreamResponse.drain() is
                # deprecated for write(), which waits only past 64 KiB: too late here).
                await self._payload_writer.drain()
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

    format = "sse"

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

    def render(self, run: EventRun) -> bytes:
        return "".join([f"id: {i}\ndata: {d}\n\n" for i, d in enumerate(run.datas, start=run.first_id)]).encode()

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


class BatchedEventStreamResponse(EventStreamResponse):
    """SSE for our own clients (`?batch=true`): one frame per batch of events,
    `id: <last id>` and `data: <first id> [<event>,<event>,...]` (consecutive ids), so a
    client decodes a batch with one JSON parse and resumes by `Last-Event-ID` as ever."""

    format = "batch"

    def render(self, run: EventRun) -> bytes:
        # A new frame every few KiB: a proxy that cuts connections often must still let whole
        # frames through, or a client never gets on. A frame ends with the event that takes it
        # past BATCH_FRAME_BYTES, found by bisecting the running total of the events' sizes.
        datas, first_id = run.datas, run.first_id
        ends = list(itertools.accumulate(map(len, datas)))
        frames = []
        start = 0
        while start < len(datas):
            before = ends[start - 1] if start else 0
            stop = min(bisect.bisect_right(ends, before + BATCH_FRAME_BYTES, lo=start) + 1, len(datas))
            body = ",".join(datas[start:stop])
            frames.append(f"id: {first_id + stop - 1}\ndata: {first_id + start} [{body}]\n\n")
            start = stop
        return "".join(frames).encode()


class PlainLogResponse(LogStreamResponse):
    """The build's output as `docker build --progress=plain` prints it, then one line with the outcome."""

    def __init__(self) -> None:
        super().__init__(content_type="text/plain")
        self.charset = "utf-8"

    def render(self, run: EventRun) -> bytes:
        # A line over the daemon's limit came in pieces ("cont"): each piece prints as a line.
        lines: list[str] = []
        for data in run.datas:
            payload = json.loads(data)
            lines.extend(plainlog.event_lines(payload) or plainlog.terminal_lines(payload))
        return "".join(line + "\n" for line in lines).encode()
