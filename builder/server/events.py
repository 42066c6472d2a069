"""Per-build event log: numbering, a shared in-memory window of recent events, hand-off to the store.

Followers share one window (no per-follower queues) and each keeps only a cursor, so a
follower costs O(1) memory however far behind it is. Race-free replay-then-live: the
window only ever drops events the store has committed, so a follower whose cursor
is older than the window reads the gap from the store and looks again; all on one
event loop, nothing can slip between the two.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from builder import protocol
from builder.protocol import BuildStatus, is_terminal_data
from builder.server.records import Event, EventRun
from builder.server.turnstile import Turnstile

# Followers see at most this many events beyond what the store has committed (and the terminal
# event right after them). A daemon that crashes has shown no id past (last committed + this + 1),
# so after a restart the build's next event takes an id after that: ids are never given twice,
# whatever the crash lost.
UNCOMMITTED_LIMIT = 1 << 16
# A build's engine reader waits while more events than this wait for the store: an engine that
# outruns the store (a burst of a million lines) leaves its output in the engine stream's compact
# bytes, not in a growing list of events. The same as UNCOMMITTED_LIMIT: past it, a store that
# cannot write fails the build (service.py), which releases the reader.
BACKLOG_LIMIT = UNCOMMITTED_LIMIT


# Most events handed to a follower at once, in batches that end at multiples of it: the unit in
# which followers read the store and share rendered bytes (streams.py). Large, so one that is behind
# catches up in few writes.
FOLLOW_BATCH = 4000


# Runs an EventLog keeps to hand to followers that ask for the same events.
SHARED_RUNS = 16


def batch_end(after: int, size: int) -> int:
    """The last id of the batch after `after`: batches of followers end at multiples of `size`, so
    followers at different places soon read (and render) the same ones."""
    return (after // size + 1) * size


class EventLog:
    """Live log of one build that has not finished and been fully persisted."""

    def __init__(
        self,
        build_id: str,
        *,
        last_id: int = 0,
        window: int = 20_000,
        coalesce: float = 0.0,
        flush_soon: Callable[[], None] = lambda: None,
    ) -> None:
        self.build_id = build_id
        self.last_id = last_id
        self.committed_id = last_id
        self.terminated = False
        self._window = window
        self._coalesce = coalesce
        self._datas: list[str] = []  # of events first_id .. last_id
        # Followers waiting for events: woken a group per turn of the loop, not thousands at once.
        self._arrivals = Turnstile()
        self._stored = asyncio.Event()  # set by each commit, and when the build is stopping
        # Asks the flusher to commit now rather than at its next tick: the reader is waiting.
        self._flush_soon = flush_soon
        self._stopping = False
        # The runs last handed out, by (after, last id): followers at the same place share one
        # list of the events rather than each holding a copy (32 KiB for a whole batch) while
        # their sockets are full.
        self._runs: dict[tuple[int, int], EventRun] = {}

    @property
    def first_id(self) -> int:
        """Oldest id still in memory (last_id + 1 when none is)."""
        return self.last_id + 1 - len(self._datas)

    def append(self, payload: dict[str, Any]) -> Event:
        data = protocol.dump_event(payload)
        self.extend_data([data])
        return Event(self.last_id, data, self.terminated)

    def extend_data(self, datas: list[str]) -> None:
        """Number and buffer a batch of events already dumped (`protocol.dump_*`), then wake the
        followers once: a chatty build's engine read is one wake-up, not one per line."""
        if not datas:
            return
        if self.terminated:
            raise RuntimeError(f"event log of {self.build_id} is terminated")
        self._datas.extend(datas)
        self.last_id += len(datas)
        self.terminated = is_terminal_data(datas[-1])  # only the last can be: nothing follows one
        self._wake()

    def extend_committed(self, run: EventRun) -> None:
        """Add events read back from the store (another replica wrote them), ids as given: a gap
        (ids a lost replica's log skipped) restarts the window after it."""
        if not run:
            return
        if run.first_id != self.last_id + 1:
            self._datas.clear()
        self._datas.extend(run.datas)
        self.last_id = run.last_id
        self.terminated = run.terminal
        self.committed(self.last_id)
        self._wake()

    def _wake(self) -> None:
        self._arrivals.let_through()

    @property
    def visible_id(self) -> int:
        """The last id followers may be shown: never too far ahead of the store."""
        limit = self.committed_id + UNCOMMITTED_LIMIT
        # The terminal event right after that limit is shown too: a build must end for its followers.
        return self.last_id if self.terminated and self.last_id <= limit + 1 else min(self.last_id, limit)

    def drop_unshown(self) -> None:
        """Forget events no follower was shown (the store could not take them): the terminal event
        then comes right after what followers saw."""
        if self.terminated or self.visible_id == self.last_id:
            return
        del self._datas[self.visible_id + 1 - self.first_id :]
        self.last_id = self.visible_id

    @property
    def complete(self) -> bool:
        """The terminal event is in, and followers may be shown it: nothing more will come."""
        return self.terminated and self.visible_id == self.last_id

    def events_after(self, after: int, limit: int) -> EventRun | None:
        """Up to `limit` visible events with id > `after` from memory, or None if the next is only
        in the store. A batch never crosses a multiple of `limit`: followers at different places
        soon ask for the same batches, whose rendered bytes they then share (streams.py), and a
        follower whose socket is full holds a batch others hold too, not one of its own."""
        first = self.first_id
        if after + 1 < first:
            return None
        last = min(batch_end(after, limit), self.visible_id)
        if (run := self._runs.get((after, last))) is None:
            run = self._runs[after, last] = EventRun(after + 1, self._datas[after + 1 - first : last + 1 - first])
            if len(self._runs) > SHARED_RUNS:
                del self._runs[next(iter(self._runs))]
        return run

    def uncommitted(self) -> EventRun:
        start = self.committed_id + 1
        return EventRun(start, self._datas[start - self.first_id :])

    def committed(self, upto: int) -> None:
        """Events up to `upto` are in the store: the window may let them go."""
        held_back = self.visible_id < self.last_id
        self.committed_id = upto
        self._stored.set()
        if held_back:
            self._wake()
        excess = len(self._datas) - self._window
        # Trim in bulk, and never past what the store has.
        if excess > self._window // 4:
            drop = min(excess, upto + 1 - self.first_id)
            if drop > 0:
                del self._datas[:drop]

    async def wait_for_store(self) -> None:
        """Return once at most BACKLOG_LIMIT events wait for the store, or the build is stopping
        (then a store that cannot write must not hold its reader up)."""
        while self.last_id - self.committed_id > BACKLOG_LIMIT and not self._stopping:
            self._stored.clear()
            self._flush_soon()
            await self._stored.wait()

    def stop_waiting(self) -> None:
        self._stopping = True
        self._stored.set()

    @property
    def fully_committed(self) -> bool:
        return self.terminated and self.committed_id == self.last_id

    async def wait_for_events(self, after: int) -> None:
        """Return once there is a visible event with id > `after` (after a short coalescing pause)."""
        if self.visible_id > after:
            return
        await self._arrivals.wait()
        if self._coalesce:
            # Let a chatty build's lines pile up briefly: one write per follower per window
            # instead of one per engine read, which is what costs with many followers.
            await asyncio.sleep(self._coalesce)


def terminal_payload(
    status: BuildStatus, *, error: str | None, image_ref: str | None = None, image_id: str | None = None
) -> dict[str, Any]:
    """The last event of a build's log: its outcome."""
    if status is BuildStatus.SUCCEEDED:
        return {
            "type": protocol.EVENT_DONE,
            "done": True,
            "status": status.value,
            "image_ref": image_ref,
            "image_id": image_id,
        }
    return {"type": protocol.EVENT_ERROR, "error": error or status.value, "status": status.value}
