"""Cluster mode: several `builder serve --redis-url …` daemons sharing builds and logs through Redis.

Three measurements, each against a reference taken in the same run:

1. control-plane scaling: 40 two-second builds on one replica (one engine) vs on two replicas
   (two engines), `--max-concurrent 2` each;
2. cross-replica follow lag: one build printing 2,000 lines/s followed at once from its owner
   and from the other replica; the added lag is, per SSE id, the arrival at the other replica's
   follower minus the arrival at the owner's;
3. Redis memory per 100,000 retained log lines: `INFO memory` used_memory before and after a
   build of `seq 1 100000` has finished.

Needs the second engine (`scripts/lib.sh` ensure_second_engine, $BUILDER_SECOND_DOCKER_HOST)
and Debian's redis-server (ensure_redis_tool); without them the scenario says it skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiodocker
import aiohttp
import redis.asyncio as aioredis

from benchmarks import compare, harness
from benchmarks.fanout import _NOW
from benchmarks.harness import Bar, Daemon, Headline, LogFollower, Result
from tests.processes import redis_argv

ENGINE1_HOST = os.environ.get("DOCKER_HOST") or f"unix://{harness.DOCKER_SOCKET}"
ENGINE2_HOST = os.environ.get("BUILDER_SECOND_DOCKER_HOST") or "unix:///var/run/builder-engine2/docker.sock"
REDIS_BIN = os.environ.get("BUILDER_REDIS_BIN", "/usr/bin/redis-server")

PARALLEL = 2
# The per-tenant queue (25 by default) would turn away most of 40 builds sent to one replica, and
# the per-tenant cap on uploads arriving at once (8) some of 40 POSTed at once.
QUEUE_ARGS = ("--max-queue", "200", "--max-queue-per-tenant", "200", "--max-uploads-per-tenant", "64")

# 1. scaling
BUILDS = 40
SLEEP = 2
PAIRS = 2
SCALING_TARGET = 0.55
ROUND_TIMEOUT = 600.0

# 2. follow lag: every TICK seconds PER_TICK lines, on a schedule kept from the first tick.
RATE, SECONDS, TICK = 2000, 10, 0.05
PER_TICK = round(RATE * TICK)
EMIT_AWK = _NOW + (
    f"BEGIN {{ t0 = now(); for (k = 0; k < {SECONDS / TICK:.0f}; k++) {{ due = t0 + k * {TICK}; "
    f'if (now() < due) {{ system("usleep " int((due - S - U / 1000000) * 1000000)); now() }} '
    f"for (i = 0; i < {PER_TICK}; i++) print ++n; fflush() }} }}\n"
)
LAG_RUNS = 2
LAG_TARGET_P99_MS = 50.0
LAG_TIMEOUT = 120.0

# 3. memory
MEMORY_LINES = 100_000
MEMORY_RUNS = 2
MEMORY_SETTLE = 1.0


# ---------------------------------------------------------------- processes


class RedisServer:
    """redis-server on a free loopback port, AOF on, no RDB snapshots, files in a temp dir
    (the flags of tests/processes.py's RedisServer)."""

    def __init__(self) -> None:
        self.port = harness.free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="bench-cluster-redis-"))
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = self.directory / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> RedisServer:
        argv = redis_argv(REDIS_BIN, self.port, self.directory, self.log_path)
        self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # noqa: ASYNC220
        deadline = time.monotonic() + 15
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start-up: {self._log_tail()}")
            with contextlib.suppress(aioredis.ConnectionError, aioredis.BusyLoadingError):
                async with self.client() as client:
                    if await client.ping():
                        return self
            if time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"redis-server did not answer within 15 s: {self._log_tail()}")
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def client(self) -> aioredis.Redis:
        return aioredis.Redis(port=self.port, socket_timeout=10)

    async def stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-10:])
        return ""


def replica(redis_server: RedisServer, name: str, engine: str) -> Daemon:
    return Daemon(
        "--redis-url",
        redis_server.url,
        "--replica-id",
        name,
        "--docker-host",
        engine,
        "--max-concurrent",
        str(PARALLEL),
        *QUEUE_ARGS,
    )


