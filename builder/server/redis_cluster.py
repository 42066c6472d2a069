"""Cluster mode: several daemons, each with its own Docker engine, sharing one Redis (7.x).

The Redis implementations of `BuildStore` (store.py) and of `Lease`, `ControlChannel` and
`LogTail` (cluster.py). `open_cluster` connects them all to one server.

Keys (namespaces never contain ":", see auth.py, so none of these can collide):

    builder:build:<build_id>            hash: `record` (the record's JSON) and the fields it is
                                        indexed by: namespace, status, owner, created_at,
                                        finished_at ("" while running)
    builder:events:<build_id>           stream: event N is entry `N-0`, field `data`
    builder:builds:<namespace>          zset: the namespace's build ids, scored by created_at (ms)
    builder:by-status:<status>:<ns>     zset: the same, for one status
    builder:namespaces                  set: every namespace with builds
    builder:finished                    zset: finished build ids, scored by finished_at (ms)
    builder:open:<owner>                set: ids of the replica's builds that are not done with:
                                        queued or running, or ended with containers left over
    builder:expired:<build_id>          string: the namespace of a build removed by retention
                                        (expires after 30 days)
    builder:idempotency:<ns>:<key>      string: JSON {fingerprint, build_id}; build_id "" while
                                        the submit that claimed it is pending
    builder:replicas                    set: replica ids that have taken a lease
    builder:lease:<replica_id>          string: alive while the replica heartbeats (PX lease ttl)
    builder:reap:<replica_id>           string: the replica failing a lost one's builds (PX ttl)
    builder:control:<replica_id>        stream: cancels routed to the replica (field build_id)

A finished build's hash and stream also get a TTL of the retention plus a day: a safety net
for when no daemon runs the retention sweep, which leaves no tombstone (its ids answer 404,
not 410). Index entries it leaves dangling are dropped when next read.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import socket
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Sequence, Set
from typing import Any, Final

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from builder.protocol import BuildStatus
from builder.server.cluster import Cluster
from builder.server.records import BuildRecord, EventRun
from builder.server.store import StoreUnavailable

log = structlog.get_logger(__name__)

PREFIX: Final = "builder:"
_NAMESPACES = PREFIX + "namespaces"
_FINISHED = PREFIX + "finished"
_REPLICAS = PREFIX + "replicas"

# How long a 410 outlives the build it stands for.
TOMBSTONE_SECONDS: Final = 30 * 24 * 3600
# The safety-net TTL of a finished build exceeds the retention by this much, so that the sweep
# (every --retention-interval) gets to it first and leaves a tombstone.
_SAFETY_MARGIN = 24 * 3600.0
# Cancels kept per replica: only the ones since its reader started matter.
_CONTROL_MAXLEN = 1000
# Cancel streams of replicas gone for good vanish after this.
_CONTROL_TTL = 24 * 3600
# One blocking read of the control stream; its socket has no timeout, so this plus a margin
# bounds a read that a half-open connection would never end.
_CONTROL_BLOCK_MS = 5000
_BLOCKING_MARGIN = 5.0
# Backoff of the control reader while Redis fails.
_RETRY_FIRST, _RETRY_MAX = 0.05, 1.0

_CONNECT_TIMEOUT = 2.0
_COMMAND_TIMEOUT = 5.0
_HEALTH_CHECK_SECONDS = 5
# Every follower of a build on another replica holds a connection in XREAD BLOCK.
_BLOCKING_CONNECTIONS = 256
_COMMAND_CONNECTIONS = 64
# Seconds a command waits for a free pooled connection before the store counts as unavailable.
_POOL_WAIT = 5.0

_PENDING = json.dumps({"fingerprint": "", "build_id": ""})
_STATUSES = tuple(BuildStatus)

# Event ids already in the stream (at most its last id) are skipped, so that a retried batch is a
# no-op. KEYS: streams; ARGV: per stream, its number of events, then id, data pairs.
_APPEND = """
local at = 1
for k = 1, #KEYS do
  local count = tonumber(ARGV[at])
  at = at + 1
  local last = 0
  local top = redis.call('XREVRANGE', KEYS[k], '+', '-', 'COUNT', 1)
  if top[1] then last = tonumber(string.match(top[1][1], '^%d+')) end
  for i = at, at + 2 * count - 1, 2 do
    local id = tonumber(ARGV[i])
    if id > last then
      redis.call('XADD', KEYS[k], ARGV[i] .. '-0', 'data', ARGV[i + 1])
      last = id
    end
  end
  at = at + 2 * count
