"""Cancel: DELETE a build during a long `RUN sleep`; time until DELETE returns and until the
step's process is gone from this host, under BuildKit (the default) and the legacy builder.

There is no docker reference to alternate with (`docker build` has no
cancel-by-id; Ctrl+C of the CLI leaves the engine to clean up on its own), so
this is a plain series of runs per builder.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from benchmarks import harness
from benchmarks.harness import Bar, Daemon, Headline, Result
from tests.steps import processes_running, unique_sleep, wait_for_process

RUNS = 10
WARMUPS = 1
POLL_SECONDS = 0.002
GONE_TIMEOUT = 30.0
STEP_TIMEOUT = 30.0
TARGET_MEDIAN_MS = 100.0  # BuildKit: DELETE sent -> step process gone
TARGET_MAX_MS = 500.0
BUILDERS = ("buildkit", "legacy")


async def _one(session: aiohttp.ClientSession, daemon: Daemon, builder: str) -> dict:
    sleep = unique_sleep()
    dockerfile = harness.dockerfile(f"RUN {sleep}")
    build_id = await harness.submit_build(
        session, daemon, harness.make_context({"Dockerfile": dockerfile}), no_cache="true", builder=builder
    )
    try:
        await wait_for_process(sleep, STEP_TIMEOUT)
    except TimeoutError:
        await harness.cancel_build(session, daemon, build_id)
        raise RuntimeError(f"build {build_id}: no `{sleep}` process within {STEP_TIMEOUT:.0f}s") from None

    started = time.perf_counter()
    gone_at: float | None = None

    async def poll() -> None:
        nonlocal gone_at
        deadline = started + GONE_TIMEOUT
        while time.perf_counter() < deadline:
            if not processes_running(sleep):
                gone_at = time.perf_counter() - started
                return
            await asyncio.sleep(POLL_SECONDS)

    poller = asyncio.create_task(poll())
    code, status = await harness.cancel_build(session, daemon, build_id)
    delete_s = time.perf_counter() - started
    await poller
    return {
        "delete_ms": delete_s * 1000,
        "gone_ms": None if gone_at is None else gone_at * 1000,
        "code": code,
        "status": status.get("status"),
    }


async def run() -> Result:
    runs: dict[str, list[dict]] = {builder: [] for builder in BUILDERS}
    async with Daemon() as daemon, harness.client_session() as session:
        for builder in BUILDERS:
            for i in range(WARMUPS + RUNS):
                result = await _one(session, daemon, builder)
                result["warmup"] = i < WARMUPS
                runs[builder].append(result)
                harness.progress(f"cancel ({builder}): run {i}: {result}")
    rows, per_run, notes = [], [], []
    summary: dict[str, tuple[list[float], list[float]]] = {}
    for builder in BUILDERS:
        measured = [r for r in runs[builder] if not r["warmup"]]
        delete = [r["delete_ms"] for r in measured]
        gone = [r["gone_ms"] for r in measured if r["gone_ms"] is not None]
        summary[builder] = (delete, gone)
        rows.append(
            [builder, "DELETE returns", f"{harness.median(delete):.0f}", f"{min(delete):.0f}", f"{max(delete):.0f}"]
        )
        if gone:
            rows.append(
                [builder, "step process gone", f"{harness.median(gone):.0f}", f"{min(gone):.0f}", f"{max(gone):.0f}"]
            )
        if never := sum(r["gone_ms"] is None for r in measured):
            notes.append(
                f"**{builder}: {never} run(s) left the step's process running {GONE_TIMEOUT:.0f} s after the DELETE.**"
            )
        if bad := [r for r in measured if r["code"] != 200 or r["status"] != "cancelled"]:
            notes.append(f"**{builder}: {len(bad)} DELETE(s) did not answer 200 `cancelled`.**")
        per_run += [
            [
                builder,
                "warm-up" if r["warmup"] else i,
                f"{r['delete_ms']:.0f}",
                "never" if r["gone_ms"] is None else f"{r['gone_ms']:.0f}",
                r["code"],
                r["status"],
            ]
            for i, r in enumerate(runs[builder])
        ]
    table = harness.markdown_table(["builder", "time after DELETE sent", "median (ms)", "min (ms)", "max (ms)"], rows)
    per_run_table = harness.markdown_table(
        ["builder", "run", "DELETE (ms)", "process gone (ms)", "HTTP", "status in answer"], per_run
    )
    method = f"""\
```Dockerfile
{harness.dockerfile("RUN sleep <a number no other process uses>").rstrip()}
```

Against one daemon, per builder: submit (raw tar.gz, `no_cache=true`), wait until the step's `sleep`
process runs on this host (BuildKit's step containers are not listed by the engine, so the harness looks
for the process itself in /proc), then send `DELETE /builds/{{id}}`. From that moment the harness scans
/proc every {POLL_SECONDS * 1000:.0f} ms, concurrently with the DELETE, until the process is gone. One warm-up
run, then {RUNS} measured runs per builder. No alternation: `docker build` has no cancel of a build by id."""
    delete, gone = summary["buildkit"]
    worst = max([*delete, *gone])
    ok = (
        len(gone) == len(delete)
        and not notes
        and max(harness.median(delete), harness.median(gone)) < TARGET_MEDIAN_MS
        and worst < TARGET_MAX_MS
    )
    return Result(
        body="\n\n".join([method, table, per_run_table, *(["\n".join(f"- {n}" for n in notes)] if notes else [])]),
        headlines=[
            Headline(
                "cancel",
                f"BuildKit: DELETE returns median {harness.median(delete):.0f} ms, max {max(delete):.0f} ms; step "
                "process gone: "
                + (f"median {harness.median(gone):.0f} ms, max {max(gone):.0f} ms" if gone else "never")
                + f" ({RUNS} runs)",
                f"median < {TARGET_MEDIAN_MS:.0f} ms, max < {TARGET_MAX_MS:.0f} ms",
                bool(ok),
            )
        ],
        bars=[
            Bar(
                "cancel: median ÷ 100 ms",
                max(harness.median(delete), harness.median(gone) if gone else 0) / TARGET_MEDIAN_MS,
                1.0,
            ),
            Bar("cancel: max ÷ 500 ms", worst / TARGET_MAX_MS, 1.0),
        ],
    )