@contextlib.asynccontextmanager
async def cluster(names_engines: Sequence[tuple[str, str]]) -> AsyncIterator[tuple[RedisServer, list[Daemon]]]:
    """A Redis of its own and one replica per (name, engine), all stopped afterwards."""
    async with contextlib.AsyncExitStack() as stack:
        redis_server = await stack.enter_async_context(RedisServer())
        daemons = []
        for name, engine in names_engines:
            daemons.append(await stack.enter_async_context(replica(redis_server, name, engine)))
        yield redis_server, daemons


async def engine_problem(host: str) -> str | None:
    """Why the engine at `host` cannot run the scenario's builds, or None."""
    try:
        async with aiodocker.Docker(url=host) as docker:
            await docker.version()
            await docker.images.inspect(harness.BASE_IMAGE)
    except aiodocker.DockerError as exc:
        return f"the engine at `{host}` answered {exc.status}: {exc.message}"
    except (OSError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return f"the engine at `{host}` is not reachable ({type(exc).__name__}: {exc})"
    return None


async def remove_images(host: str, refs: Sequence[str]) -> None:
    async with aiodocker.Docker(url=host) as docker:
        for ref in refs:
            with contextlib.suppress(aiodocker.DockerError):
                await docker.images.delete(ref, force=True)


def token() -> str:
    return uuid.uuid4().hex


async def follow_to_success(
    session: aiohttp.ClientSession, daemon: Daemon, build_id: str, follower: LogFollower | None = None
) -> LogFollower:
    follower = follower or LogFollower()
    await follower.run(session, harness.logs_url(daemon, build_id))
    if not follower.ok or (follower.terminal or {}).get("status") != "succeeded":
        raise RuntimeError(f"build {build_id} on {daemon.base_url}: {follower.error} {follower.terminal}")
    return follower


# ---------------------------------------------------------------- 1. scaling


@dataclass
class RoundDetail:
    label: str
    run_no: int
    seconds: float
    per_replica: dict[str, int]  # builds by the replica the daemon says ran them
    step_median: float | None  # started_at → finished_at, median over the builds
    gap_median: float | None  # a slot's finished_at → the next build's started_at on that replica
    per_replica_text: str = ""  # builds, median start → finish and last finish, per replica
    odd: list[str] = field(default_factory=list)


async def scaling_round(
    session: aiohttp.ClientSession, daemons: Sequence[Daemon], names: Sequence[str], label: str, run_no: int
) -> RoundDetail:
    contexts = [
        harness.make_context({"Dockerfile": harness.dockerfile(f"RUN sleep {SLEEP} # {token()}")})
        for _ in range(BUILDS)
    ]
    tags = [f"bench-cluster-{label}-{i}:{run_no}" for i in range(BUILDS)]

    async def one(i: int) -> tuple[str, Daemon]:
        daemon = daemons[i % len(daemons)]
        build_id = await harness.submit_build(session, daemon, contexts[i], no_cache="true", image_name=tags[i])
        await follow_to_success(session, daemon, build_id)
        return build_id, daemon

    started = time.perf_counter()
    started_wall = time.time()
    try:
        done = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(BUILDS))), ROUND_TIMEOUT)
        seconds = time.perf_counter() - started
        detail = RoundDetail(label, run_no, seconds, {}, None, None)
        steps = []
        times: dict[str, tuple[list[dt.datetime], list[dt.datetime]]] = {}
        for build_id, daemon in done:
            status = await harness.get_build(session, daemon, build_id)
            owner = status.get("replica", "?")
            detail.per_replica[owner] = detail.per_replica.get(owner, 0) + 1
            expected = names[daemons.index(daemon)]
            if owner not in ("?", expected):
                detail.odd.append(f"{build_id} was POSTed to {expected} but its record names {owner} as its replica")
            if (step := harness.build_wall_seconds(status, "started_at")) is not None:
                steps.append(step)
                starts, finishes = times.setdefault(owner, ([], []))
                starts.append(harness.parse_time(status["started_at"]))
                finishes.append(harness.parse_time(status["finished_at"]))
            # The same record through every other replica: the store is shared.
            for other in daemons:
                if other is daemon:
                    continue
                seen = await harness.get_build(session, other, build_id)
                if seen.get("status") != status.get("status"):
                    detail.odd.append(
                        f"{build_id}: {status.get('status')} on its owner, {seen.get('status')} on another replica"
                    )
        detail.step_median = harness.median(steps) if steps else None
        # FIFO with PARALLEL slots: the k-th start (k ≥ PARALLEL) waits for the (k - PARALLEL)-th finish.
        gaps = [
            (start - finish).total_seconds()
            for starts, finishes in times.values()
            for start, finish in zip(sorted(starts)[PARALLEL:], sorted(finishes), strict=False)
        ]
        detail.gap_median = harness.median(gaps) if gaps else None
        parts = []
        for name, (starts, finishes) in sorted(times.items()):
            runs = [(f - s).total_seconds() for s, f in zip(starts, finishes, strict=True)]
            last = max(finishes).timestamp() - started_wall
            parts.append(f"{name}: {len(starts)}, median {harness.median(runs):.2f} s, last done at {last:.1f} s")
        detail.per_replica_text = ", ".join(parts)
        return detail
    finally:
        for host in {ENGINE1_HOST, ENGINE2_HOST}:
            await remove_images(host, tags)


