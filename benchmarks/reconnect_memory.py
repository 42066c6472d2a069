"""Reconnect churn: does a follower that hangs up leave anything behind in the daemon?

Against one running build (a step that sleeps), 1,000 times in a row: open its
log stream, read the first bytes, hang up. Compare the daemon's memory, open
file descriptors and (when the daemon exposes it) subscriber count before,
right after, and after a short settle.
"""

from __future__ import annotations

import asyncio
import collections
import time

import aiohttp

from benchmarks import harness
from benchmarks.harness import Daemon, Headline, LogFollower, Result

CYCLES = 1_000
SLEEP_SECONDS = 60
# About a second: the cancelled handlers' clean-up runs on the next loop turns,
# and the allocator gets a moment to hand back what was freed.
SETTLE_SECONDS = 1.0
RUNNING_TIMEOUT = 30.0
# The step says it runs itself: either builder prints its output as a log line.
STARTED_LINE = "reconnect-memory: step running"
DOCKERFILE = harness.dockerfile(f"RUN echo '{STARTED_LINE}' && sleep {SLEEP_SECONDS}")


class _StepWatcher(LogFollower):
    """Signals once the step runs (it prints STARTED_LINE)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = asyncio.Event()

    def on_log(self, event_id: int, line: str) -> None:
        if line == STARTED_LINE:
            self.seen.set()


async def _wait_for_step(session: aiohttp.ClientSession, daemon: Daemon, build_id: str) -> None:
    # The churn must hit a build that is really running (live subscriptions,
    # not a replay of a finished log), so wait for its RUN step.
    watcher = _StepWatcher()
    follow = asyncio.create_task(watcher.run(session, harness.logs_url(daemon, build_id)))
    seen = asyncio.create_task(watcher.seen.wait())
    await asyncio.wait({follow, seen}, timeout=RUNNING_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    for task in (follow, seen):
        task.cancel()
    await asyncio.gather(follow, seen, return_exceptions=True)
    if not watcher.seen.is_set():
        raise RuntimeError(
            f"build {build_id} did not start its RUN step within {RUNNING_TIMEOUT:.0f}s: {watcher.error}"
        )


async def _snapshot(session: aiohttp.ClientSession, daemon: Daemon, build_id: str) -> dict:
    # Probe first: its keep-alive connection then counts in every fd reading alike.
    subscribers = await harness.subscriber_count(session, daemon)
    return {"rss": daemon.rss_mib(), "fds": daemon.open_fds(), "subscribers": subscribers}


async def _churn(session: aiohttp.ClientSession, url: str) -> tuple[float, list[str]]:
    """CYCLES open / read the first bytes / hang up; returns the time taken and any anomalies."""
    bad_status: collections.Counter[int] = collections.Counter()
    empty = 0
    started = time.monotonic()
    for _ in range(CYCLES):
        async with session.get(url, headers=harness.SSE_HEADERS) as response:
            if response.status != 200:
                bad_status[response.status] += 1
            if not await response.content.readany():
                empty += 1
            # Hang up mid-stream: this closes the socket instead of pooling it.
            response.close()
    anomalies = []
    if bad_status:
        anomalies.append(f"Stream opens that were not HTTP 200: {dict(bad_status)}.")
    if empty:
        anomalies.append(f"{empty} stream(s) ended before sending a byte.")
    return time.monotonic() - started, anomalies


async def run() -> Result:
    async with Daemon() as daemon, harness.client_session() as session:
        context = harness.make_context({"Dockerfile": DOCKERFILE})
        build_id = await harness.submit_build(session, daemon, context, no_cache="true")
        try:
            await _wait_for_step(session, daemon, build_id)
            await asyncio.sleep(SETTLE_SECONDS)
            before = await _snapshot(session, daemon, build_id)
            churn_seconds, notes = await _churn(session, harness.logs_url(daemon, build_id))
            after = await _snapshot(session, daemon, build_id)
            await asyncio.sleep(SETTLE_SECONDS)
            settled = await _snapshot(session, daemon, build_id)
            status_during = (await harness.get_build(session, daemon, build_id))["status"]
        finally:
            # Cancel even when the scenario failed half-way: no 60 s step left behind.
            cancel_started = time.monotonic()
            cancel_code, cancel_body = await harness.cancel_build(session, daemon, build_id)
            cancel_seconds = time.monotonic() - cancel_started
        alive = daemon.alive()

    headers = [
        "cycles",
        "churn time (s)",
        "RSS before (MiB)",
        "RSS after (MiB)",
        f"RSS after {SETTLE_SECONDS:.0f} s settle (MiB)",
        "open fds before / after / settled",
    ]
    row: list[object] = [
        CYCLES,
        harness.fmt(churn_seconds, 2),
        harness.fmt(before["rss"]),
        harness.fmt(after["rss"]),
        harness.fmt(settled["rss"]),
        f"{before['fds']} / {after['fds']} / {settled['fds']}",
    ]
    headers.append("log followers before / after / settled")
    row.append(f"{before['subscribers']} / {after['subscribers']} / {settled['subscribers']}")
    notes += [
        (
            f"Build status when the churn ended: `{status_during}` (it must still be `running` for the "
            "cycles to have exercised live subscriptions)."
        ),
        f"`DELETE` at the end: HTTP {cancel_code}, status `{cancel_body.get('status')}`, in {cancel_seconds:.2f} s.",
    ]
    if not alive:
        notes.append("**The daemon had died by the end of the run.**")
    method = f"""\
A build whose step is `RUN echo '{STARTED_LINE}' && sleep {SLEEP_SECONDS}`, followed until the
step prints that line. Then, {CYCLES:,} times in a row on one aiohttp session: `GET /builds/{{id}}/logs` with
`Accept: text/event-stream`, read the first bytes, close the connection. RSS is the daemon's `VmRSS`,
fds are the entries of `/proc/<pid>/fd` (the harness's one keep-alive connection included in all
three), taken {SETTLE_SECONDS:.0f} s after the step started (*before*), right after the last cycle
(*after*), and {SETTLE_SECONDS:.0f} s later (*settled*). The build is cancelled with `DELETE` at the end."""
    # No target is set for this scenario; "met" means nothing was left behind once settled.
    clean = settled["fds"] <= before["fds"] and settled["subscribers"] <= before["subscribers"] and alive
    headline = Headline(
        "reconnect-memory",
        f"{CYCLES:,} hang-ups: RSS {settled['rss'] - before['rss']:+.1f} MiB once settled; open fds "
        f"{before['fds']} → {settled['fds']}; log followers {before['subscribers']} → {settled['subscribers']}",
        "fds and followers back to their count before (no target in this issue)",
        clean,
    )
    body = "\n\n".join([method, harness.markdown_table(headers, [row]), "\n".join(f"- {n}" for n in notes)])
    return Result(body=body, headlines=[headline])
