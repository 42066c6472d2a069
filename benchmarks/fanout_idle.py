"""5,000 log followers that never read, on a 1M-line build: the daemon's memory, its /healthz, the build's time.

Rounds alternate a build with no follower and the same build with 5,000 followers that send
their GET, read the response headers and then never read again (their sockets stay open, the
kernel's buffers fill and the daemon's writes to them stall). Each round has a fresh daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from benchmarks import harness
from benchmarks.followers import (
    DAEMON_ARGS,
    FollowerProcesses,
    Report,
    Spec,
    submit_behind_blocker,
    wait_for_followers,
)
from benchmarks.harness import Bar, Daemon, Headline, Result

FOLLOWERS = 5000
PROCESSES = 2
LINES = 1_000_000
ROUNDS = 2  # of each kind, alternating, a plain build first
# The legacy builder: the engine's BuildKit (20.10) cannot run this build reliably. A step that
# prints a million lines at full speed sets off its status-stream bug (over 1 MiB of output
# waiting in one update: empty updates for ever) in about one run of three, through the daemon
# (which then fails the build clearly) and through `DOCKER_BUILDKIT=1 docker build`, which hangs.
BUILDER = "legacy"
DOCKERFILE = harness.dockerfile(f"RUN seq 1 {LINES}")
WARM_UP = harness.make_context({"Dockerfile": harness.dockerfile("RUN true")})
# A client elsewhere announces an Ethernet-sized segment (1448 bytes); over loopback the daemon's
# side would otherwise size its send buffer for 64 KiB segments, ~3 MiB a socket, and 5,000
# stalled sockets would hold more of the kernel's TCP memory than it allows (tcp_mem). The
# followers' receive buffers are the smallest the kernel gives: on a real network they would be
# on the client's host, not this one.
MSS = 1448
RCVBUF = 4096
PROBE_EVERY = 0.05
SETTLE = 2.0  # after the last stream closed, before RSS is read again
BUILD_TIMEOUT = 300.0

TARGET_GROWTH_MIB = 100.0
TARGET_BACK_MIB = 10.0
TARGET_HEALTHZ_P99_MS = 100.0
TARGET_RATIO = 1.05


@dataclass
class Probe:
    """`/healthz` every PROBE_EVERY seconds on a connection of its own, with the daemon's RSS and the
    kernel's TCP memory at each sample."""

    daemon: Daemon
    samples: list[tuple[float, float | None]] = field(default_factory=list)  # (wall clock, latency ms or None)
    peak_rss_mib: float = 0.0
    peak_tcp_mib: float = 0.0

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=1)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            due = time.monotonic()
            while True:
                started, latency = time.time(), None
                with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                    sent = time.perf_counter()
                    async with session.get(self.daemon.base_url + "/healthz") as response:
                        await response.read()
                        if response.status == 200:
                            latency = (time.perf_counter() - sent) * 1000
                self.samples.append((started, latency))
                with contextlib.suppress(OSError):
                    self.peak_rss_mib = max(self.peak_rss_mib, self.daemon.rss_mib())
                self.peak_tcp_mib = max(self.peak_tcp_mib, harness.tcp_memory_mib() or 0.0)
                due += PROBE_EVERY
                await asyncio.sleep(max(0.0, due - time.monotonic()))

    def latencies(self, start: float, end: float) -> tuple[list[float], int]:
        """Latencies (ms) of the probes sent from `start` to `end`, and how many of them failed."""
        window = [latency for t, latency in self.samples if start <= t <= end]
        answered = [latency for latency in window if latency is not None]
        return answered, len(window) - len(answered)


@dataclass
class Round:
    followers: int
    status: dict[str, Any]
    build_seconds: float | None  # started → finished: out of the queue to done
    rss_start: float  # MiB, before any follower connected
    rss_attached: float  # every follower connected
    rss_peak: float  # VmHWM from the start (or the probes' highest VmRSS)
    rss_after: float  # once every stream closed and SETTLE passed
    healthz_build: list[float]  # ms, probes while the build ran
    healthz_failed: int
    healthz_round: list[float]  # ms, from the first connect to the last close
    daemon_cpu: float  # while the build ran
    tcp_peak_mib: float
    open_seconds: float | None  # connecting all followers
    report: Report | None

    @property
    def errors(self) -> list[str]:
        return [t.error for t in self.report.tallies if t.error] if self.report else []