# ---------------------------------------------------------------- 2. follow lag


class StampedFollower(LogFollower):
    """Notes when each event id arrived (wall clock of the chunk that completed it)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: dict[int, float] = {}
        self.lines: dict[int, str] = {}

    def consume(self, chunk: bytes) -> None:
        now = time.time()
        for event in self.decoder.feed(chunk):
            self.consume_event(event)
            if event.id.isdigit():
                self.arrivals.setdefault(int(event.id), now)

    def on_log(self, event_id: int, line: str) -> None:
        self.lines[event_id] = line


@dataclass
class LagRun:
    events: int  # events compared (both followers live for them)
    backlog: int  # events left out: the owner's follower had them before the other was attached
    lines: int
    lags_ms: list[float]
    owner: str
    odd: list[str] = field(default_factory=list)


async def lag_run(session: aiohttp.ClientSession, owner: Daemon, other: Daemon, owner_name: str, run_no: int) -> LagRun:
    dockerfile = harness.dockerfile("COPY emit.awk /emit.awk", f"RUN awk -f /emit.awk # {token()}")
    context = harness.make_context({"Dockerfile": dockerfile, "emit.awk": EMIT_AWK})
    tag = f"bench-cluster-lag:{run_no}"
    try:
        build_id = await harness.submit_build(session, owner, context, no_cache="true", image_name=tag)
        at_owner, at_other = StampedFollower(), StampedFollower()
        await asyncio.wait_for(
            asyncio.gather(
                follow_to_success(session, owner, build_id, at_owner),
                follow_to_success(session, other, build_id, at_other),
            ),
            LAG_TIMEOUT,
        )
        status = await harness.get_build(session, owner, build_id)
    finally:
        await remove_images(ENGINE1_HOST, [tag])
    odd = []
    if status.get("replica", owner_name) != owner_name:
        odd.append(f"{build_id} was POSTed to {owner_name}; its record names {status.get('replica')}")
    if at_owner.last_id != at_other.last_id:
        odd.append(f"{build_id}: the owner's stream ended at id {at_owner.last_id}, the other's at {at_other.last_id}")
    if at_owner.lines != at_other.lines:
        differ = sum(1 for k, v in at_owner.lines.items() if at_other.lines.get(k) != v)
        odd.append(f"{build_id}: {differ} log lines differ between the two streams")
    both_live = max(at_owner.opened_at or 0.0, at_other.opened_at or 0.0)
    lags, backlog = [], 0
    for event_id, t_owner in at_owner.arrivals.items():
        t_other = at_other.arrivals.get(event_id)
        if t_other is None:
            continue
        if t_owner < both_live:
            backlog += 1
            continue
        lags.append((t_other - t_owner) * 1000)
    return LagRun(len(lags), backlog, at_owner.log_lines, lags, owner_name, odd)


# ---------------------------------------------------------------- 3. Redis memory


@dataclass
class MemoryRun:
    lines: int  # log lines the build's stream delivered
    last_id: int
    before: int
    after: int
    streams: dict[str, tuple[int, int]]  # key → (XLEN, MEMORY USAGE) of streams created by the build

    @property
    def delta(self) -> int:
        return self.after - self.before

    def mib_per_100k(self, value: int) -> float:
        return value / 2**20 * 100_000 / max(1, self.lines)


async def used_memory(client: aioredis.Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


async def stream_keys(client: aioredis.Redis) -> set[str]:
    keys = set()
    async for key in client.scan_iter(count=1000, _type="stream"):
        keys.add(key.decode() if isinstance(key, bytes) else key)
    return keys


async def memory_run(
    session: aiohttp.ClientSession, redis_server: RedisServer, daemon: Daemon, run_no: int
) -> MemoryRun:
    dockerfile = harness.dockerfile(f"RUN seq 1 {MEMORY_LINES} # {token()}")
    tag = f"bench-cluster-mem:{run_no}"
    async with redis_server.client() as client:
        streams_before = await stream_keys(client)
        before = await used_memory(client)
        try:
            build_id = await harness.submit_build(
                session, daemon, harness.make_context({"Dockerfile": dockerfile}), no_cache="true", image_name=tag
            )
            follower = await asyncio.wait_for(follow_to_success(session, daemon, build_id), LAG_TIMEOUT)
        finally:
            await remove_images(ENGINE1_HOST, [tag])
        await asyncio.sleep(MEMORY_SETTLE)
        after = await used_memory(client)
        streams = {}
        for key in sorted(await stream_keys(client) - streams_before):
            streams[key] = (int(await client.xlen(key)), int(await client.memory_usage(key, samples=0) or 0))
    return MemoryRun(follower.log_lines, follower.last_id, before, after, streams)


# ---------------------------------------------------------------- the scenario


async def run() -> Result:
    problems = [p for p in (await engine_problem(ENGINE1_HOST), await engine_problem(ENGINE2_HOST)) if p]
    if not os.access(REDIS_BIN, os.X_OK):
        problems.append(f"no redis-server at `{REDIS_BIN}` (scripts/lib.sh ensure_redis_tool)")
    if problems:
        why = "; ".join(problems)
        harness.progress(f"cluster: skipped: {why}")
        return Result(
            body=f"**Skipped:** {why}. The scenario needs a second engine with `{harness.BASE_IMAGE}` "
            "(`scripts/lib.sh` ensure_second_engine, `$BUILDER_SECOND_DOCKER_HOST`) and redis-server.",
            headlines=[Headline("cluster", f"skipped: {why}", "—", None)],
        )

    details: list[RoundDetail] = []
    async with (
        harness.client_session(unlimited=True) as session,
        cluster([("ref-a", ENGINE1_HOST)]) as (_, (solo,)),
        cluster([("pair-a", ENGINE1_HOST), ("pair-b", ENGINE2_HOST)]) as (_, pair),
    ):

        async def reference(n: int) -> float:
            detail = await scaling_round(session, [solo], ["ref-a"], "ref", n)
            details.append(detail)
            return detail.seconds

        async def candidate(n: int) -> float:
            detail = await scaling_round(session, pair, ["pair-a", "pair-b"], "pair", n)
            details.append(detail)
            return detail.seconds

        comparison = await compare.alternate(
            [("one", reference), ("two", candidate)], pairs=PAIRS, label="cluster scaling"
        )

    lag_runs: list[LagRun] = []
    async with (
        harness.client_session() as session,
        cluster([("lag-a", ENGINE1_HOST), ("lag-b", ENGINE2_HOST)]) as (_, (owner, other)),
    ):
        for n in range(LAG_RUNS):
            lag = await lag_run(session, owner, other, "lag-a", n)
            harness.progress(
                f"cluster lag {n + 1}/{LAG_RUNS}: {lag.events} events, p50 "
                f"{harness.fmt(harness.percentile(lag.lags_ms, 50))} ms, p99 "
                f"{harness.fmt(harness.percentile(lag.lags_ms, 99))} ms"
            )
            lag_runs.append(lag)

    memory_runs: list[MemoryRun] = []
    async with harness.client_session() as session, cluster([("mem-a", ENGINE1_HOST)]) as (redis_server, (daemon,)):
        for n in range(MEMORY_RUNS):
            mem = await memory_run(session, redis_server, daemon, n)
            harness.progress(
                f"cluster memory {n + 1}/{MEMORY_RUNS}: {mem.lines} lines, used_memory +{mem.delta / 2**20:.2f} MiB"
            )
            memory_runs.append(mem)

    return _report(comparison, details, lag_runs, memory_runs)


def _report(
    comparison: compare.Comparison,
    details: list[RoundDetail],
    lag_runs: list[LagRun],
    memory_runs: list[MemoryRun],
) -> Result:
    labels = {
        "one": f"1 replica, 1 engine, `--max-concurrent {PARALLEL}`",
        "two": f"2 replicas, 2 engines, `--max-concurrent {PARALLEL}` each",
    }
    ratio = comparison.median_ratio("two")
    odd = [o for d in details for o in d.odd] + [o for r in lag_runs for o in r.odd]

    scaling = f"""\
