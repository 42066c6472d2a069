"""The log hub: the only code that hands a build's events to its followers.

From the shared window of a build live here (its `EventLog`), from the store for what a window
has let go and for finished builds, and, for a build live on another replica, from one reader
of its log per replica whose window every follower here shares.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import structlog

from builder.server.cluster import LogTail
from builder.server.errors import TenantQuotaExceeded
from builder.server.events import FOLLOW_BATCH, EventLog, batch_end
from builder.server.records import EventRun
from builder.server.store import BuildStore, StoreUnavailable

log = structlog.get_logger(__name__)

# One blocking read waits this long for new events before it looks again.
_WAIT_SECONDS = 5.0
_READ_BATCH = 1000
# After a failed read (the store is away), the reader waits this long before the next.
_RETRY_SECONDS = 0.5
# Store reads kept for followers that come to the same place: a crowd that has fallen behind
# the window reads each batch once, and a follower whose socket is full holds a shared batch.
_SHARED_READS = 64


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
                run = await self._tail.wait(
                    remote.build_id, after=remote.last_id, timeout=_WAIT_SECONDS, limit=_READ_BATCH
                )
            except StoreUnavailable as exc:
                log.warning("remote_log_read_failed", build_id=remote.build_id, error=exc.message)
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            remote.extend_committed(run)

    async def close(self) -> None:
        tasks = [reader.task for reader in self._readers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class LogHub:
    def __init__(
        self,
        store: BuildStore,
        tail: LogTail,
        *,
        live: Callable[[str], EventLog | None],
        window: int,
        max_followers_per_tenant: int,
    ) -> None:
        self._store = store
        # The log of a build live on this replica, or None.
        self._live = live
        self._remote = RemoteLogs(store, tail, window=window)
        self._max_followers = max_followers_per_tenant
        self._followers: collections.Counter[str] = collections.Counter()  # open streams per tenant
        self.follower_count = 0  # open log streams
        self.lagged_followers = 0  # times a follower fell behind the window and read the store
        self._reads: collections.OrderedDict[tuple[str, int, int], asyncio.Future[EventRun]] = collections.OrderedDict()

    def check_follower(self, namespace: str) -> None:
        """Raise if the tenant has as many log streams open as it may."""
        if self._followers[namespace] >= self._max_followers:
            raise TenantQuotaExceeded(f"{self._max_followers} of your log streams are already open; retry later")

    async def follow(
        self, build_id: str, *, after: int, follow: bool, namespace: str
    ) -> AsyncGenerator[EventRun, None]:
        """Batches of every event with id > `after`, then live ones until the terminal event.

        With `follow=False`, only what exists now. A follower that falls behind the in-memory
        window reads the gap from the store, then rejoins live.
        """
        self.follower_count += 1
        self._followers[namespace] += 1
        try:
            async with contextlib.aclosing(self._follow(build_id, after=after, follow=follow)) as batches:
                async for batch in batches:
                    yield batch
        finally:
            self.follower_count -= 1
            self._followers[namespace] -= 1
            if not self._followers[namespace]:
                del self._followers[namespace]

    async def _follow(self, build_id: str, *, after: int, follow: bool) -> AsyncGenerator[EventRun, None]:
        if self._live(build_id) is not None:
            async with contextlib.aclosing(self._tail(build_id, self._live, after=after, follow=follow)) as batches:
                async for batch in batches:
                    yield batch
            return
        record = await self._store.get(build_id)
        if not follow or record is None or record.status.terminal:
            async with contextlib.aclosing(self._replay(build_id, after=after, upto=None)) as batches:
                async for batch in batches:
                    yield batch
            return
        # Live on another replica: followed from the store as its owner commits it.
        async with (
            self._remote.attach(build_id, after) as remote,
            contextlib.aclosing(self._tail(build_id, lambda _: remote, after=after, follow=follow)) as batches,
        ):
            async for batch in batches:
                yield batch

    async def _tail(
        self, build_id: str, live: Callable[[str], EventLog | None], *, after: int, follow: bool
    ) -> AsyncGenerator[EventRun, None]:
        """Events after `after` from a live log's shared window, or from the store for what the
        window has let go; `live` gives the log, or None once the build has left memory."""
        last = after
        while True:
            log = live(build_id)
            if log is None:
                async with contextlib.aclosing(self._replay(build_id, after=last, upto=None)) as batches:
                    async for batch in batches:
                        yield batch
                return
            run = log.events_after(last, FOLLOW_BATCH)
            if run is None:
                # Everything older than the window is committed: read it from the store.
                self.lagged_followers += 1
                upto = log.first_id - 1
                async with contextlib.aclosing(self._replay(build_id, after=last, upto=upto)) as batches:
                    async for batch in batches:
                        last = batch.last_id
                        yield batch
                # Ids skipped after a crash are in no store. Only up to where this replay was to
                # end: the window may have moved on meanwhile, and what it let go is read next.
                last = max(last, upto)
                continue
            if run:
                last = run.last_id
                yield run
                if run.terminal:
                    return
                continue
            if not follow or log.complete:
                # Nothing more will come (a client may resume at, or past, the terminal frame).
                return
            await log.wait_for_events(last)

    async def _replay(self, build_id: str, *, after: int, upto: int | None) -> AsyncGenerator[EventRun, None]:
        while upto is None or after < upto:
            run = await self._read(build_id, after=after, upto=upto)
            if not run:
                return
            yield run
            after = run.last_id

    async def _read(self, build_id: str, *, after: int, upto: int | None) -> EventRun:
        """Events after `after` from the store, up to the next multiple of the batch size (as
        `EventLog.events_after`), or to where their ids skip: followers at the same place share one
        read and its events."""
        end = batch_end(after, FOLLOW_BATCH)
        if upto is not None:
            end = min(end, upto)
        key = (build_id, after, end)
        if (read := self._reads.get(key)) is None:
            read = self._reads[key] = asyncio.ensure_future(
                self._store.read_events(build_id, after=after, upto=end, limit=FOLLOW_BATCH)
            )
            read.add_done_callback(lambda done: self._forget_short_read(key, done))
            if len(self._reads) > _SHARED_READS:
                self._reads.popitem(last=False)
        # Shielded: one follower hanging up must not end a read others wait for.
        run = await asyncio.shield(read)
        if not run and end != upto:
            # Nothing in the range: the log ends here, or its ids skip past it (after a crash).
            run = await self._store.read_events(build_id, after=after, upto=upto, limit=FOLLOW_BATCH)
        return run

    def _forget_short_read(self, key: tuple[str, int, int], read: asyncio.Future[EventRun]) -> None:
        # A failed read, or one that found less than its range (the rest was not stored yet), is not kept.
        _, after, end = key
        short = read.cancelled() or read.exception() is not None or len(read.result()) < end - after
        if short and self._reads.get(key) is read:
            del self._reads[key]

    async def close(self) -> None:
        await self._remote.close()
