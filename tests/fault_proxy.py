"""A TCP proxy that injects the faults a real network and a replica set produce (a test fake, by design).

Between the SDK and the real daemon it: answers 404 to the first log requests (the build is
not known yet where the request lands), 503 to some of the rest, and cuts log responses after
a random number of bytes, often mid-frame. Every request goes upstream with `Connection: close`
so each request meets the fault logic on a connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import random


def _json_response(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


_FAKE_404 = _json_response("404 Not Found", b'{"error": "no build with that id here", "code": "build_not_found"}')
_FAKE_503 = _json_response("503 Service Unavailable", b'{"error": "replica restarting", "code": "unavailable"}')


class FaultProxy:
    def __init__(
        self,
        upstream_port: int,
        *,
        not_found_first: int = 0,
        unavailable_rate: float = 0.0,
        cut_after: tuple[int, int] | None = None,
        lose_post_answers: int = 0,
        seed: int = 7,
    ) -> None:
        self.upstream_port = upstream_port
        # POSTs that reach the daemon but whose answer never comes back (the classic lost 202).
        self.lose_post_answers = lose_post_answers
        self.lost_answers = 0
        self.not_found_first = not_found_first
        self.unavailable_rate = unavailable_rate
        self.cut_after = cut_after
        self.rng = random.Random(seed)
        self.log_requests = self.not_found = self.unavailable = self.cuts = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a cut or the proxy closing: that is the point
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0]
        is_log = request_line.startswith(b"GET ") and b"/logs" in request_line
        budget = None
        lose_answer = request_line.startswith(b"POST ") and self.lost_answers < self.lose_post_answers
        if lose_answer:
            self.lost_answers += 1
        if is_log:
            self.log_requests += 1
            if self.log_requests <= self.not_found_first:
                self.not_found += 1
                writer.write(_FAKE_404)
                return
            if self.rng.random() < self.unavailable_rate:
                self.unavailable += 1
                writer.write(_FAKE_503)
                return
            if self.cut_after is not None:
                budget = self.rng.randint(*self.cut_after)
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
        head = b"\r\n".join([*lines[:1], b"Connection: close", *lines[1:]])
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        up_writer.write(head)
        upload = asyncio.create_task(_pipe(reader, up_writer))
        try:
            sent = 0
            if lose_answer:
                await up_reader.read()  # the daemon answers in full; the client never hears it
                return
            while data := await up_reader.read(65536):
                if budget is not None and sent + len(data) > budget:
                    writer.write(data[: budget - sent])
                    await writer.drain()
                    self.cuts += 1
                    return
                sent += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            upload.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await upload
            up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
