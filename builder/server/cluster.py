"""What daemons sharing one store need of each other: a lease per replica, a control channel
to the replica that owns a build, and the live tail of a build's log written elsewhere.

Each is an interface with a local implementation (one daemon: nothing to share) here and a
Redis one in `redis_cluster.py`. The service depends on the interfaces only.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
from collections.abc import AsyncIterator
from typing import Protocol

from builder.server.records import EventRun
from builder.server.store import BuildStore


class Lease(Protocol):
    """This replica's claim to the builds it owns, kept alive while it runs."""

    replica_id: str
    # Seconds after its last heartbeat that a replica counts as lost.
    ttl: float

    async def start(self) -> None:
        """Take the lease and heartbeat it (every ttl/3) until `stop`."""
        ...

    async def stop(self) -> None:
        """Stop heartbeating and let the lease go (a clean shutdown: nothing of ours is running)."""
        ...

    async def claim_lost(self) -> builtins.list[str]:
        """Replicas whose lease has expired, each handed to one caller (across the cluster) at a
        time to fail its builds."""
        ...

    async def release_lost(self, replica_id: str) -> None:
        """The lost replica's builds are failed: forget it until it takes a lease again."""
        ...


class ControlChannel(Protocol):
    """Requests to the replica that owns a build (cancel is the one there is)."""

    async def send_cancel(self, replica_id: str, build_id: str) -> None: ...

    def cancels(self) -> AsyncIterator[str]:
        """Ids of builds this replica is asked to cancel, as the requests arrive (for ever)."""
        ...


class LogTail(Protocol):
    """Events of a build whose owner is another replica, as they are committed."""

    async def wait(self, build_id: str, *, after: int, timeout: float, limit: int) -> EventRun:
        """Up to `limit` events with id > `after`, consecutive from the first (as the store's
        `read_events`); waits up to `timeout` seconds for the first."""
        ...


class LocalLease:
    """One daemon: no other replica to lose."""

    def __init__(self, replica_id: str) -> None:
        self.replica_id = replica_id
        self.ttl = float("inf")

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def claim_lost(self) -> builtins.list[str]:
        return []

    async def release_lost(self, replica_id: str) -> None:
        return None


class LocalControl:
    """One daemon owns every build: nothing is ever sent to another."""

    async def send_cancel(self, replica_id: str, build_id: str) -> None:
        raise RuntimeError(f"no replica {replica_id} to reach: this daemon runs alone")

    async def cancels(self) -> AsyncIterator[str]:
        await asyncio.Event().wait()
        yield ""  # pragma: no cover  (never reached: an async generator needs a yield)


class LocalTail:
    """One daemon: a build that is not live here has ended, and its log is all in the store."""

    async def wait(self, build_id: str, *, after: int, timeout: float, limit: int) -> EventRun:
        await asyncio.sleep(timeout)
        return EventRun(after + 1)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What this daemon shares with the others: the store, and how it reaches them."""

    store: BuildStore
    lease: Lease
    control: ControlChannel
    tail: LogTail

    async def open(self) -> None:
        await self.store.open()

    async def close(self) -> None:
        await self.store.close()


def alone(store: BuildStore, replica_id: str) -> Cluster:
    """One daemon with its embedded store."""
    return Cluster(store, LocalLease(replica_id), LocalControl(), LocalTail())
