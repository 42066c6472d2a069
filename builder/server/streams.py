"""Log stream responses: Server-Sent Events for SDKs and browsers (one frame per event, or in
batches for our own clients), plain text for `curl -N`.

Each event is rendered once per format, into blocks that followers anywhere in them send slices
of. A follower writes only once its socket has taken the previous write, and no more than the
socket has room for, so one that does not read holds at most MIN_WRITE bytes of the daemon's
memory (what the transport keeps to learn when the socket takes more), and catches up later from
the window or the store.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import ctypes
import fcntl
import gc
import itertools
import json
import socket
import struct
from collections.abc import Iterable
from typing import Generic, TypeVar

from aiohttp import web

from builder import plainlog
from builder.server.events import FOLLOW_BATCH
from builder.server.records import EventRun

# Bytes a follower's socket may hold unsent (TCP_NOTSENT_LOWAT): the kernel takes no more, so a
# client that does not read ties up this much kernel memory, not a send buffer of megabytes.
SOCKET_UNSENT_LIMIT = 512 * 1024
# Linux's SO_MEMINFO (since 4.6): a socket's buffer sizes and fill, nine u32s, among them the send
# buffer's size and the bytes queued against it (the kernel's own overhead included).
_SO_MEMINFO = 55
_MEMINFO = struct.Struct("9I")
_SNDBUF, _WMEM_QUEUED = 3, 5
# Linux's SIOCOUTQNSD: the bytes in a TCP socket's send queue not sent yet.
_SIOCOUTQNSD = 0x894B
_UNSENT = struct.Struct("i")
# A write to a socket with no room left. The kernel may still fit it into its last segment; if not,
# the transport keeps it until the socket takes more, which tells the follower that it has. So a
# follower that does not read holds at most this much, and a segment fills in a few writes, not
# in hundreds.
MIN_WRITE = 4096
# What HTTP's chunked encoding adds to a write, at most (the size in hex and two CRLFs).
CHUNK_FRAMING = 16
# Each write where the room of the socket cannot be read (not a TCP socket on Linux).
WRITE_SLICE = 16 * 1024
# About the most event bytes in one frame of the batched stream.
BATCH_FRAME_BYTES = 4 * 1024
# Rendered bytes kept for followers that come by later: a crowd spread over seconds of a chatty
# log must not render its blocks again and again.
RENDERED_KEEP_BYTES = 32 << 20


_K = TypeVar("_K")
_V = TypeVar("_V")


class _Recent(Generic[_K, _V]):
    """Values by key, least recently used first out once their sizes pass `budget` bytes."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._items: collections.OrderedDict[_K, tuple[_V, int]] = collections.OrderedDict()
        self._bytes = 0

    def get(self, key: _K) -> _V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    def put(self, key: _K, value: _V, size: int) -> None:
        if (old := self._items.pop(key, None)) is not None:
            self._bytes -= old[1]
        self._items[key] = (value, size)
        self._bytes += size
        while self._bytes > self._budget and len(self._items) > 1:
            self._bytes -= self._items.popitem(last=False)[1][1]


class _Rendered:
    """Consecutive events rendered in one format, from `first_id` on; `ends[i]` is where the bytes
    of event `first_id + i` end."""

    __slots__ = ("data", "ends", "first_id")

    def __init__(self, first_id: int) -> None:
        self.first_id = first_id
        self.data = b""
        self.ends: list[int] = []

    @property
    def last_id(self) -> int:
        return self.first_id + len(self.ends) - 1

    def extend(self, parts: list[str]) -> None:
        """The next events' parts, in a new bytes object: a write is never changed under it."""
        added = "".join(parts).encode()
        sizes: Iterable[int] = map(len, parts)
        if len(added) != sum(map(len, parts)):  # not all ASCII
            sizes = (len(part.encode()) for part in parts)
        self.ends += itertools.islice(itertools.accumulate(sizes, initial=len(self.data)), 1, None)
        self.data += added

    def span(self, first_id: int, last_id: int) -> tuple[int, int]:
        """Where the bytes of events first_id..last_id start and end in `data`."""
        start = self.ends[first_id - self.first_id - 1] if first_id > self.first_id else 0
        return start, self.ends[last_id - self.first_id]


