"""Per-build event log: numbering, fan-out to followers, and hand-off to the store.

Race-free replay-then-live: a follower subscribes (synchronously, so no event can
slip between) and at that instant snapshots the events not yet committed to the
store. Everything older is in the store, everything newer reaches its queue, and
ids let it drop any overlap.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from builder import protocol
from builder.server.records import Event


class SubscriberLagged(Exception):
    """The follower fell too far behind; it must catch up from the store."""


class Subscription:
    def __init__(self, log: EventLog, max_queued: int, snapshot: list[Event]) -> None:
        self._log = log
        self._max_queued = max_queued
        self._queue: collections.deque[Event] = collections.deque()
        self._wakeup = asyncio.Event()
        self._lagged = False
        self.snapshot = snapshot
        self.closed = False

    def _push(self, event: Event) -> None:
        if self._lagged:
            return
        if len(self._queue) >= self._max_queued:
            # Bounded memory: drop the backlog, the follower re-reads from the store.
            self._lagged = True
            self._queue.clear()
        else:
            self._queue.append(event)
        self._wakeup.set()

    async def next_batch(self) -> list[Event]:
        while not self._queue:
            if self._lagged:
                raise SubscriberLagged
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = list(self._queue)
        self._queue.clear()
        return batch

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._log._subscribers.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventLog:
    """Live log of one build that has not finished and been fully persisted."""

    def __init__(self, build_id: str, *, last_id: int = 0, max_queued: int = 10_000) -> None:
        self.build_id = build_id
        self.last_id = last_id
        self._max_queued = max_queued
        self._subscribers: set[Subscription] = set()
        # Appended but not yet committed to the store, oldest first.
        self._uncommitted: collections.deque[Event] = collections.deque()
        self.terminated = False

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def append(self, payload: dict[str, Any]) -> Event:
        if self.terminated:
            raise RuntimeError(f"event log of {self.build_id} is terminated")
        self.last_id += 1
        event = Event(self.last_id, protocol.dump_event(payload), protocol.is_terminal_event(payload))
        self.terminated = event.terminal
        self._uncommitted.append(event)
        for sub in self._subscribers:
            sub._push(event)
        return event

    def subscribe(self) -> Subscription:
        sub = Subscription(self, self._max_queued, list(self._uncommitted))
        self._subscribers.add(sub)
        return sub

    def uncommitted(self) -> list[Event]:
        """Events to write next; they stay visible to new subscribers until `committed`.

        The caller serialises flushes, so nothing else commits in between.
        """
        return list(self._uncommitted)

    def committed(self, count: int) -> None:
        for _ in range(count):
            self._uncommitted.popleft()

    @property
    def fully_committed(self) -> bool:
        return self.terminated and not self._uncommitted