async def _wait_finished(session: aiohttp.ClientSession, daemon: Daemon, build_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + BUILD_TIMEOUT
    while (status := await harness.get_build(session, daemon, build_id))["status"] not in harness.TERMINAL_STATUSES:
        if time.monotonic() > deadline:
            await harness.cancel_build(session, daemon, build_id)
            raise RuntimeError(f"build {build_id} not finished after {BUILD_TIMEOUT:.0f}s: {status}")
        await asyncio.sleep(0.1)
    return status


async def _wait_no_followers(session: aiohttp.ClientSession, daemon: Daemon) -> None:
    deadline = time.monotonic() + 60
    while await harness.subscriber_count(session, daemon) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


async def _round(followers: int) -> Round:
    async with Daemon(*DAEMON_ARGS) as daemon, harness.client_session() as session:
        warm_up = await harness.submit_build(session, daemon, WARM_UP)
        await _wait_finished(session, daemon, warm_up)
        blocker, build_id = await submit_behind_blocker(
            session, daemon, harness.make_context({"Dockerfile": DOCKERFILE}), builder=BUILDER
        )
        processes = (
            FollowerProcesses(
                Spec(
                    "127.0.0.1",
                    daemon.port,
                    f"/builds/{build_id}/logs",
                    followers,
                    "idle",
                    BUILD_TIMEOUT * 2,
                    rcvbuf=RCVBUF,
                    mss=MSS,
                ),
                PROCESSES,
            )
            if followers
            else None
        )
        probe = Probe(daemon)
        probing = asyncio.create_task(probe.run())
        report: Report | None = None
        released = 0.0
        try:
            rss_start = daemon.rss_mib()
            peak_reset = daemon.reset_peak_rss()
            first_connect = time.time()
            open_seconds = None
            if processes:
                await processes.open()
                await wait_for_followers(session, daemon, followers)
                open_seconds = time.time() - first_connect
            rss_attached = daemon.rss_mib()
            cpu_before = daemon.cpu_seconds()
            released = time.time()
            await harness.cancel_build(session, daemon, blocker)
            status = await _wait_finished(session, daemon, build_id)
            finished = time.time()
            daemon_cpu = daemon.cpu_seconds() - cpu_before
            if processes:
                processes.hang_up()
                report = await processes.finish()
                await _wait_no_followers(session, daemon)
            closed = time.time()
            await asyncio.sleep(SETTLE)
            rss_after = daemon.rss_mib()
            rss_peak = daemon.peak_rss_mib() if peak_reset else probe.peak_rss_mib
        finally:
            if not released:  # failed early: no 600 s step left in the engine
                await harness.cancel_build(session, daemon, blocker)
            probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probing
            if processes:
                await processes.kill()
    await harness.remove_images([status.get("image_id")])
    healthz_build, failed = probe.latencies(released, finished)
    return Round(
        followers=followers,
        status=status,
        build_seconds=harness.build_wall_seconds(status, "started_at"),
        rss_start=rss_start,
        rss_attached=rss_attached,
        rss_peak=rss_peak,
        rss_after=rss_after,
        healthz_build=healthz_build,
        healthz_failed=failed,
        healthz_round=probe.latencies(first_connect, closed)[0],
        daemon_cpu=daemon_cpu,
        tcp_peak_mib=probe.peak_tcp_mib,
        open_seconds=open_seconds,
        report=report,
    )


def _ms(values: list[float], p: float) -> str:
    return harness.fmt(harness.percentile(values, p), 1)


def _row(number: int, r: Round) -> list[object]:
    return [
        number,
        f"{r.followers:,}",
        f"{r.status.get('status')}",
        harness.fmt(r.build_seconds, 2),
        f"{r.rss_start:.0f} / {r.rss_attached:.0f} / {r.rss_peak:.0f} / {r.rss_after:.0f}",
        f"{r.rss_peak - r.rss_start:+.0f} / {r.rss_after - r.rss_start:+.0f}",
        f"{_ms(r.healthz_build, 50)} / {_ms(r.healthz_build, 99)} / "
        f"{harness.fmt(max(r.healthz_build, default=None), 1)}"
        + (f" ({r.healthz_failed} failed)" if r.healthz_failed else ""),
        f"{r.daemon_cpu:.1f}",
        f"{r.tcp_peak_mib:.0f}",
        "—" if r.report is None else f"{r.report.cpu_seconds:.1f}",
    ]


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return harness.median(present) if present else None


async def run() -> Result:
    harness.raise_fd_limit()
    rounds: list[Round] = []
    for number in range(ROUNDS):
        for followers in (0, FOLLOWERS):
            harness.progress(f"fanout-idle: round {number + 1}, {followers} followers")
            rounds.append(await _round(followers))
            r = rounds[-1]
            harness.progress(f"fanout-idle: {_row(len(rounds), r)}")
    plain = [r for r in rounds if not r.followers]
    idle = [r for r in rounds if r.followers]
    ratio = None
    if (with_followers := _median([r.build_seconds for r in idle])) and (
        alone := _median([r.build_seconds for r in plain])
    ):
        ratio = with_followers / alone
    growth = max(r.rss_peak - r.rss_start for r in idle)
    back = max(r.rss_after - r.rss_start for r in idle)
    healthz = [latency for r in idle for latency in r.healthz_build]
    healthz_p99 = harness.percentile(healthz, 99)
    failed = sum(r.healthz_failed for r in idle)
    notes = []
    for r in idle:
        if r.errors:
            notes.append(
                f"{len(r.errors)} follower(s) failed: " + "; ".join(f"`{e}`" for e in sorted(set(r.errors))[:3])
            )
        assert r.report is not None
        notes.append(
            f"{r.followers:,} followers opened in {harness.fmt(r.open_seconds, 2)} s; `/healthz` over the whole round "
            f"(first connect → last close) p50 / p99 / max {_ms(r.healthz_round, 50)} / {_ms(r.healthz_round, 99)} / "
            f"{harness.fmt(max(r.healthz_round, default=None), 1)} ms; "
            f"follower processes {r.report.cpu_seconds:.1f} s CPU "
            f"({r.report.system_seconds:.1f} s in the kernel)."
        )
    method = f"""\
```Dockerfile
{DOCKERFILE.rstrip()}
```

Built with `builder: {BUILDER}`. {ROUNDS} rounds of
each kind, alternating, a plain build first; every round has a fresh daemon (`{" ".join(DAEMON_ARGS)}`)
and a warm-up build (`RUN true`). The measured build waits in the queue behind a blocker (`RUN sleep 600`)
while the followers connect ({PROCESSES} processes on epoll, at most 64 connects in flight each): each sends
`GET /builds/{{id}}/logs` (`Accept: text/event-stream`), reads the response headers and never reads again.
Their sockets announce an MSS of {MSS} bytes and a {RCVBUF}-byte receive buffer (over loopback the daemon's
side would otherwise size its send buffer for 64 KiB segments, ~3 MiB a socket: 500 such followers held
1.5 GiB of the kernel's TCP memory). Then the blocker is cancelled and the build runs; once it has finished,
the followers hang up.

*Build*: `started_at` → `finished_at` (out of the queue to done). *RSS* (MiB): the daemon's `VmRSS` before
any follower connected / once all had / `VmHWM` (peak, reset with `clear_refs` at the start) / `VmRSS`
{SETTLE:.0f} s after the daemon counted no stream left. *`/healthz`*: one request every {PROBE_EVERY * 1000:.0f} ms on a
connection of its own, request → body read, while the build ran. *Daemon CPU*: while the build ran.
*Kernel TCP*: the highest `mem` of `/proc/net/sockstat` (all sockets of the machine)."""
    table = harness.markdown_table(
        [
            "round",
            "followers",
            "build",
            "build (s)",
            "RSS start / attached / peak / after close (MiB)",
            "RSS peak / after − start (MiB)",
            "`/healthz` p50 / p99 / max (ms)",
            "daemon CPU (s)",
            "kernel TCP peak (MiB)",
            "follower processes' CPU (s)",
        ],
        [_row(i, r) for i, r in enumerate(rounds, start=1)],
    )
    summary = (
        f"Build time with {FOLLOWERS:,} idle followers ÷ without (medians): **{harness.fmt(ratio, 2)}**; RSS growth "
        f"at peak {growth:+.0f} MiB, after close {back:+.0f} MiB (worst round); `/healthz` p99 while the build ran "
        f"{harness.fmt(healthz_p99, 1)} ms over {len(healthz)} probes" + (f", {failed} failed" if failed else "") + "."
    )
    body = "\n\n".join([method, table, summary, "\n".join(f"- {n}" for n in notes)])
    return Result(
        body=body,
        headlines=[
            Headline(
                "fanout-idle",
                f"{FOLLOWERS:,} idle followers: RSS {growth:+.0f} MiB at peak, {back:+.0f} MiB after close",
                f"< {TARGET_GROWTH_MIB:.0f} MiB, back within {TARGET_BACK_MIB:.0f} MiB",
                growth < TARGET_GROWTH_MIB and back <= TARGET_BACK_MIB,
            ),
            Headline(
                "fanout-idle",
                f"`/healthz` p99 {harness.fmt(healthz_p99, 1)} ms while the build ran"
                + (f" ({failed} failed)" if failed else ""),
                f"< {TARGET_HEALTHZ_P99_MS:.0f} ms",
                healthz_p99 is not None and healthz_p99 < TARGET_HEALTHZ_P99_MS and not failed,
            ),
            Headline(
                "fanout-idle",
                f"build time with ÷ without followers {harness.fmt(ratio, 2)}",
                f"≤ {TARGET_RATIO}",
                ratio is not None and ratio <= TARGET_RATIO,
            ),
        ],
        bars=[
            Bar("fanout-idle: RSS growth ÷ 100 MiB", max(growth, 1) / TARGET_GROWTH_MIB, 1.0),
            Bar(
                "fanout-idle: /healthz p99 ÷ 100 ms",
                None if healthz_p99 is None else healthz_p99 / TARGET_HEALTHZ_P99_MS,
                1.0,
            ),
            Bar("fanout-idle: build time ratio", ratio, TARGET_RATIO),
        ],
    )