**1. Control-plane scaling.** {BUILDS} builds of `RUN sleep {SLEEP} # <uuid>` (`FROM {harness.BASE_IMAGE}`, a fresh
uuid per build so none is a cache hit; `no_cache=true`), all POSTed at once, each followed over SSE to its `done`
frame from the replica it was POSTed to. Every daemon runs with `--redis-url` (a redis-server of its own per
cluster, AOF on) and `{" ".join(QUEUE_ARGS)}` (the defaults, a per-tenant queue of 25 and 8 uploads
arriving at once per tenant, would refuse builds). Reference: one replica on the main engine. Candidate: two
replicas, one on the main engine and one on the second engine (`{ENGINE2_HOST}`), builds POSTed round-robin
to them directly. Time: first POST → last `done`.
The sleeps alone need {BUILDS} × {SLEEP} s / {PARALLEL} = {BUILDS * SLEEP / PARALLEL:.0f} s on one replica and
half that on two. Alternating, one warm-up round, then {PAIRS} measured rounds; images removed after each round."""
    round_rows = [
        [
            labels["one" if d.label == "ref" else "two"],
            "warm-up" if d.run_no == 0 else d.run_no,
            f"{d.seconds:.2f}",
            d.per_replica_text or ", ".join(f"{k}: {v}" for k, v in sorted(d.per_replica.items())),
            harness.fmt(d.step_median, 2),
            harness.fmt(d.gap_median, 3),
        ]
        for d in details
    ]
    round_table = harness.markdown_table(
        [
            "setup",
            "round",
            "wall (s)",
            "per replica (the record's `replica`): builds, median start → finish, last finish after the first POST",
            "median start → finish (s)",
            "median slot freed → next start (s)",
        ],
        round_rows,
    )

    all_lags = [lag for r in lag_runs for lag in r.lags_ms]
    p50, p99 = harness.percentile(all_lags, 50), harness.percentile(all_lags, 99)
    lag_text = f"""\
