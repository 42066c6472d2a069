"""Persistence of build records and log events (the only code that touches the database).

`BuildStore` is the interface the service depends on; `SqliteBuildStore` is the
embedded default. SQLite calls run on two dedicated threads (one writer, one
reader; WAL lets them overlap) so the event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import datetime
import functools
import json
import sqlite3
from collections.abc import Callable, Sequence, Set
from pathlib import Path
from typing import Protocol, TypeVar

from builder.protocol import BuildStatus
from builder.server.errors import StoreFailing
from builder.server.records import BuildRecord, EventRun, rfc3339, utcnow

T = TypeVar("T")

# Most events stored in one row: a reader of `limit` events touches at most a few rows.
_BATCH_EVENTS = 1000
# ...and at most this many bytes, so a batch of long lines stays a reasonable row.
_BATCH_BYTES = 1 << 20
_PAGE_SIZE = 1 << 16
_CHECKPOINT_BYTES = 4 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS builds (
    build_id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    finished_at TEXT,
    record TEXT NOT NULL
);
-- Idempotency-Key of a POST /builds -> the build it started, with a fingerprint of the request.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    build_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (namespace, key)
);
-- Tombstones of builds removed by retention: their endpoints answer 410, not 404.
CREATE TABLE IF NOT EXISTS expired_builds (
    build_id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    expired_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS builds_by_status ON builds (namespace, status);
-- Log events in batches of consecutive ids: `data` is their JSON lines joined by newlines
-- (a dumped event never contains one). A row per batch, not per line, keeps a chatty
-- build from costing a database row per output line. A rowid table: rows are appended,
-- so a big row never has to be read again to insert the next one beside it.
CREATE TABLE IF NOT EXISTS event_batches (
    build_id TEXT NOT NULL,
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS event_batches_by_build ON event_batches (build_id, first_id);
"""
# Data dirs from before event_batches kept the same rows in a WITHOUT ROWID table.
_MIGRATE_EVENT_RUNS = """
INSERT OR IGNORE INTO event_batches (build_id, first_id, last_id, data)
    SELECT build_id, first_id, last_id, data FROM event_runs;
DROP TABLE event_runs;
"""


class StoreUnavailable(StoreFailing):
    """The store could not write (a full disk, say), or cannot be reached (a Redis away): nothing
    of that write was kept. A request that meets it gets a 503."""


class BuildStore(Protocol):
    """Build records, their event logs, retention tombstones and Idempotency-Keys.

    Event ids are per build, from 1, contiguous; `append_events` of ids already stored is a no-op.
    """

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def save(self, record: BuildRecord) -> None: ...
    async def get(self, build_id: str) -> BuildRecord | None: ...
    async def list(self, *, namespace: str, status: BuildStatus | None, limit: int) -> list[BuildRecord]: ...
    async def unfinished(self, owner: str) -> builtins.list[BuildRecord]:
        """Builds of replica `owner` that did not end cleanly: queued or running ones, and ones
        another replica ended for it (it was lost) while their `containers` still name leftovers."""
        ...

    async def append_events(self, logs: Sequence[tuple[str, EventRun]]) -> None: ...
    async def read_events(self, build_id: str, *, after: int, upto: int | None = None, limit: int = 1000) -> EventRun:
        """Up to `limit` events after `after` (and at most `upto`), consecutive from the first one
        stored: where ids skip (after a crash), the run ends, and the next read goes on past it."""
        ...

    async def last_event_id(self, build_id: str) -> int: ...
    async def expire(self, *, finished_before: str, keep: int, exclude: Set[str]) -> builtins.list[str]: ...
    async def is_expired(self, build_id: str, namespace: str) -> bool: ...
    async def claim_idempotent(
        self, namespace: str, key: str, *, window: float, pending: float
    ) -> tuple[str, str] | None:
        """Claim `key` for a new submit, atomically across every daemon sharing the store. None:
        the key is now the caller's (for `pending` seconds, until `remember_idempotent`). Else
        (fingerprint, build_id) of the submit that holds it, within `window` seconds; build_id
        is "" while that submit has not been accepted yet."""
        ...

    async def remember_idempotent(
        self, namespace: str, key: str, fingerprint: str, build_id: str, *, window: float
    ) -> None: ...
    async def release_idempotent(self, namespace: str, key: str) -> None:
        """Let a claimed key go: the submit that claimed it was refused."""
        ...


class SqliteBuildStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-reader")
        self._write_conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._write_conn = await self._on(self._writer, self._connect, True)
        self._read_conn = await self._on(self._reader, self._connect, False)

    async def close(self) -> None:
        for executor, conn in ((self._writer, self._write_conn), (self._reader, self._read_conn)):
            if conn is not None:
                await self._on(executor, conn.close)
            executor.shutdown(wait=True)
        self._write_conn = self._read_conn = None

    def _connect(self, writer: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        if writer:
            # Set before any table exists (a data dir made by an older version keeps its own).
            # Space freed by retention goes back to the file system. Large pages: a row of log
            # events is ~70 KiB, which 4 KiB pages store as a chain of 18 overflow pages, each its
            # own WAL frame; a chatty build commits three times faster in 64 KiB pages.
            conn.execute(f"PRAGMA page_size={_PAGE_SIZE}")
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        # After a checkpoint the WAL file is cut back to this size rather than kept at its peak.
        conn.execute(f"PRAGMA journal_size_limit={8 << 20}")
        # WAL + NORMAL: a commit is durable across a process crash; one fsync per checkpoint.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        if writer:
            # Checkpoint after about as many bytes as SQLite's default (1,000 pages of 4 KiB) does.
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA wal_autocheckpoint={max(1, _CHECKPOINT_BYTES // page_size)}")
            conn.executescript(_SCHEMA)
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'event_runs'").fetchone():
                conn.executescript(f"BEGIN; {_MIGRATE_EVENT_RUNS} COMMIT;")
        return conn

    @staticmethod
    async def _on(executor: concurrent.futures.Executor, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args))

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._write_conn
        assert conn is not None, "store is not open"
        try:
            return await self._on(self._writer, _in_transaction, conn, fn)
        except (sqlite3.OperationalError, sqlite3.DatabaseError, OSError) as exc:
            # A full disk, a read-only file system, a lock held too long: nothing was written.
            raise StoreUnavailable(str(exc)) from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._read_conn
        assert conn is not None, "store is not open"
        return await self._on(self._reader, fn, conn)

    async def save(self, record: BuildRecord) -> None:
        data = record.to_storage()
        row = (record.build_id, record.namespace, record.status.value, data["finished_at"], json.dumps(data))
        await self._write(
            lambda c: c.execute(
                "INSERT INTO builds (build_id, namespace, status, finished_at, record) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (build_id) DO UPDATE SET status = excluded.status, "
                "finished_at = excluded.finished_at, record = excluded.record",
                row,
            )
        )

    async def get(self, build_id: str) -> BuildRecord | None:
        rows = await self._read(
            lambda c: c.execute("SELECT record FROM builds WHERE build_id = ?", (build_id,)).fetchall()
        )
        return BuildRecord.from_storage(json.loads(rows[0][0])) if rows else None

    async def list(self, *, namespace: str, status: BuildStatus | None, limit: int) -> list[BuildRecord]:
        # rowid order is insertion order, and upserts keep the rowid: newest first.
        if status is None:
            query = "SELECT record FROM builds WHERE namespace = ? ORDER BY rowid DESC LIMIT ?"
            args: tuple[object, ...] = (namespace, limit)
        else:
            query = "SELECT record FROM builds WHERE namespace = ? AND status = ? ORDER BY rowid DESC LIMIT ?"
            args = (namespace, status.value, limit)
        rows = await self._read(lambda c: c.execute(query, args).fetchall())
        return [BuildRecord.from_storage(json.loads(r[0])) for r in rows]

    async def unfinished(self, owner: str) -> builtins.list[BuildRecord]:
        # One daemon per database file: every unfinished build in it is this daemon's.
        rows = await self._read(
            lambda c: c.execute(
                "SELECT record FROM builds WHERE status IN (?, ?) ORDER BY rowid",
                (BuildStatus.QUEUED.value, BuildStatus.RUNNING.value),
            ).fetchall()
        )
        return [BuildRecord.from_storage(json.loads(r[0])) for r in rows]

    async def append_events(self, logs: Sequence[tuple[str, EventRun]]) -> None:
        # Grouped on the writer's thread: tens of thousands of events must not hold the event loop.
        await self._write(
            lambda c: c.executemany(
                "INSERT OR IGNORE INTO event_batches (build_id, first_id, last_id, data) VALUES (?, ?, ?, ?)",
                _event_rows(logs),
            )
        )

    async def read_events(self, build_id: str, *, after: int, upto: int | None = None, limit: int = 1000) -> EventRun:
        upper = upto if upto is not None else 2**62

        def read(c: sqlite3.Connection) -> EventRun:
            datas: list[str] = []
            first = after + 1
            rows = c.execute(
                "SELECT first_id, data FROM event_batches WHERE build_id = ? AND last_id > ? AND first_id <= ? "
                "ORDER BY first_id",
                (build_id, after, upper),
            )
            for first_id, data in rows:  # row by row: only as many as `limit` needs are read
                start = max(first_id, after + 1)
                if not datas:
                    first = start
                elif start != first + len(datas):
                    break  # ids skip here
                lines = data.split("\n")[start - first_id : upper + 1 - first_id]
                datas += lines[: limit - len(datas)]
                if len(datas) >= limit:
                    break
            return EventRun(first, datas)

        return await self._read(read)

    async def last_event_id(self, build_id: str) -> int:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT COALESCE(MAX(last_id), 0) FROM event_batches WHERE build_id = ?", (build_id,)
            ).fetchall()
        )
        return int(rows[0][0])

    async def expire(self, *, finished_before: str, keep: int, exclude: Set[str]) -> builtins.list[str]:
        """Remove finished builds older than `finished_before` (RFC 3339) or beyond each tenant's newest `keep`."""

        def expire(c: sqlite3.Connection) -> list[str]:
            # `keep` per tenant: one tenant's many builds do not evict another's few.
            rows = c.execute(
                "SELECT build_id, namespace FROM (SELECT build_id, namespace, finished_at, "
                "ROW_NUMBER() OVER (PARTITION BY namespace ORDER BY rowid DESC) AS newest FROM builds) "
                "WHERE finished_at IS NOT NULL AND (finished_at < ? OR newest > ?)",
                (finished_before, keep),
            ).fetchall()
            expired = [(build_id, namespace) for build_id, namespace in rows if build_id not in exclude]
            now = rfc3339(utcnow())
            for build_id, namespace in expired:
                c.execute("DELETE FROM event_batches WHERE build_id = ?", (build_id,))
                c.execute("DELETE FROM builds WHERE build_id = ?", (build_id,))
                c.execute("INSERT OR REPLACE INTO expired_builds VALUES (?, ?, ?)", (build_id, namespace, now))
            return [build_id for build_id, _ in expired]

        expired = await self._write(expire)
        if expired:
            await self._on(self._writer, self._reclaim)
        return expired

    def _reclaim(self) -> None:
        conn = self._write_conn
        assert conn is not None
        conn.execute("PRAGMA incremental_vacuum")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def is_expired(self, build_id: str, namespace: str) -> bool:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT 1 FROM expired_builds WHERE build_id = ? AND namespace = ?", (build_id, namespace)
            ).fetchall()
        )
        return bool(rows)

    async def claim_idempotent(
        self, namespace: str, key: str, *, window: float, pending: float
    ) -> tuple[str, str] | None:
        now = utcnow()
        since = rfc3339(now - datetime.timedelta(seconds=window))
        pending_since = rfc3339(now - datetime.timedelta(seconds=pending))

        def claim(c: sqlite3.Connection) -> tuple[str, str] | None:
            rows = c.execute(
                "SELECT fingerprint, build_id FROM idempotency_keys WHERE namespace = ? AND key = ? "
                "AND created_at >= CASE build_id WHEN '' THEN ? ELSE ? END",
                (namespace, key, pending_since, since),
            ).fetchall()
            if rows:
                return (rows[0][0], rows[0][1])
            row = (namespace, key, rfc3339(now))
            c.execute("INSERT OR REPLACE INTO idempotency_keys VALUES (?, ?, '', '', ?)", row)
            return None

        return await self._write(claim)

    async def remember_idempotent(
        self, namespace: str, key: str, fingerprint: str, build_id: str, *, window: float
    ) -> None:
        row = (namespace, key, fingerprint, build_id, rfc3339(utcnow()))
        await self._write(lambda c: c.execute("INSERT OR REPLACE INTO idempotency_keys VALUES (?, ?, ?, ?, ?)", row))

    async def release_idempotent(self, namespace: str, key: str) -> None:
        await self._write(
            lambda c: c.execute(
                "DELETE FROM idempotency_keys WHERE namespace = ? AND key = ? AND build_id = ''", (namespace, key)
            )
        )


