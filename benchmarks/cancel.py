"""Cancel: DELETE a build during `RUN sleep 300`; time until DELETE returns and until its container is gone.

There is no docker reference to alternate with (`docker build` has no
cancel-by-id; Ctrl+C of the CLI leaves the engine to clean up on its own), so
this is a plain series of runs.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from benchmarks import harness
from benchmarks.harness import Bar, Daemon, Headline, LogFollower, Result

RUNS = 10
WARMUPS = 1
POLL_SECONDS = 0.005
GONE_TIMEOUT = 30.0
STEP_TIMEOUT = 30.0
TARGET_MEDIAN_MS = 300.0
TARGET_MAX_MS = 1000.0
DOCKERFILE = harness.dockerfile("RUN sleep 300")


class _StepWatcher(LogFollower):
    """Notes the step container the engine announces (` ---> Running in <id>`)."""

    def __init__(self) -> None:
        super().__init__()
        self.container: str | None = None
        self.seen = asyncio.Event()

    def on_log(self, event_id: int, line: str) -> None:
        if "Running in " in line and self.container is None:
            self.container = line.rsplit("Running in ", 1)[1].strip()
            self.seen.set()


async def _listed(engine: aiohttp.ClientSession, prefix: str) -> bool:
    async with engine.get(f"{harness.ENGINE_API}/containers/json", params={"all": "1"}) as response:
        containers = await response.json()
    return any(c["Id"].startswith(prefix) for c in containers)


async def _one(session: aiohttp.ClientSession, engine: aiohttp.ClientSession, daemon: Daemon) -> dict:
    build_id = await harness.submit_build(session, daemon, harness.make_context({"Dockerfile": DOCKERFILE}),
                                          no_cache="true")
    watcher = _StepWatcher()
    follow = asyncio.create_task(watcher.run(session, harness.logs_url(daemon, build_id)))
    try:
        await asyncio.wait_for(watcher.seen.wait(), STEP_TIMEOUT)
    except TimeoutError:
        follow.cancel()
        await harness.cancel_build(session, daemon, build_id)
        raise RuntimeError(f"build {build_id} announced no step container within {STEP_TIMEOUT:.0f}s") from None
    container = watcher.container
    assert container is not None
    # The step is running `sleep 300` (give it a moment past the announcement, as a user would).
    await asyncio.sleep(0.3)
    if not await _listed(engine, container):
        raise RuntimeError(f"step container {container} is not listed before the DELETE")

    started = time.perf_counter()
    polls = 0
    gone_at: float | None = None

    async def poll() -> None:
        nonlocal polls, gone_at
        deadline = started + GONE_TIMEOUT
        while time.perf_counter() < deadline:
            polls += 1
            if not await _listed(engine, container):
                gone_at = time.perf_counter() - started
                return
            await asyncio.sleep(POLL_SECONDS)

    poller = asyncio.create_task(poll())
    code, status = await harness.cancel_build(session, daemon, build_id)
    delete_s = time.perf_counter() - started
    await poller
    await asyncio.wait_for(follow, 10)
    return {
        "delete_ms": delete_s * 1000,
        "gone_ms": None if gone_at is None else gone_at * 1000,
        "code": code,
        "status": status.get("status"),
        "terminal": (watcher.terminal or {}).get("status"),
        "polls": polls,
    }


async def run() -> Result:
    runs = []
    async with Daemon() as daemon, harness.client_session() as session, harness.engine_session() as engine:
        for i in range(WARMUPS + RUNS):
            result = await _one(session, engine, daemon)
            result["warmup"] = i < WARMUPS
            runs.append(result)
            harness.progress(f"cancel: run {i}: {result}")
    measured = [r for r in runs if not r["warmup"]]
    delete = [r["delete_ms"] for r in measured]
    gone = [r["gone_ms"] for r in measured if r["gone_ms"] is not None]
    never_gone = sum(r["gone_ms"] is None for r in measured)
    rows = [[
        "DELETE returns", f"{harness.median(delete):.0f}", f"{min(delete):.0f}", f"{max(delete):.0f}",
    ]]
    if gone:
        rows.append(["engine lists no container of the build", f"{harness.median(gone):.0f}", f"{min(gone):.0f}",
                     f"{max(gone):.0f}"])
    table = harness.markdown_table(["time after DELETE sent", "median (ms)", "min (ms)", "max (ms)"], rows)
    per_run = harness.markdown_table(
        ["run", "DELETE (ms)", "container gone (ms)", "HTTP", "status in answer", "stream's terminal status", "polls"],
        [["warm-up" if r["warmup"] else i, f"{r['delete_ms']:.0f}",
          "never" if r["gone_ms"] is None else f"{r['gone_ms']:.0f}", r["code"], r["status"], r["terminal"],
          r["polls"]] for i, r in enumerate(runs)],
    )
    method = f"""\
```Dockerfile
{DOCKERFILE.rstrip()}
```

Against one daemon: submit (raw tar.gz, `no_cache=true`), follow the log until the engine announces the
step container (` ---> Running in <id>`), check the engine lists it, wait 0.3 s, then send
`DELETE /builds/{{id}}`. From that moment the harness polls the engine's `GET /containers/json?all=1`
(over its unix socket) every {POLL_SECONDS * 1000:.0f} ms, concurrently with the DELETE, until the step container is no
longer listed (the time of the first answer without it). One warm-up run, then {RUNS} measured runs.
No alternation: `docker build` has no cancel of a build by id to compare with."""
    ok = (
        not never_gone and delete and gone
        and harness.median(delete) < TARGET_MEDIAN_MS and max(delete) < TARGET_MAX_MS
        and harness.median(gone) < TARGET_MEDIAN_MS and max(gone) < TARGET_MAX_MS
        and all(r["code"] == 200 and r["status"] == "cancelled" for r in measured)
    )
    notes = []
    if never_gone:
        notes.append(f"**{never_gone} run(s): the container was still listed {GONE_TIMEOUT:.0f} s after the DELETE.**")
    bad = [r for r in measured if r["code"] != 200 or r["status"] != "cancelled"]
    if bad:
        notes.append(f"**{len(bad)} DELETE(s) did not answer 200 `cancelled`.**")
    worst = max([*delete, *gone])
    return Result(
        body="\n\n".join([method, table, per_run, *(["\n".join(f"- {n}" for n in notes)] if notes else [])]),
        headlines=[Headline(
            "cancel",
            f"DELETE returns: median {harness.median(delete):.0f} ms, max {max(delete):.0f} ms; container gone: "
            + (f"median {harness.median(gone):.0f} ms, max {max(gone):.0f} ms" if gone else "never")
            + f" ({RUNS} runs)",
            f"median < {TARGET_MEDIAN_MS:.0f} ms, max < {TARGET_MAX_MS / 1000:.0f} s",
            bool(ok),
        )],
        bars=[
            Bar("cancel: median ÷ 300 ms", max(harness.median(delete), harness.median(gone) if gone else 0)
                / TARGET_MEDIAN_MS, 1.0),
            Bar("cancel: max ÷ 1 s", worst / TARGET_MAX_MS, 1.0),
        ],
    )