# Events by (format, build, block of FOLLOW_BATCH ids): a follower sends a slice of its block's
# bytes, wherever in the block it is. Batched frames by (build, first id, last id), as their frames depend
# on where they start.
_RENDERED: _Recent[tuple[str, str, int], _Rendered] = _Recent(RENDERED_KEEP_BYTES)
_BATCHES: _Recent[tuple[str, int, int], bytes] = _Recent(RENDERED_KEEP_BYTES // 4)
# After this many log streams have closed, the reference cycles their connections left are
# collected (with the daemon's rare full collections, cli.py, they could wait for hours), and the
# memory freed is handed back to the system.
RECLAIM_AFTER_CLOSED = 1000
# Once the crowd has gone, rather than halfway through its going.
_RECLAIM_DELAY = 1.0


class _StreamCount:
    """The log streams of this process: what is kept for them, and what they leave behind."""

    def __init__(self) -> None:
        self.open = 0
        self._closed = 0
        self._reclaim: asyncio.TimerHandle | None = None

    def opened(self) -> None:
        self.open += 1

    def closed(self) -> None:
        self.open -= 1
        if not self.open:  # nobody will come by for what is kept
            _RENDERED.clear()
            _BATCHES.clear()
        self._closed += 1
        if self._closed >= RECLAIM_AFTER_CLOSED and self._reclaim is None:
            self._reclaim = asyncio.get_running_loop().call_later(_RECLAIM_DELAY, self._reclaim_memory)

    def _reclaim_memory(self) -> None:
        self._reclaim = None
        self._closed = 0
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # glibc only
            ctypes.CDLL(None).malloc_trim(0)


_STREAMS = _StreamCount()


def _measured(sock: socket.socket | None) -> socket.socket | None:
    """The socket, limited to SOCKET_UNSENT_LIMIT, if it tells how much more it takes (TCP on Linux)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, SOCKET_UNSENT_LIMIT)
        _room(sock)
    except (OSError, AttributeError):
        return None
    return sock


def _room(sock: socket.socket) -> int:
    """Bytes the socket surely takes now: what is left of its unsent limit, and half of what is left
    of its send buffer (the kernel counts its overhead against that, up to about as much again for
    small segments)."""
    info = _MEMINFO.unpack(sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO.size))
    (unsent,) = _UNSENT.unpack(fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, bytes(_UNSENT.size)))
    return min((info[_SNDBUF] - info[_WMEM_QUEUED]) // 2, SOCKET_UNSENT_LIMIT - unsent)  # type: ignore[no-any-return]


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
        self._started = False
        self._transport: asyncio.BaseTransport | None = None
        self._socket: socket.socket | None = None
        self._room = 0  # what the socket surely takes, as last measured less what was written since

    format = "text"

    async def start(self, request: web.BaseRequest) -> None:
        """Send the headers. Ends with close_stream, whether it got through or not."""
        _STREAMS.opened()
        self._started = True
        self.handler_task = asyncio.current_task()
        await self.prepare(request)
        self._transport = transport = request.transport
        if transport is not None:
            # Paused (so `drain` waits) as soon as anything is left unsent: a follower that does
            # not read is skipped until its socket takes more.
            transport.set_write_buffer_limits(high=0)
            self._socket = _measured(transport.get_extra_info("socket"))

    @property
    def unsent_bytes(self) -> int:
        """What the transport holds because the socket would not take it (yet)."""
        transport = self._transport
        return transport.get_write_buffer_size() if isinstance(transport, asyncio.WriteTransport) else 0

    async def send_events(self, build_id: str, run: EventRun) -> None:
        """One batch: each event rendered once for every follower that sends it."""
        if run:
            await self._write(*self.encoded(build_id, run))

    def encoded(self, build_id: str, run: EventRun) -> tuple[_Rendered | bytes, int, int]:
        """The run's bytes, as where they are in what holds them."""
        key = (self.format, build_id, (run.first_id - 1) // FOLLOW_BATCH)
        rendered = _RENDERED.get(key)
        if rendered is None or not rendered.first_id <= run.first_id <= rendered.last_id + 1:
            rendered = _Rendered(run.first_id)  # what is kept does not reach this run: start anew
        if run.last_id > rendered.last_id:
            skip = rendered.last_id + 1 - run.first_id
            rendered.extend(self.render_events(EventRun(rendered.last_id + 1, run.datas[skip:])))
            _RENDERED.put(key, rendered, len(rendered.data))
        return rendered, *rendered.span(run.first_id, run.last_id)

    def render_events(self, run: EventRun) -> list[str]:
        """Each event of the run as this stream sends it."""
        raise NotImplementedError

    async def _write(self, source: _Rendered | bytes, start: int = 0, end: int | None = None) -> None:
        """Bytes start..end of `source`. A rendering's bytes are looked up afresh after each wait
        for the socket: a follower that waits keeps no copy of them that the others have left."""
        async with self._lock:
            if end is None:
                end = len(source.data if isinstance(source, _Rendered) else source)
            while start < end:
                if self._payload_writer is not None:
                    # Until the socket has taken what was written before (StreamResponse.drain() is
                    # deprecated for write(), which waits only past 64 KiB: too late here).
                    await self._payload_writer.drain()
                data = source.data if isinstance(source, _Rendered) else source
                size = self._write_size(end - start)
                await self.write(memoryview(data)[start : start + size])
                start += size

    def _write_size(self, wanted: int) -> int:
        """How much to write now: what the socket surely takes, or MIN_WRITE once it has no room.
        The room only grows until it is measured again, so a write that fits what is left of it
        needs no look at the socket."""
        if self._socket is None:
            return min(wanted, WRITE_SLICE)
        if wanted + CHUNK_FRAMING > self._room:
            try:
                self._room = _room(self._socket)
            except OSError:  # closed: the write says so
                return min(wanted, WRITE_SLICE)
        size = min(wanted, max(self._room - CHUNK_FRAMING, MIN_WRITE))
        self._room -= size + CHUNK_FRAMING
        return size

    def stop(self) -> None:
        """Daemon shutdown: end the handler that feeds this stream."""
        if self.handler_task is not None:
            self.handler_task.cancel()

    async def close_stream(self) -> None:
        if self._started:
            self._started = False
            _STREAMS.closed()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.write_eof()


class EventStreamResponse(LogStreamResponse):
    """SSE: `retry:` first, then `id:` + one `data:` line per event, and a ping comment when idle."""

    format = "sse"

    def __init__(self, *, retry_ms: int, pinger: StreamPinger) -> None:
        super().__init__(content_type="text/event-stream")
        self._retry_ms = retry_ms
        self._pinger = pinger

    async def start(self, request: web.BaseRequest) -> None:
        await super().start(request)
        # Makes EventSource clients reconnect promptly after a cut.
        await self._write(f"retry: {self._retry_ms}\n\n".encode())
        self._pinger.add(self)

    def render_events(self, run: EventRun) -> list[str]:
        return [f"id: {i}\ndata: {d}\n\n" for i, d in enumerate(run.datas, start=run.first_id)]

    async def ping(self) -> None:
        """A comment frame, unless events are being written or the socket is full (then a ping
        would tell nothing more)."""
        if self._lock.locked() or self.unsent_bytes:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._write(b": ping\n\n")

    async def close_stream(self) -> None:
        self._pinger.discard(self)
        await super().close_stream()


class StreamPinger:
    """Pings every open SSE stream each `interval` seconds, which keeps idle proxies from cutting
    them and reveals clients that are gone. One task for all: a task per stream cost each of
    thousands of idle followers a task, a timer, a future and a coroutine."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._streams: set[EventStreamResponse] = set()

    def add(self, stream: EventStreamResponse) -> None:
        self._streams.add(stream)

    def discard(self, stream: EventStreamResponse) -> None:
        self._streams.discard(stream)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            for stream in list(self._streams):
                await stream.ping()


class BatchedEventStreamResponse(EventStreamResponse):
    """SSE for our own clients (`?batch=true`): one frame per batch of events,
    `id: <last id>` and `data: <first id> [<event>,<event>,...]` (consecutive ids), so a
    client decodes a batch with one JSON parse and resumes by `Last-Event-ID` as ever."""

    format = "batch"

    def encoded(self, build_id: str, run: EventRun) -> tuple[_Rendered | bytes, int, int]:
        key = (build_id, run.first_id, run.last_id)
        if (data := _BATCHES.get(key)) is None:
            data = self.render(run)
            _BATCHES.put(key, data, len(data))
        return data, 0, len(data)

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

    def render_events(self, run: EventRun) -> list[str]:
        # A line over the daemon's limit came in pieces ("cont"): each piece prints as a line.
        parts = []
        for data in run.datas:
            payload = json.loads(data)
            parts.append(
                "".join(line + "\n" for line in plainlog.event_lines(payload) or plainlog.terminal_lines(payload))
            )
        return parts