def _in_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (SQLITE_FULL does): a failing ROLLBACK must not
        # hide why the transaction failed.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return result


def _event_rows(logs: Sequence[tuple[str, EventRun]]) -> list[tuple[str, int, int, str]]:
    """(build, first id, last id, lines) rows of at most _BATCH_EVENTS events and about _BATCH_BYTES."""
    rows = []
    for build_id, run in logs:
        datas = run.datas
        start = 0
        while start < len(datas):
            # A row's worth joined at once (a chatty build commits 10^5 events at a time, on the
            # thread the event loop shares its lock with); cut shorter only when lines are long.
            chunk = datas[start : start + _BATCH_EVENTS]
            data = "\n".join(chunk)
            if len(data) > _BATCH_BYTES and len(chunk) > 1:
                chunk = chunk[: _fitting(chunk)]
                data = "\n".join(chunk)
            rows.append((build_id, run.first_id + start, run.first_id + start + len(chunk) - 1, data))
            start += len(chunk)
    return rows


def _fitting(datas: Sequence[str]) -> int:
    """How many of `datas`, from the first, one row takes: those within _BATCH_BYTES, at least one."""
    size = 0
    for count, data in enumerate(datas):
        size += len(data)
        if size > _BATCH_BYTES:
            return max(count, 1)
    return len(datas)