**2. Cross-replica follow lag.** A build on replica `lag-a` (main engine) prints {RATE:,} lines/s for {SECONDS} s:
every {TICK * 1000:.0f} ms {PER_TICK} numbered lines and a flush (busybox awk paced on the kernel clock). Two
followers read its log at once, one from the owner `lag-a` and one from the other replica `lag-b` (which reads
the build's Redis stream); both decode with the SDK's decoder in the harness and note, per SSE id, when the
chunk that completed the event arrived. Added lag of an event = arrival at `lag-b`'s follower − arrival at
`lag-a`'s (negative: the other replica's follower had it first). Events the owner's follower had before the
other's stream was open (replayed backlog) are left out.
{LAG_RUNS} builds, one after the other."""
    lag_rows = [
        [
            i + 1,
            r.lines,
            r.events,
            r.backlog,
            harness.fmt(harness.percentile(r.lags_ms, 50)),
            harness.fmt(harness.percentile(r.lags_ms, 99)),
            harness.fmt(max(r.lags_ms) if r.lags_ms else None),
            harness.fmt(min(r.lags_ms) if r.lags_ms else None),
        ]
        for i, r in enumerate(lag_runs)
    ]
    lag_rows.append(
        [
            "all",
            sum(r.lines for r in lag_runs),
            len(all_lags),
            sum(r.backlog for r in lag_runs),
            f"**{harness.fmt(p50)}**",
            f"**{harness.fmt(p99)}**",
            harness.fmt(max(all_lags) if all_lags else None),
            harness.fmt(min(all_lags) if all_lags else None),
        ]
    )
    lag_table = harness.markdown_table(
        [
            "build",
            "log lines",
            "events compared",
            "backlog left out",
            "p50 (ms)",
            "p99 (ms)",
            "max (ms)",
            "min (ms)",
        ],
        lag_rows,
    )

    per_100k = [m.mib_per_100k(m.delta) for m in memory_runs]
    mem_median = harness.median(per_100k) if per_100k else None
    memory_text = f"""\
