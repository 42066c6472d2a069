"""Live logs of builds that run on another replica, read from the store once per replica.

Every follower here of such a build shares one reader of its log and one window of its recent
events (an `EventLog`, as for a build running here); the reader stops with the last follower.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import structlog

from builder.server.cluster import LogTail
from builder.server.events import EventLog
from builder.server.store import BuildStore, StoreUnavailable

log = structlog.get_logger(__name__)

# One blocking read waits this long for new events before it looks again.
_WAIT_SECONDS = 5.0
_READ_BATCH = 1000
# After a failed read (the store is away), the reader waits this long before the next.
_RETRY_SECONDS = 0.5


@dataclasses.dataclass
class _Reader:
    log: EventLog
    task: asyncio.Task[None]
    followers: int = 0


class RemoteLogs:
    def __init__(self, store: BuildStore, tail: LogTail, *, window: int) -> None:
        self._store = store
        self._tail = tail
        self._window = window
        self._readers: dict[str, _Reader] = {}

    @contextlib.asynccontextmanager
    async def attach(self, build_id: str, after: int) -> AsyncIterator[EventLog]:
        """The shared log of a build live elsewhere, while the caller follows it. The first
        follower's cursor is where its reading starts: one further behind reads the store."""
        reader = self._readers.get(build_id)
        if reader is None:
            remote = EventLog(build_id, last_id=after, window=self._window)
            reader = _Reader(remote, asyncio.create_task(self._read(remote), name=f"remote-log-{build_id}"))
            self._readers[build_id] = reader
        reader.followers += 1
        try:
            yield reader.log
        finally:
            reader.followers -= 1
            if not reader.followers:
                del self._readers[build_id]
                reader.task.cancel()

    async def _read(self, remote: EventLog) -> None:
        while not remote.terminated:
            try:
                events = await self._tail.wait(
                    remote.build_id, after=remote.last_id, timeout=_WAIT_SECONDS, limit=_READ_BATCH
                )
            except StoreUnavailable as exc:
                log.warning("remote_log_read_failed", build_id=remote.build_id, error=exc.message)
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            remote.extend_committed(events)

    async def close(self) -> None:
        tasks = [reader.task for reader in self._readers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
