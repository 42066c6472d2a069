"""Engine responses read on a thread of their own.

The daemon's event loop can be busy for a while (a follower catching up on a long log, a big
batch of events); a stream read on that loop stalls with it, and the engine waits. For BuildKit's
build stream that is worse than slow: Docker 20.10's BuildKit, once over 1 MiB of output waits
in one status update, sends empty status messages for ever and the build never ends. So a build
stream is read by a second event loop on its own thread, which takes the GIL within the
interpreter's switch interval (5 ms) whatever the daemon's loop is doing, and hands what it
read to the daemon's loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

import aiodocker
import aiohttp

# At most this much is handed on at once, so no single piece of work holds the daemon's loop long.
SLICE_BYTES = 256 << 10
# Unprocessed bytes the reader keeps before it lets the engine wait after all.
READ_AHEAD_BYTES = 256 << 20
_FINISH_SECONDS = 5.0


class EngineStreams:
    """A thread, started on first use, with an event loop and an engine client of its own."""

    def __init__(self, docker_host: str | None) -> None:
        self._docker_host = docker_host
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._docker: aiodocker.Docker | None = None

    def _started(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="engine-streams", daemon=True)
            self._thread.start()
        return self._loop

    async def _client(self) -> aiodocker.Docker:
        # On the thread's loop: the client's session belongs to it.
        if self._docker is None:
            self._docker = aiodocker.Docker(url=self._docker_host, timeout=aiohttp.ClientTimeout())
        return self._docker

    async def aclose(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        if self._docker is not None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._docker.close(), loop))
            self._docker = None
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)
        loop.close()

    @contextlib.asynccontextmanager
    async def stream(
        self,
        path: str,
        method: str,
        *,
        params: Mapping[str, Any],
        headers: Mapping[str, str],
        data: AsyncIterable[bytes | memoryview] | None,
        timeout: aiohttp.ClientTimeout,
        limit: int = READ_AHEAD_BYTES,
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """A request whose response body is read on the thread: the body, in pieces of at most
        SLICE_BYTES, as an iterator on the caller's loop. The request's error (a DockerError, a
        broken connection) is raised by the iterator, after whatever came before it."""
        here = asyncio.get_running_loop()
        there = self._started()
        lock = threading.Lock()
        waiting: collections.deque[bytes] = collections.deque()
        size = 0
        notified = False
        arrived = asyncio.Event()
        finished = asyncio.Event()
        failure: BaseException | None = None
        room: asyncio.Event | None = None  # the thread's

        async def next_piece(iterator: AsyncIterator[bytes | memoryview]) -> bytes | memoryview | None:
            try:
                return await anext(iterator)
            except StopAsyncIteration:
                return None

        async def body(source: AsyncIterable[bytes | memoryview]) -> AsyncIterator[bytes | memoryview]:
            # On the thread; each piece is produced on the caller's loop, where its source lives.
            iterator = aiter(source)
            while True:
                piece = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(next_piece(iterator), here))
                if piece is None:
                    return
                yield piece

        def wake(*, done: bool = False) -> None:
            arrived.set()
            if done:
                finished.set()

        async def pump() -> None:
            nonlocal size, notified, failure, room
            room = asyncio.Event()
            room.set()
            try:
                docker = await self._client()
                async with docker._query(
                    path,
                    method,
                    params=params,
                    headers=headers,
                    data=None if data is None else body(data),
                    timeout=timeout,
                ) as response:
                    async for chunk in response.content.iter_any():
                        with lock:
                            waiting.append(chunk)
                            size += len(chunk)
                            full = size > limit
                            if full:
                                room.clear()
                            tell, notified = not notified, True
                        if tell:
                            here.call_soon_threadsafe(wake)
                        if full:
                            await room.wait()
            except BaseException as exc:  # noqa: BLE001 (handed to the caller's loop, which raises it)
                failure = exc
            finally:
                with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody listens
                    here.call_soon_threadsafe(lambda: wake(done=True))

        async def pieces() -> AsyncIterator[bytes]:
            nonlocal size, notified
            while True:
                with lock:
                    taken = b"".join(waiting)
                    waiting.clear()
                    was_full, size, notified = size > limit, 0, False
                if taken:
                    if was_full and room is not None:
                        there.call_soon_threadsafe(room.set)
                    for start in range(0, len(taken), SLICE_BYTES):
                        yield taken[start : start + SLICE_BYTES]
                        # Whatever the consumer did with the piece, others get their turn before the next.
                        await asyncio.sleep(0)
                    continue
                if finished.is_set():
                    if failure is not None and not isinstance(failure, asyncio.CancelledError):
                        raise failure
                    return
                await arrived.wait()
                arrived.clear()

        future = asyncio.run_coroutine_threadsafe(pump(), there)
        try:
            yield pieces()
        finally:
            # Dropping the connection is what tells the engine (a build stops with it).
            future.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_FINISH_SECONDS):
                    await asyncio.shield(finished.wait())