**3. Redis memory per 100,000 retained log lines.** One replica (main engine) on a fresh redis-server; for
each of {MEMORY_RUNS} builds of `RUN seq 1 {MEMORY_LINES} # <uuid>` in turn: `INFO memory` used_memory before
the POST and {MEMORY_SETTLE:.0f} s after its `done` frame; the difference, per 100,000 log lines the stream
delivered. Also `MEMORY USAGE` (all samples) of the Redis streams the build created."""
    memory_rows = [
        [
            i + 1,
            m.lines,
            m.last_id,
            f"{m.delta / 2**20:.2f}",
            f"**{m.mib_per_100k(m.delta):.2f}**",
            "; ".join(f"`{k}`: XLEN {n:,}, {size / 2**20:.2f} MiB" for k, (n, size) in m.streams.items()) or "none",
        ]
        for i, m in enumerate(memory_runs)
    ]
    memory_table = harness.markdown_table(
        [
            "build",
            "log lines",
            "last SSE id",
            "used_memory after − before (MiB)",
            "MiB per 100k lines",
            "new streams",
        ],
        memory_rows,
    )

    parts = [
        "Several `builder serve --redis-url …` daemons sharing builds, logs and cancels through one Redis.",
        scaling,
        comparison.table(labels),
        "- " + comparison.runs_note(labels),
        round_table,
        lag_text,
        lag_table,
        memory_text,
        memory_table,
    ]
    if odd:
        parts.append("**Oddities seen:**\n\n" + "\n".join(f"- {o}" for o in odd[:20]))
    lag_met = None if p99 is None else p99 < LAG_TARGET_P99_MS
    return Result(
        body="\n\n".join(parts),
        headlines=[
            Headline(
                "cluster",
                f"{harness.fmt(ratio, 3)} two replicas / one ({comparison.median('two'):.1f} s vs "
                f"{comparison.median('one'):.1f} s for {BUILDS} builds)",
                f"≤ {SCALING_TARGET}",
                None if ratio is None else ratio <= SCALING_TARGET,
            ),
            Headline(
                "cluster",
                f"cross-replica follow lag p99 {harness.fmt(p99)} ms (p50 {harness.fmt(p50)} ms) at {RATE:,} lines/s",
                f"p99 < {LAG_TARGET_P99_MS:.0f} ms",
                lag_met,
            ),
            Headline(
                "cluster",
                f"Redis used_memory {harness.fmt(mem_median, 2)} MiB per 100,000 retained log lines",
                "—",
                None,
            ),
        ],
        bars=[
            Bar("cluster: 2 replicas / 1", ratio, SCALING_TARGET),
            Bar("cluster: follow lag p99 / 50 ms", None if p99 is None else p99 / LAG_TARGET_P99_MS, 1.0),
        ],
    )
