"""Cluster mode's Redis parts (builder/server/redis_cluster.py) against a real redis-server."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis

from builder.protocol import BuildStatus
from builder.server.models import BuildSpec
from builder.server.records import BuildRecord, EventRun, rfc3339, utcnow
from builder.server.redis_cluster import RedisCluster, open_cluster
from builder.server.store import StoreUnavailable
from tests.processes import RedisServer

TTL = 0.6
RETENTION = 3600.0
T0 = dt.datetime(2026, 1, 2, 12, 0, tzinfo=dt.UTC)

OpenCluster = Callable[[str], Awaitable[RedisCluster]]


@pytest.fixture
async def replica(redis_server: RedisServer) -> AsyncIterator[OpenCluster]:
    """A factory: `await replica("a")` is replica "a"'s cluster parts on the test's Redis."""
    opened: list[RedisCluster] = []

    async def start(replica_id: str) -> RedisCluster:
        cluster = await open_cluster(redis_server.url, replica_id=replica_id, lease_ttl=TTL, retention=RETENTION)
        opened.append(cluster)
        return cluster

    yield start
    for cluster in opened:
        await cluster.close()


@pytest.fixture
async def a(replica: OpenCluster) -> RedisCluster:
    return await replica("a")


@pytest.fixture
async def b(replica: OpenCluster) -> RedisCluster:
    return await replica("b")


def record(
    build_id: str,
    *,
    namespace: str = "",
    status: BuildStatus = BuildStatus.QUEUED,
    minute: int = 0,
    finished: dt.datetime | None = None,
    owner: str = "a",
    containers: list[str] | None = None,
) -> BuildRecord:
    return BuildRecord(
        build_id,
        BuildSpec(image_name="app:latest"),
        namespace=namespace,
        status=status,
        created_at=T0 + dt.timedelta(minutes=minute),
        finished_at=finished,
        owner=owner,
        containers=containers or [],
    )


def events(first: int, last: int) -> EventRun:
    return EventRun(
        first, [json.dumps({"type": "log", "line": f"line {n}"}, separators=(",", ":")) for n in range(first, last + 1)]
    )


def ids(records: list[BuildRecord]) -> list[str]:
    return [r.build_id for r in records]


async def blocked_clients(redis: Redis, count: int) -> None:
    """Wait until `count` clients sit in a blocking read (XREAD BLOCK)."""
    async with asyncio.timeout(5):
        while int((await redis.info("clients"))["blocked_clients"]) < count:
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------- records


async def test_saved_record_reads_back_as_it_was(a: RedisCluster) -> None:
    saved = record("b1", namespace="team", status=BuildStatus.RUNNING, containers=["c1"])
    saved.image_ref = "registry/app:latest"
    await a.store.save(saved)
    assert await a.store.get("b1") == saved
    assert await a.store.get("nope") is None


async def test_list_is_per_namespace_newest_first_filtered_and_limited(a: RedisCluster) -> None:
    for minute, (build_id, namespace, status) in enumerate(
        [
            ("x1", "x", BuildStatus.SUCCEEDED),
            ("y1", "y", BuildStatus.QUEUED),
            ("x2", "x", BuildStatus.RUNNING),
            ("x3", "x", BuildStatus.SUCCEEDED),
            ("x4", "x", BuildStatus.QUEUED),
        ]
    ):
        await a.store.save(record(build_id, namespace=namespace, status=status, minute=minute))
    assert ids(await a.store.list(namespace="x", status=None, limit=10)) == ["x4", "x3", "x2", "x1"]
    assert ids(await a.store.list(namespace="y", status=None, limit=10)) == ["y1"]
    assert ids(await a.store.list(namespace="", status=None, limit=10)) == []
    assert ids(await a.store.list(namespace="x", status=BuildStatus.SUCCEEDED, limit=10)) == ["x3", "x1"]
    assert ids(await a.store.list(namespace="x", status=None, limit=2)) == ["x4", "x3"]
    assert ids(await a.store.list(namespace="x", status=BuildStatus.SUCCEEDED, limit=1)) == ["x3"]


async def test_a_status_change_moves_the_build_between_status_lists(a: RedisCluster) -> None:
    build = record("b1", namespace="x")
    await a.store.save(build)
    build.status = BuildStatus.RUNNING
    await a.store.save(build)
    assert ids(await a.store.list(namespace="x", status=BuildStatus.QUEUED, limit=10)) == []
    assert ids(await a.store.list(namespace="x", status=BuildStatus.RUNNING, limit=10)) == ["b1"]
    assert ids(await a.store.list(namespace="x", status=None, limit=10)) == ["b1"]


async def test_a_terminal_record_and_its_log_get_the_safety_net_ttl(a: RedisCluster) -> None:
    build = record("b1", status=BuildStatus.RUNNING)
    await a.store.save(build)
    await a.store.append_events([("b1", events(1, 3))])
    assert await a.redis.ttl("builder:build:b1") == -1
    build.status, build.finished_at = BuildStatus.SUCCEEDED, utcnow()
    await a.store.save(build)
    for key in ("builder:build:b1", "builder:events:b1"):
        assert RETENTION < await a.redis.ttl(key) <= RETENTION + 24 * 3600


async def test_builds_whose_hash_expired_drop_out_of_the_list(a: RedisCluster) -> None:
    for minute, build_id in enumerate(["b1", "b2", "b3", "b4"]):
        await a.store.save(record(build_id, namespace="x", minute=minute))
    await a.redis.delete("builder:build:b4", "builder:build:b2")  # as the safety-net TTL would
    assert ids(await a.store.list(namespace="x", status=None, limit=2)) == ["b3", "b1"]
    assert await a.redis.zrange("builder:builds:x", 0, -1) == ["b1", "b3"]


# ---------------------------------------------------------------- events


async def test_events_read_back_after_upto_and_limit(a: RedisCluster) -> None:
    await a.store.append_events([("b1", events(1, 10)), ("b2", events(1, 2))])
    assert await a.store.read_events("b1", after=0) == events(1, 10)
    assert await a.store.read_events("b1", after=3, upto=6) == events(4, 6)
    assert await a.store.read_events("b1", after=3, limit=2) == events(4, 5)
    assert not await a.store.read_events("b1", after=10)
    assert await a.store.read_events("b2", after=0) == events(1, 2)
    assert not await a.store.read_events("none", after=0)
    assert await a.store.last_event_id("b1") == 10
    assert await a.store.last_event_id("none") == 0


async def test_event_n_is_stream_entry_n_0(a: RedisCluster) -> None:
    await a.store.append_events([("b1", events(1, 3))])
    entries = await a.redis.xrange("builder:events:b1")
    assert entries == [(f"{n}-0", {"data": data}) for n, data in enumerate(events(1, 3).datas, start=1)]


async def test_a_read_ends_where_ids_skip_and_the_next_goes_on_past_the_gap(a: RedisCluster, b: RedisCluster) -> None:
    # A lost replica's log: its followers may have been shown ids that were never committed.
    await a.store.append_events([("b1", events(1, 3))])
    await a.store.append_events([("b1", events(10, 12))])
    assert await a.store.read_events("b1", after=0) == events(1, 3)
    assert await a.store.read_events("b1", after=3) == events(10, 12)
    assert await a.store.read_events("b1", after=2, upto=11) == events(3, 3)
    assert await b.tail.wait("b1", after=0, timeout=1, limit=10) == events(1, 3)
    assert await b.tail.wait("b1", after=3, timeout=1, limit=10) == events(10, 12)


async def test_appending_stored_ids_again_is_a_no_op(a: RedisCluster) -> None:
    await a.store.append_events([("b1", events(1, 5))])
    await a.store.append_events([("b1", events(1, 5))])
    # A retried batch that overlaps what is stored: only the new ids are added.
    await a.store.append_events([("b1", events(4, 8))])
    assert await a.store.read_events("b1", after=0) == events(1, 8)


async def test_a_batch_of_thousands_of_events_is_one_script_call(a: RedisCluster) -> None:
    await a.store.append_events([("warm-up", EventRun(1, ["{}"]))])  # Redis learns the script
    before = await a.redis.info("commandstats")
    await a.store.append_events([("b1", events(1, 1500)), ("b2", events(1, 1500))])
    after = await a.redis.info("commandstats")

    def calls(stats: dict[str, dict[str, int]], command: str) -> int:
        return stats.get(f"cmdstat_{command}", {}).get("calls", 0)

    assert calls(after, "evalsha") - calls(before, "evalsha") == 1
    assert await a.store.last_event_id("b1") == await a.store.last_event_id("b2") == 1500
    assert await a.store.read_events("b2", after=1490) == events(1491, 1500)


# ---------------------------------------------------------------- retention


async def test_expire_removes_old_finished_builds_and_leaves_a_tombstone(a: RedisCluster) -> None:
    now = utcnow()
    old, recent = now - dt.timedelta(days=2), now - dt.timedelta(minutes=1)
    await a.store.save(record("old", namespace="x", status=BuildStatus.SUCCEEDED, finished=old))
    await a.store.save(record("recent", namespace="x", status=BuildStatus.FAILED, finished=recent, minute=1))
    await a.store.save(record("running", namespace="x", status=BuildStatus.RUNNING, minute=2))
    await a.store.append_events([("old", events(1, 3))])

    cutoff = rfc3339(now - dt.timedelta(days=1))
    assert await a.store.expire(finished_before=cutoff, keep=100, exclude=set()) == ["old"]
    assert await a.store.get("old") is None
    assert not await a.store.read_events("old", after=0)
    assert await a.redis.exists("builder:build:old", "builder:events:old") == 0
    assert await a.store.is_expired("old", "x")
    assert not await a.store.is_expired("old", "other-tenant")
    assert not await a.store.is_expired("recent", "x")
    assert 0 < await a.redis.ttl("builder:expired:old") <= 30 * 24 * 3600
    assert ids(await a.store.list(namespace="x", status=None, limit=10)) == ["running", "recent"]


async def test_expire_keeps_each_namespaces_newest_and_the_excluded(a: RedisCluster) -> None:
    finished = utcnow()
    for minute in range(4):
        await a.store.save(
            record(f"x{minute}", namespace="x", status=BuildStatus.SUCCEEDED, minute=minute, finished=finished)
        )
    await a.store.save(record("y0", namespace="y", status=BuildStatus.SUCCEEDED, finished=finished))
    # Unfinished builds count among the newest, but are never removed.
    await a.store.save(record("x9", namespace="x", status=BuildStatus.RUNNING, minute=9))

    long_ago = rfc3339(finished - dt.timedelta(days=1))
    expired = await a.store.expire(finished_before=long_ago, keep=2, exclude={"x0"})
    assert sorted(expired) == ["x1", "x2"]
    assert ids(await a.store.list(namespace="x", status=None, limit=10)) == ["x9", "x3", "x0"]
    assert ids(await a.store.list(namespace="y", status=None, limit=10)) == ["y0"]
    assert await a.store.is_expired("x1", "x") and not await a.store.is_expired("x0", "x")


async def test_expire_drops_index_entries_of_builds_already_gone(a: RedisCluster) -> None:
    finished = utcnow() - dt.timedelta(days=2)
    for minute in range(3):
        await a.store.save(
            record(f"x{minute}", namespace="x", status=BuildStatus.FAILED, minute=minute, finished=finished)
        )
    await a.redis.delete("builder:build:x0", "builder:build:x1")  # as the safety-net TTL would
    cutoff = rfc3339(utcnow() - dt.timedelta(days=1))
    assert await a.store.expire(finished_before=cutoff, keep=1, exclude=set()) == ["x2"]
    for index in ("builder:finished", "builder:builds:x", "builder:by-status:failed:x"):
        assert await a.redis.zcard(index) == 0
    # No tombstone: what the build was is gone with it.
    assert not await a.store.is_expired("x0", "x")


# ---------------------------------------------------------------- unfinished


async def test_unfinished_are_the_owners_live_builds_and_those_a_reaper_ended(a: RedisCluster) -> None:
    await a.store.save(record("queued", status=BuildStatus.QUEUED, minute=0))
    await a.store.save(record("running", status=BuildStatus.RUNNING, minute=1, containers=["c1"]))
    await a.store.save(record("done", status=BuildStatus.SUCCEEDED, minute=2, finished=utcnow()))
    await a.store.save(record("elsewhere", status=BuildStatus.RUNNING, owner="b"))
    assert ids(await a.store.unfinished("a")) == ["queued", "running"]

    # Replica b's reaper fails "running" while a is lost: its container is still a's to remove.
    reaped = record("running", status=BuildStatus.FAILED, minute=1, containers=["c1"], finished=utcnow())
    await a.store.save(reaped)
    assert ids(await a.store.unfinished("a")) == ["queued", "running"]
    # ...which a does when it starts again.
    reaped.containers = []
    await a.store.save(reaped)
    assert ids(await a.store.unfinished("a")) == ["queued"]
    assert ids(await a.store.unfinished("b")) == ["elsewhere"]
    assert await a.store.unfinished("nobody") == []


# ---------------------------------------------------------------- Idempotency-Keys


async def test_two_concurrent_claims_of_a_key_one_wins(a: RedisCluster, b: RedisCluster) -> None:
    results = await asyncio.gather(
        *(c.store.claim_idempotent("x", "key-1", window=60, pending=30) for c in (a, b, a, b))
    )
    assert results.count(None) == 1
    assert [r for r in results if r is not None] == [("", "")] * 3


async def test_a_claim_pending_then_remembered(a: RedisCluster, b: RedisCluster) -> None:
    assert await a.store.claim_idempotent("x", "k", window=60, pending=30) is None
    assert await b.store.claim_idempotent("x", "k", window=60, pending=30) == ("", "")
    await a.store.remember_idempotent("x", "k", "fp1", "b1", window=60)
    assert await b.store.claim_idempotent("x", "k", window=60, pending=30) == ("fp1", "b1")
    # Keys are per namespace.
    assert await b.store.claim_idempotent("y", "k", window=60, pending=30) is None


async def test_release_lets_only_a_pending_claim_go(a: RedisCluster) -> None:
    assert await a.store.claim_idempotent("x", "pending", window=60, pending=30) is None
    await a.store.release_idempotent("x", "pending")
    assert await a.store.claim_idempotent("x", "pending", window=60, pending=30) is None

    assert await a.store.claim_idempotent("x", "kept", window=60, pending=30) is None
    await a.store.remember_idempotent("x", "kept", "fp", "b1", window=60)
    await a.store.release_idempotent("x", "kept")
    assert await a.store.claim_idempotent("x", "kept", window=60, pending=30) == ("fp", "b1")


async def test_claims_and_keys_lapse_after_their_time(a: RedisCluster) -> None:
    assert await a.store.claim_idempotent("x", "abandoned", window=60, pending=0.2) is None
    assert await a.store.claim_idempotent("x", "old", window=60, pending=30) is None
    await a.store.remember_idempotent("x", "old", "fp", "b1", window=0.2)
    await asyncio.sleep(0.3)
    assert await a.store.claim_idempotent("x", "abandoned", window=60, pending=30) is None
    assert await a.store.claim_idempotent("x", "old", window=60, pending=30) is None


# ---------------------------------------------------------------- leases


async def test_the_heartbeat_keeps_the_lease_past_its_ttl(a: RedisCluster, b: RedisCluster) -> None:
    await a.lease.start()
    await asyncio.sleep(TTL * 2.5)
    assert await a.redis.exists("builder:lease:a")
    assert await a.redis.smembers("builder:replicas") == {"a"}
    assert await b.lease.claim_lost() == []
    await a.lease.stop()
    assert not await a.redis.exists("builder:lease:a")
    assert await a.redis.smembers("builder:replicas") == set()


async def test_a_stopped_replica_is_not_lost(a: RedisCluster, b: RedisCluster) -> None:
    await b.lease.start()
    await b.lease.stop()
    await asyncio.sleep(TTL * 1.5)
    assert await a.lease.claim_lost() == []


async def test_a_crashed_replica_is_claimed_once_across_reapers(replica: OpenCluster) -> None:
    a, b, c = await replica("a"), await replica("b"), await replica("c")
    for cluster in (a, b, c):
        await cluster.lease.start()
    await c.close()  # as a crash: no more heartbeats, the lease is left to expire
    assert await a.lease.claim_lost() == []
    await asyncio.sleep(TTL * 1.5)

    claims = await asyncio.gather(a.lease.claim_lost(), b.lease.claim_lost())
    assert sorted(claims) == [[], ["c"]]
    assert await a.lease.claim_lost() == await b.lease.claim_lost() == []

    reaper = a if claims[0] else b
    await reaper.lease.release_lost("c")
    assert await a.redis.smembers("builder:replicas") == {"a", "b"}
    assert not await a.redis.exists("builder:reap:c")
    assert await a.lease.claim_lost() == await b.lease.claim_lost() == []

    # It comes back, registers again, and is not lost while it heartbeats.
    c = await replica("c")
    await c.lease.start()
    await asyncio.sleep(TTL)
    assert await a.lease.claim_lost() == []
    for cluster in (a, b, c):
        await cluster.lease.stop()


async def test_an_unreleased_claim_is_handed_out_again_after_its_ttl(a: RedisCluster, b: RedisCluster) -> None:
    await a.lease.start()
    await b.lease.start()
    await b.close()
    await asyncio.sleep(TTL * 1.5)
    assert await a.lease.claim_lost() == ["b"]
    assert await a.lease.claim_lost() == []
    # The reaper died before it released the lost replica: another claims it once the claim lapses.
    await asyncio.sleep(TTL * 1.5)
    assert await a.lease.claim_lost() == ["b"]


async def test_after_redis_was_away_longer_than_a_ttl_no_replica_is_lost_for_a_ttl(
    redis_server: RedisServer, a: RedisCluster, b: RedisCluster
) -> None:
    await a.lease.start()
    await b.lease.start()
    await asyncio.sleep(TTL * 1.2)
    await b.lease.halt()  # b will not have renewed its lease when Redis is back, as if it were slow
    redis_server.stop()
    await asyncio.sleep(TTL * 1.5)  # every lease lapses meanwhile
    redis_server.start()
    async with asyncio.timeout(5):
        while not await a.redis.exists("builder:lease:a"):  # a's heartbeat is through again
            await asyncio.sleep(0.02)
    assert not await a.redis.exists("builder:lease:b")
    assert await a.lease.claim_lost() == []
    await asyncio.sleep(TTL * 1.2)
    assert await a.lease.claim_lost() == ["b"]


# ---------------------------------------------------------------- control and tail


async def test_a_cancel_reaches_only_the_replica_it_is_sent_to(a: RedisCluster, b: RedisCluster) -> None:
    got: dict[str, list[str]] = {"a": [], "b": []}

    async def listen(name: str, cluster: RedisCluster) -> None:
        async for build_id in cluster.control.cancels():
            got[name].append(build_id)

    listeners = [asyncio.create_task(listen("a", a)), asyncio.create_task(listen("b", b))]
    try:
        await blocked_clients(a.redis, 2)
        await a.control.send_cancel("b", "b1")
        await a.control.send_cancel("b", "b2")
        async with asyncio.timeout(5):
            while len(got["b"]) < 2:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert got == {"a": [], "b": ["b1", "b2"]}
    finally:
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)


async def test_cancels_sent_before_the_reader_started_are_not_replayed(a: RedisCluster, b: RedisCluster) -> None:
    await a.control.send_cancel("b", "old")
    cancels = b.control.cancels()
    first = asyncio.ensure_future(anext(cancels))
    await blocked_clients(a.redis, 1)
    await a.control.send_cancel("b", "new")
    try:
        assert await asyncio.wait_for(first, 5) == "new"
    finally:
        await cancels.aclose()


async def test_tail_returns_events_committed_while_it_waits(a: RedisCluster, b: RedisCluster) -> None:
    await a.store.append_events([("b1", events(1, 2))])
    assert await b.tail.wait("b1", after=0, timeout=1, limit=10) == events(1, 2)

    waiting = asyncio.ensure_future(b.tail.wait("b1", after=2, timeout=5, limit=2))
    await blocked_clients(a.redis, 1)
    await a.store.append_events([("b1", events(3, 5))])
    assert await asyncio.wait_for(waiting, 5) == events(3, 4)


async def test_tail_gives_nothing_when_nothing_comes(a: RedisCluster, b: RedisCluster) -> None:
    await a.store.append_events([("b1", events(1, 2))])
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert not await b.tail.wait("b1", after=2, timeout=0.3, limit=10)
    assert not await b.tail.wait("never", after=0, timeout=0.3, limit=10)
    assert 0.55 <= loop.time() - started < 2


# ---------------------------------------------------------------- Redis down and back


async def test_store_is_unavailable_while_redis_is_down_and_loses_nothing(
    redis_server: RedisServer, a: RedisCluster
) -> None:
    build = record("b1", namespace="x", status=BuildStatus.RUNNING)
    await a.store.save(build)
    await a.store.append_events([("b1", events(1, 5))])

    redis_server.stop()
    attempts: list[Awaitable[object]] = [
        a.store.save(build),
        a.store.get("b1"),
        a.store.list(namespace="x", status=None, limit=10),
        a.store.unfinished("a"),
        a.store.append_events([("b1", events(6, 7))]),
        a.store.read_events("b1", after=0),
        a.store.last_event_id("b1"),
        a.store.expire(finished_before=rfc3339(utcnow()), keep=10, exclude=set()),
        a.store.is_expired("b1", "x"),
        a.store.claim_idempotent("x", "k", window=60, pending=30),
        a.store.remember_idempotent("x", "k", "fp", "b1", window=60),
        a.store.release_idempotent("x", "k"),
        a.control.send_cancel("b", "b1"),
        a.tail.wait("b1", after=5, timeout=0.1, limit=10),
    ]
    for attempt in attempts:
        with pytest.raises(StoreUnavailable, match="Redis"):
            await attempt

    redis_server.start()
    # The same client, with no reconnect of ours: the first command after the restart succeeds.
    await a.store.append_events([("b1", events(1, 7))])
    assert await a.store.get("b1") == build
    assert await a.store.read_events("b1", after=0) == events(1, 7)


async def test_a_restart_is_invisible_to_the_next_command(redis_server: RedisServer, a: RedisCluster) -> None:
    await a.store.save(record("b1"))
    await a.store.append_events([("b1", events(1, 3))])
    redis_server.restart()
    assert await a.store.get("b1") == record("b1")
    assert await a.store.last_event_id("b1") == 3


async def test_lease_and_cancels_survive_a_redis_restart(
    redis_server: RedisServer, a: RedisCluster, b: RedisCluster
) -> None:
    await b.lease.start()
    cancels = b.control.cancels()
    first = asyncio.ensure_future(anext(cancels))
    try:
        await blocked_clients(a.redis, 1)
        redis_server.stop()
        await asyncio.sleep(TTL / 2)  # heartbeats fail meanwhile, and the reader retries
        redis_server.start()
        await a.control.send_cancel("b", "b1")
        assert await asyncio.wait_for(first, 5) == "b1"
        await asyncio.sleep(TTL)
        assert await a.redis.exists("builder:lease:b")
        assert await a.lease.claim_lost() == []
    finally:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await cancels.aclose()
    await b.lease.stop()


async def test_the_heartbeat_and_the_reader_stop_promptly_after_a_redis_restart(
    redis_server: RedisServer, a: RedisCluster, b: RedisCluster
) -> None:
    # redis-py 5.0.0 swallows a cancellation that lands while it checks a pooled connection.
    await b.lease.start()
    reader = asyncio.ensure_future(anext(b.control.cancels()))
    await blocked_clients(a.redis, 1)
    redis_server.stop()
    await asyncio.sleep(TTL / 2)
    redis_server.start()
    await a.close()
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader.cancel()
    await asyncio.wait_for(asyncio.gather(reader, return_exceptions=True), 5)
    await asyncio.wait_for(b.lease.stop(), 5)
    assert loop.time() - started < 0.5
