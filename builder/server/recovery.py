"""Builds whose daemon died: this replica's own, found when it starts again, and those of
replicas whose lease expired (the reaper, on every replica)."""

from __future__ import annotations

import builtins
import json

import structlog

from builder.protocol import BuildStatus
from builder.server.cluster import Lease
from builder.server.engines.pool import EnginePool
from builder.server.events import UNCOMMITTED_LIMIT, EventLog, terminal_payload
from builder.server.records import BuildRecord, EventRun, utcnow
from builder.server.store import BuildStore

log = structlog.get_logger(__name__)

RESTARTED_MESSAGE = "daemon restarted"


class Recovery:
    def __init__(self, store: BuildStore, engines: EnginePool, lease: Lease) -> None:
        self._store = store
        self._engines = engines
        self._lease = lease

    async def recover_own(self) -> None:
        """Builds of this replica that were queued or running when it died: fail them (unless
        another replica did, as it found this one lost), and remove what they left on the engine."""
        for record in await self._store.unfinished(self._lease.replica_id):
            for container_id in record.containers:
                try:
                    await self._engines.for_tenant(record.namespace).remove_container(container_id)
                except Exception:
                    log.exception("leftover_container_removal_failed", container_id=container_id)
            record.containers = []
            if not record.status.terminal:
                await self._fail_interrupted(record, RESTARTED_MESSAGE)
            await self._store.save(record)

    async def fail_lost_replicas(self) -> builtins.list[str]:
        """The reaper: builds of replicas whose lease expired fail, with a terminal frame that their
        followers on every replica receive. Their leftovers are the lost replica's to remove when
        it starts again (its engine is its own)."""
        lost = await self._lease.claim_lost()
        for replica_id in lost:
            for record in await self._store.unfinished(replica_id):
                if not record.status.terminal:
                    await self._fail_interrupted(record, f"replica {replica_id} lost")
                    await self._store.save(record)
                    log.warning("lost_replica_build_failed", build_id=record.build_id, replica=replica_id)
            await self._lease.release_lost(replica_id)
        return lost

    async def _fail_interrupted(self, record: BuildRecord, error: str) -> None:
        """End a build whose daemon died: from its log's last word if it had one, else failed."""
        last_id = await self._store.last_event_id(record.build_id)
        stored = await self._store.read_events(record.build_id, after=last_id - 1, limit=1)
        if stored.terminal:
            # Its outcome was decided and logged, but the record was not saved after it (the
            # store failed, or the daemon died in between): the log has the last word.
            outcome = json.loads(stored.datas[-1])
            record.status = BuildStatus(outcome["status"])
            record.error = outcome.get("error")
            record.image_ref, record.image_id = outcome.get("image_ref"), outcome.get("image_id")
            record.last_event_id = stored.last_id
        else:
            # Followers may have been shown ids past the last committed one: skip them all.
            terminal = EventLog(record.build_id, last_id=last_id + UNCOMMITTED_LIMIT + 1).append(
                terminal_payload(BuildStatus.FAILED, error=error)
            )
            await self._store.append_events([(record.build_id, EventRun(terminal.id, [terminal.data]))])
            record.status = BuildStatus.FAILED
            record.error = error
            record.last_event_id = terminal.id
            log.warning("interrupted_build_failed", build_id=record.build_id, error=error)
        record.finished_at = record.finished_at or utcnow()