end
return 0
"""
# A remembered key must survive the release of a claim that was, in the meantime, accepted.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: lease, reap pairs; ARGV: claimer, claim ms. The lease is checked in the same step as the
# claim, so a replica that heartbeats again in between is not claimed.
_CLAIM_LOST = """
local claimed = {}
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 0 and redis.call('SET', KEYS[i + 1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    table.insert(claimed, (i + 1) / 2)
  end
end
return claimed
"""


def _build_key(build_id: str) -> str:
    return f"{PREFIX}build:{build_id}"


def _events_key(build_id: str) -> str:
    return f"{PREFIX}events:{build_id}"


def _namespace_key(namespace: str) -> str:
    return f"{PREFIX}builds:{namespace}"


def _status_key(status: BuildStatus, namespace: str) -> str:
    return f"{PREFIX}by-status:{status.value}:{namespace}"


def _open_key(owner: str) -> str:
    return f"{PREFIX}open:{owner}"


def _tombstone_key(build_id: str) -> str:
    return f"{PREFIX}expired:{build_id}"


def _idempotency_key(namespace: str, key: str) -> str:
    return f"{PREFIX}idempotency:{namespace}:{key}"


def _lease_key(replica_id: str) -> str:
    return f"{PREFIX}lease:{replica_id}"


def _reap_key(replica_id: str) -> str:
    return f"{PREFIX}reap:{replica_id}"


def _control_key(replica_id: str) -> str:
    return f"{PREFIX}control:{replica_id}"


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _epoch_ms(value: dt.datetime) -> int:
    return round(value.timestamp() * 1000)


def _event_id(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


# redis-py types replies as bytes or str; the clients here decode them (decode_responses=True).
def _text(value: Any) -> str:
    assert isinstance(value, str), f"a decoded reply, not {value!r}"
    return value


def _texts(values: Iterable[Any]) -> list[str]:
    return [_text(value) for value in values]


def _run(entries: Any, after: int) -> EventRun:
    """Stream entries after `after`, as the run of those consecutive from the first: where ids
    skip (a lost replica's), the run ends and the next read goes on past it."""
    datas: list[str] = []
    first = after + 1
    for entry_id, fields in entries:
        event_id = _event_id(_text(entry_id))
        if not datas:
            first = event_id
        elif event_id != first + len(datas):
            break
        datas.append(_text(fields["data"]))
    return EventRun(first, datas)


def _read_entries(reply: Any) -> Iterator[tuple[str, dict[str, str]]]:
    """XREAD's entries (of every stream read), as (entry id, fields)."""
    for _stream, entries in reply:
        for entry_id, fields in entries:
            yield _text(entry_id), fields


@contextlib.contextmanager
def _unavailable(action: str) -> Iterator[None]:
    """Redis failures, as the store's one error: the daemon's flusher retries those."""
    try:
        yield
    except (RedisError, OSError, TimeoutError) as exc:
        raise StoreUnavailable(f"Redis: {action} failed: {exc or type(exc).__name__}") from exc


async def _pipelined(client: Redis, fill: Callable[[Pipeline], object], *, transaction: bool = True) -> list[Any]:
    """The commands `fill` queues (a lambda queues several as a tuple), in one round trip and,
    unless not `transaction`, one MULTI/EXEC.

    Retried once after a connection error, as redis-py retries a single command: a restarted
    Redis leaves the pool's connections dead. redis-py 5.0 does not retry pipelines itself.
    Every pipeline here may be applied twice.
    """

    async def run() -> list[Any]:
        async with client.pipeline(transaction=transaction) as pipe:
            fill(pipe)
            return await pipe.execute()

    try:
        return await run()
    except RedisConnectionError:
        return await run()


def _cancelled_anyway() -> None:
    """Raise the cancellation of the current task if one is pending.

    redis-py 5.0.0 can swallow one: taking a pooled connection, it probes the socket under a
    zero timeout and takes the CancelledError for that timeout's own. A task cancelled there
    would go on for ever; the loops here look for it after each Redis call.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class RedisBuildStore:
    """`BuildStore` on Redis, shared by every daemon of the cluster."""

    def __init__(self, client: Redis, *, retention: float) -> None:
        self._redis = client
        self._safety_ttl = _ms(retention + _SAFETY_MARGIN) if retention < float("inf") else None
        self._append = client.register_script(_APPEND)
        self._release = client.register_script(_RELEASE)

    async def open(self) -> None:
        with _unavailable("connecting"):
            await self._redis.ping()

    async def close(self) -> None:
        """The connections are the cluster's to close (`RedisCluster.close`)."""

    async def save(self, record: BuildRecord) -> None:
        data = record.to_storage()
        build_id, namespace, owner = record.build_id, record.namespace, record.owner
        fields: dict[FieldT, EncodableT] = {
            "record": json.dumps(data),
            "namespace": namespace,
            "status": record.status.value,
            "owner": owner,
            "created_at": data["created_at"],
            "finished_at": data["finished_at"] or "",
        }

        def fill(pipe: Pipeline) -> None:
            pipe.hset(_build_key(build_id), mapping=fields)
            pipe.zadd(_namespace_key(namespace), {build_id: _epoch_ms(record.created_at)})
            for status in _STATUSES:
                if status is not record.status:
                    pipe.zrem(_status_key(status, namespace), build_id)
            pipe.zadd(_status_key(record.status, namespace), {build_id: _epoch_ms(record.created_at)})
            pipe.sadd(_NAMESPACES, namespace)
            if record.finished_at is not None:
                pipe.zadd(_FINISHED, {build_id: _epoch_ms(record.finished_at)})
            else:
                pipe.zrem(_FINISHED, build_id)
            # A terminal record with containers was ended by a reaper: its owner still has to
            # remove them when it starts again.
            if not record.status.terminal or record.containers:
                pipe.sadd(_open_key(owner), build_id)
            else:
                pipe.srem(_open_key(owner), build_id)
            if record.status.terminal and self._safety_ttl is not None:
                pipe.pexpire(_build_key(build_id), self._safety_ttl)
                pipe.pexpire(_events_key(build_id), self._safety_ttl)

        with _unavailable(f"saving build {build_id}"):
            await _pipelined(self._redis, fill)

    async def get(self, build_id: str) -> BuildRecord | None:
        with _unavailable(f"reading build {build_id}"):
            raw = await self._redis.hget(_build_key(build_id), "record")
        return None if raw is None else BuildRecord.from_storage(json.loads(raw))

    async def _records(self, build_ids: Sequence[str]) -> builtins.list[BuildRecord | None]:
        if not build_ids:
            return []

        def fill(pipe: Pipeline) -> None:
            for build_id in build_ids:
                pipe.hget(_build_key(build_id), "record")

        raws = await _pipelined(self._redis, fill, transaction=False)
        return [None if raw is None else BuildRecord.from_storage(json.loads(raw)) for raw in raws]

    async def list(self, *, namespace: str, status: BuildStatus | None, limit: int) -> list[BuildRecord]:
        index = _namespace_key(namespace) if status is None else _status_key(status, namespace)
        found: list[BuildRecord] = []
        start = 0
        with _unavailable(f"listing builds of {namespace!r}"):
            while len(found) < limit:
                page_size = limit - len(found)
                build_ids = _texts(await self._redis.zrevrange(index, start, start + page_size - 1))
                records = await self._records(build_ids)
                dangling = [b for b, r in zip(build_ids, records, strict=True) if r is None]
                found += [r for r in records if r is not None]
                if dangling:
                    # Their hashes expired (the safety net): drop them from the index, and read on.
                    await self._redis.zrem(index, *dangling)
                start += page_size - len(dangling)
                if len(build_ids) < page_size:
                    break
        return found

    async def unfinished(self, owner: str) -> builtins.list[BuildRecord]:
        with _unavailable(f"reading the open builds of {owner!r}"):
            build_ids = sorted(_texts(await self._redis.smembers(_open_key(owner))))
            records = await self._records(build_ids)
            stale = [b for b, r in zip(build_ids, records, strict=True) if r is None or r.owner != owner]
            if stale:
                await self._redis.srem(_open_key(owner), *stale)
        mine = [r for r in records if r is not None and r.owner == owner]
        return sorted(mine, key=lambda r: r.created_at)

    async def append_events(self, logs: Sequence[tuple[str, EventRun]]) -> None:
        logs = [(build_id, run) for build_id, run in logs if run]
        if not logs:
            return
        args: builtins.list[str | int] = []
        for _, run in logs:
            args.append(len(run))
            for event_id, data in enumerate(run.datas, start=run.first_id):
                args += (event_id, data)
        with _unavailable(f"appending {sum(len(run) for _, run in logs)} events"):
            await self._append(keys=[_events_key(build_id) for build_id, _ in logs], args=args)

    async def read_events(self, build_id: str, *, after: int, upto: int | None = None, limit: int = 1000) -> EventRun:
        if limit <= 0 or (upto is not None and upto <= after):
            return EventRun(after + 1)
        upper = "+" if upto is None else f"{upto}-0"
        with _unavailable(f"reading the events of {build_id}"):
            entries = await self._redis.xrange(_events_key(build_id), f"{after + 1}-0", upper, count=limit)
        return _run(entries, after)

    async def last_event_id(self, build_id: str) -> int:
        with _unavailable(f"reading the events of {build_id}"):
            top = await self._redis.xrevrange(_events_key(build_id), "+", "-", count=1)
        return _event_id(_text(top[0][0])) if top else 0

    async def expire(self, *, finished_before: str, keep: int, exclude: Set[str]) -> builtins.list[str]:
        """Remove finished builds older than `finished_before` (RFC 3339) or beyond each tenant's newest `keep`."""
        cutoff = _epoch_ms(dt.datetime.fromisoformat(finished_before.replace("Z", "+00:00")))
        with _unavailable("expiring builds"):
            # Build id -> the namespace whose index named it (None: the index of finished builds).
            candidates: dict[str, str | None] = dict.fromkeys(
                _texts(await self._redis.zrangebyscore(_FINISHED, "-inf", f"({cutoff}"))
            )
            # `keep` per tenant: one tenant's many builds do not evict another's few.
            for namespace in _texts(await self._redis.smembers(_NAMESPACES)):
                beyond = _texts(await self._redis.zrange(_namespace_key(namespace), 0, -keep - 1))
                candidates.update(dict.fromkeys(beyond, namespace))
            ordered = sorted(candidates.keys() - exclude)

            def read(pipe: Pipeline) -> None:
                for build_id in ordered:
                    pipe.hmget(_build_key(build_id), ["namespace", "owner", "finished_at"])

            rows = await _pipelined(self._redis, read, transaction=False)
            expired = [
                (build_id, namespace, owner)
                for build_id, (namespace, owner, finished_at) in zip(ordered, rows, strict=True)
                if namespace is not None and finished_at
            ]
            # Gone already (the safety net): only index entries are left of them.
            gone = [build_id for build_id, (namespace, _, _) in zip(ordered, rows, strict=True) if namespace is None]

            def remove(pipe: Pipeline) -> None:
                for build_id in gone:
                    self._unindex(pipe, build_id, candidates[build_id])
                for build_id, namespace, owner in expired:
                    pipe.delete(_build_key(build_id), _events_key(build_id))
                    self._unindex(pipe, build_id, namespace)
                    pipe.srem(_open_key(owner), build_id)
                    pipe.set(_tombstone_key(build_id), namespace, ex=TOMBSTONE_SECONDS)

            await _pipelined(self._redis, remove)
        return [build_id for build_id, _, _ in expired]

    @staticmethod
    def _unindex(pipe: Pipeline, build_id: str, namespace: str | None) -> None:
        pipe.zrem(_FINISHED, build_id)
        if namespace is not None:
            pipe.zrem(_namespace_key(namespace), build_id)
            for status in _STATUSES:
                pipe.zrem(_status_key(status, namespace), build_id)

    async def is_expired(self, build_id: str, namespace: str) -> bool:
        with _unavailable(f"reading build {build_id}"):
            return bool(await self._redis.get(_tombstone_key(build_id)) == namespace)

    async def claim_idempotent(
        self, namespace: str, key: str, *, window: float, pending: float
    ) -> tuple[str, str] | None:
        name = _idempotency_key(namespace, key)
        while True:
            with _unavailable("claiming an Idempotency-Key"):
                claimed, value = await _pipelined(
                    self._redis, lambda pipe: (pipe.set(name, _PENDING, nx=True, px=_ms(pending)), pipe.get(name))
                )
            if claimed:
                return None
            if value is not None:  # else it expired between the two: claim again
                held = json.loads(value)
                return str(held["fingerprint"]), str(held["build_id"])

    async def remember_idempotent(
        self, namespace: str, key: str, fingerprint: str, build_id: str, *, window: float
    ) -> None:
        value = json.dumps({"fingerprint": fingerprint, "build_id": build_id})
        with _unavailable("remembering an Idempotency-Key"):
            await self._redis.set(_idempotency_key(namespace, key), value, px=_ms(window))

    async def release_idempotent(self, namespace: str, key: str) -> None:
        with _unavailable("releasing an Idempotency-Key"):
            await self._release(keys=[_idempotency_key(namespace, key)], args=[_PENDING])


class RedisLease:
    """A key per replica that lives while the replica heartbeats."""

    def __init__(self, client: Redis, replica_id: str, ttl: float) -> None:
        self.replica_id = replica_id
        self.ttl = ttl
        self._redis = client
        self._key = _lease_key(replica_id)
        # Who holds the lease, for whoever looks at Redis.
        self._holder = f"{socket.gethostname()}:{os.getpid()}"
        self._claim_lost = client.register_script(_CLAIM_LOST)
        self._task: asyncio.Task[None] | None = None
        # Since when every heartbeat has reached Redis (None after one failed).
        self._steady_since: float | None = None

    async def start(self) -> None:
        """Take the lease (StoreUnavailable if Redis cannot be reached) and heartbeat it until `stop`."""
        await self._beat()
        if self._task is None:
            self._task = asyncio.create_task(self._heartbeat(), name=f"lease-{self.replica_id}")

    async def _beat(self) -> None:
        try:
            with _unavailable("renewing the lease"):
                # Registered again at every beat: a replica thought lost, and released, is back.
                await _pipelined(
                    self._redis,
                    lambda pipe: (
                        pipe.set(self._key, self._holder, px=_ms(self.ttl)),
                        pipe.sadd(_REPLICAS, self.replica_id),
                    ),
                )
        except StoreUnavailable:
            self._steady_since = None
            raise
        if self._steady_since is None:
            self._steady_since = time.monotonic()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self._beat()
            except StoreUnavailable as exc:
                log.warning("lease_heartbeat_failed", replica_id=self.replica_id, error=exc.message)
            _cancelled_anyway()

    async def halt(self) -> None:
        """Stop heartbeating and leave the lease to expire, as a crash would."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def stop(self) -> None:
        await self.halt()
        try:
            with _unavailable("letting the lease go"):
                await _pipelined(
                    self._redis, lambda pipe: (pipe.delete(self._key), pipe.srem(_REPLICAS, self.replica_id))
                )
        except StoreUnavailable as exc:
            # It expires within ttl anyway; then a reaper finds none of our builds unfinished.
            log.warning("lease_release_failed", replica_id=self.replica_id, error=exc.message)

    async def claim_lost(self) -> builtins.list[str]:
        # After Redis was away longer than a ttl every lease has lapsed, live replicas' too: none
        # is lost until ours has been renewed for a whole ttl, time enough for them to renew theirs.
        if self._steady_since is None or time.monotonic() - self._steady_since < self.ttl:
            return []
        with _unavailable("looking for lost replicas"):
            others = sorted(r for r in _texts(await self._redis.smembers(_REPLICAS)) if r != self.replica_id)
            if not others:
                return []
            keys = [key for replica in others for key in (_lease_key(replica), _reap_key(replica))]
            claimed = await self._claim_lost(keys=keys, args=[self.replica_id, _ms(self.ttl)])
        return [others[int(index) - 1] for index in claimed]

    async def release_lost(self, replica_id: str) -> None:
        with _unavailable(f"releasing lost replica {replica_id}"):
            await _pipelined(
                self._redis, lambda pipe: (pipe.srem(_REPLICAS, replica_id), pipe.delete(_reap_key(replica_id)))
            )


class RedisControl:
    """A stream per replica of the cancels routed to it."""

    def __init__(self, client: Redis, blocking: Redis, replica_id: str) -> None:
        self._redis = client
        # XREAD BLOCK holds its connection for seconds: not one of the short commands' ones.
        self._blocking = blocking
        self._key = _control_key(replica_id)

    async def send_cancel(self, replica_id: str, build_id: str) -> None:
        key = _control_key(replica_id)
        with _unavailable(f"sending a cancel to replica {replica_id}"):
            # A retry may send the cancel twice: a cancel of a cancelled build is a no-op.
            await _pipelined(
                self._redis,
                lambda pipe: (
                    pipe.xadd(key, {"build_id": build_id}, maxlen=_CONTROL_MAXLEN, approximate=True),
                    pipe.expire(key, _CONTROL_TTL),
                ),
            )

    async def cancels(self) -> AsyncGenerator[str, None]:
        """Cancels sent from the first iteration on; a Redis failure is logged and waited out."""
        last: str | None = None
        delay = _RETRY_FIRST
        while True:
            try:
                if last is None:
                    # "$" once, as a concrete id: each later read goes on from the last entry
                    # seen, so nothing sent between two reads is missed.
                    top = await self._redis.xrevrange(self._key, "+", "-", count=1)
                    last = _text(top[0][0]) if top else "0-0"
                async with asyncio.timeout(_CONTROL_BLOCK_MS / 1000 + _BLOCKING_MARGIN):
                    reply = await self._blocking.xread({self._key: last}, count=100, block=_CONTROL_BLOCK_MS)
            except (RedisError, OSError, TimeoutError) as exc:
                _cancelled_anyway()
                log.warning("control_read_failed", error=str(exc) or type(exc).__name__, retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                continue
            _cancelled_anyway()
            delay = _RETRY_FIRST
            for entry_id, fields in _read_entries(reply):
                last = entry_id
                yield _text(fields["build_id"])


class RedisTail:
    """Events of a build as its owner, on another replica, commits them."""

    def __init__(self, blocking: Redis) -> None:
        self._blocking = blocking

    async def wait(self, build_id: str, *, after: int, timeout: float, limit: int) -> EventRun:
        # BLOCK 0 would wait for ever; without BLOCK, XREAD answers at once.
        block = _ms(timeout) if timeout > 0 else None
        with _unavailable(f"following the events of {build_id}"):
            async with asyncio.timeout(max(timeout, 0) + _BLOCKING_MARGIN):
                reply = await self._blocking.xread({_events_key(build_id): f"{after}-0"}, count=limit, block=block)
        _cancelled_anyway()
        return _run(_read_entries(reply), after)


@dataclasses.dataclass(frozen=True)
class RedisCluster(Cluster):
    """The four parts on one Redis, and the connections they share."""

    redis: Redis
    blocking: Redis
    heartbeat: RedisLease

    async def close(self) -> None:
        """Close the connections; a lease not stopped before is left to expire."""
        await self.heartbeat.halt()
        await self.redis.connection_pool.disconnect()
        await self.blocking.connection_pool.disconnect()


def _client(url: str, *, socket_timeout: float | None, max_connections: int, name: str) -> Redis:
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=_POOL_WAIT,
        decode_responses=True,
        # The reply shapes this module reads (XREAD as a list of pairs, say), on any redis-py.
        protocol=2,
        client_name=name,
        socket_connect_timeout=_CONNECT_TIMEOUT,
        socket_timeout=socket_timeout,
        socket_keepalive=True,
        # A pooled connection idle this long is pinged before use: one that a Redis restart cut
        # is replaced before a command goes to it.
        health_check_interval=_HEALTH_CHECK_SECONDS,
        # A connection error (a restarted Redis, say) is retried on a new connection; every write
        # of the store is idempotent, so one that got through before the error is harmless.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.025), 2, supported_errors=(RedisConnectionError,)),
        retry_on_error=[RedisConnectionError],
    )
    return Redis(connection_pool=pool)


def _connect(url: str, *, replica_id: str, lease_ttl: float, retention: float) -> RedisCluster:
    # CLIENT LIST shows whose each connection is (a name has no spaces).
    name = "builder-" + re.sub(r"\s", "_", replica_id)
    commands = _client(url, socket_timeout=_COMMAND_TIMEOUT, max_connections=_COMMAND_CONNECTIONS, name=name)
    # No socket timeout: a blocking read is bounded by its BLOCK (plus a margin) instead.
    blocking = _client(url, socket_timeout=None, max_connections=_BLOCKING_CONNECTIONS, name=f"{name}-blocking")
    lease = RedisLease(commands, replica_id, lease_ttl)
    return RedisCluster(
        store=RedisBuildStore(commands, retention=retention),
        lease=lease,
        control=RedisControl(commands, blocking, replica_id),
        tail=RedisTail(blocking),
        redis=commands,
        blocking=blocking,
        heartbeat=lease,
    )


async def open_cluster(url: str, *, replica_id: str, lease_ttl: float, retention: float) -> RedisCluster:
    """`connect`, and check that Redis answers (StoreUnavailable if not)."""
    cluster = _connect(url, replica_id=replica_id, lease_ttl=lease_ttl, retention=retention)
    try:
        await cluster.open()
    except BaseException:
        await cluster.close()
        raise
    return cluster


def connect(url: str, *, replica_id: str, lease_ttl: float, retention: float) -> Cluster:
    """The cluster's parts on Redis at `url` (redis://HOST:PORT/DB), not connected yet: `open()`
    checks that Redis answers, `close()` closes the connections."""
    return _connect(url, replica_id=replica_id, lease_ttl=lease_ttl, retention=retention)
